//! The exemplar memory of iCaRL-style methods: per-class sets chosen by herding on normalised
//! features, and nearest-mean-of-exemplars (NME) classification (Rebuffi et al., CVPR 2017,
//! Algorithms 1 and 4). Shared by every method that keeps exemplars and classifies by class means.

use candle_core::{DType, Device, Tensor, D};

use sequel_core::data::{GatherBuf, SampleRef, Split, TaskStream};
use sequel_core::model::Model;
use sequel_core::state::{Persist, StateDict};
use sequel_core::{Error, Result};

/// Samples per forward pass when extracting features (never a whole class at once).
const CHUNK: usize = 256;

/// Score of a unit without exemplars: below any `−‖a − b‖²` of unit vectors (≥ −4).
const ABSENT: f32 = -1e30;

/// The exemplars of one herding group, in herding order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExemplarSet {
    /// Task whose samples the group was chosen from.
    pub task: u32,
    /// Output unit (class) of every sample of the group.
    pub unit: u32,
    pub samples: Vec<SampleRef>,
}

/// What an exemplar method trains on in task `task`: the task's samples, then every exemplar.
pub fn task_and_exemplars(
    stream: &TaskStream,
    task: usize,
    exemplars: &[ExemplarSet],
) -> Vec<SampleRef> {
    let mut samples = sequel_core::algorithm::task_samples(stream, task);
    samples.extend(exemplars.iter().flat_map(|g| g.samples.iter().copied()));
    samples
}

/// A group as `<key>.task`, `<key>.unit` and its samples' tasks and indices (`<key>.sample_task`,
/// `<key>.sample_index`), in herding order.
impl Persist for ExemplarSet {
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
        let u32s = |v: Vec<u32>| -> Result<Tensor> {
            let n = v.len();
            Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
        };
        self.task.save(&format!("{key}.task"), out)?;
        self.unit.save(&format!("{key}.unit"), out)?;
        let tasks = u32s(self.samples.iter().map(|r| r.task).collect())?;
        let indices = u32s(self.samples.iter().map(|r| r.index).collect())?;
        out.insert(format!("{key}.sample_task"), tasks);
        out.insert(format!("{key}.sample_index"), indices);
        Ok(())
    }

    fn load(key: &str, from: &StateDict) -> Result<Self> {
        let refs = |k: &str| -> Result<Vec<u32>> {
            let k = format!("{key}.{k}");
            let t = from.get(&k);
            Ok(
                t.ok_or_else(|| Error::msg(format!("checkpoint lacks `{k}`")))?
                    .to_vec1()?,
            )
        };
        let (tasks, indices) = (refs("sample_task")?, refs("sample_index")?);
        if tasks.len() != indices.len() {
            return Err(Error::msg("malformed iCaRL exemplars in checkpoint"));
        }
        Ok(Self {
            task: u32::load(&format!("{key}.task"), from)?,
            unit: u32::load(&format!("{key}.unit"), from)?,
            samples: tasks
                .into_iter()
                .zip(indices)
                .map(|(task, index)| SampleRef { task, index })
                .collect(),
        })
    }
}

/// The class means of the weights being evaluated (see [`class_means`]).
pub struct ClassMeans {
    /// `U × d`, unit rows (zeros for units without exemplars).
    pub means: Tensor,
    /// `1 × U`: 0 for units with exemplars, [`ABSENT`] otherwise.
    pub penalty: Tensor,
}

/// The normalised mean of each unit's exemplars' normalised features under `model`'s current
/// weights (`U × d`, zero rows for units without exemplars), and the NME penalty row (`1 × U`: 0
/// where a unit has exemplars, [`ABSENT`] otherwise).
pub fn class_means(
    exemplars: &[ExemplarSet],
    model: &dyn Model,
    stream: &TaskStream,
    device: &Device,
) -> Result<ClassMeans> {
    let units = stream.num_units;
    let refs: Vec<SampleRef> = exemplars
        .iter()
        .flat_map(|g| g.samples.iter().copied())
        .collect();
    let (feats, ys) = features_of(model, stream, &refs, device, &mut GatherBuf::default())?;
    let dim = feats.first().map_or(0, Vec::len);
    let mut sum = vec![0f64; units * dim];
    let mut count = vec![0usize; units];
    for (f, &u) in feats.iter().zip(&ys) {
        let u = u as usize;
        count[u] += 1;
        for (s, &v) in sum[u * dim..(u + 1) * dim].iter_mut().zip(f) {
            *s += v as f64;
        }
    }
    let mut means = vec![0f32; units * dim];
    let mut penalty = vec![ABSENT; units];
    for u in 0..units {
        if count[u] == 0 {
            continue;
        }
        penalty[u] = 0.0;
        let row = &sum[u * dim..(u + 1) * dim];
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        for (m, &s) in means[u * dim..(u + 1) * dim].iter_mut().zip(row) {
            *m = (s / norm) as f32;
        }
    }
    Ok(ClassMeans {
        means: Tensor::from_vec(means, (units, dim), device)?,
        penalty: Tensor::from_vec(penalty, (1, units), device)?,
    })
}

/// Features of `refs` (evaluation mode, in chunks), L2-normalised, as host rows, with each
/// sample's unit.
pub fn features_of(
    model: &dyn Model,
    stream: &TaskStream,
    refs: &[SampleRef],
    device: &Device,
    buf: &mut GatherBuf,
) -> Result<(Vec<Vec<f32>>, Vec<u32>)> {
    let mut feats = Vec::with_capacity(refs.len());
    let mut units = Vec::with_capacity(refs.len());
    for chunk in refs.chunks(CHUNK) {
        let batch = stream.gather(chunk, Split::Train, buf, device)?;
        let f = sequel_core::model::forward_batch(model, &batch, false)?
            .features
            .flatten_from(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        feats.extend(f.into_iter().map(normalised));
        units.extend_from_slice(&batch.units);
    }
    Ok((feats, units))
}

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    v
}

/// The exemplar update after task `task` (iCaRL's Algorithms 4 and 5): a budget of
/// `memory_size` samples split evenly over every group seen (`m = ⌊memory_size / #groups⌋`),
/// each older group cut to the first `m` of its exemplars (herding order), and `m` exemplars
/// herded for each of the task's units on the model's normalised features.
pub fn update_exemplars(
    exemplars: &mut Vec<ExemplarSet>,
    memory_size: usize,
    model: &dyn Model,
    stream: &TaskStream,
    task: usize,
    device: &Device,
    buf: &mut GatherBuf,
) -> Result<()> {
    let samples = sequel_core::algorithm::task_samples(stream, task);
    let (feats, units) = features_of(model, stream, &samples, device, buf)?;
    let mut by_unit: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &u) in units.iter().enumerate() {
        by_unit.entry(u).or_default().push(i);
    }
    let m = memory_size / (exemplars.len() + by_unit.len()).max(1);
    for g in exemplars.iter_mut() {
        g.samples.truncate(m);
    }
    for (unit, idx) in by_unit {
        let class: Vec<Vec<f32>> = idx.iter().map(|&i| feats[i].clone()).collect();
        exemplars.push(ExemplarSet {
            task: task as u32,
            unit,
            samples: herding(&class, m)
                .into_iter()
                .map(|p| samples[idx[p]])
                .collect(),
        });
    }
    Ok(())
}

/// Herding (the paper's Algorithm 4, without repetition): indices of up to `m` of `features` in
/// the order picked, each minimising the distance between the mean feature and the running mean
/// of the picks. Ties go to the lower index.
pub fn herding(features: &[Vec<f32>], m: usize) -> Vec<usize> {
    let n = features.len();
    let Some(dim) = features.first().map(Vec::len) else {
        return Vec::new();
    };
    let mut mu = vec![0f64; dim];
    for f in features {
        for (a, &v) in mu.iter_mut().zip(f) {
            *a += v as f64;
        }
    }
    mu.iter_mut().for_each(|a| *a /= n as f64);
    let mut picked_sum = vec![0f64; dim];
    let mut taken = vec![false; n];
    let mut order = Vec::with_capacity(m.min(n));
    for k in 1..=m.min(n) {
        let inv_k = 1.0 / k as f64;
        let mut best: Option<(f64, usize)> = None;
        for (i, f) in features.iter().enumerate() {
            if taken[i] {
                continue;
            }
            let d: f64 = mu
                .iter()
                .zip(&picked_sum)
                .zip(f)
                .map(|((&m, &s), &v)| {
                    let r = m - (s + v as f64) * inv_k;
                    r * r
                })
                .sum();
            if best.is_none_or(|(b, _)| d < b) {
                best = Some((d, i));
            }
        }
        let Some((_, i)) = best else { break };
        taken[i] = true;
        for (s, &v) in picked_sum.iter_mut().zip(&features[i]) {
            *s += v as f64;
        }
        order.push(i);
    }
    order
}

/// NME scores `−‖φ̂ − μ_u‖² + penalty_u` of `features` (`B × d`, normalised here) against the
/// normalised class means (`U × d`).
pub fn nme_scores(features: &Tensor, means: &Tensor, penalty: &Tensor) -> Result<Tensor> {
    let f = features.flatten_from(1)?.to_dtype(DType::F32)?;
    let norm = (f.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-12)?;
    let f = f.broadcast_div(&norm)?;
    let f2 = f.sqr()?.sum_keepdim(D::Minus1)?; // B × 1
    let m2 = means.sqr()?.sum_keepdim(D::Minus1)?.t()?; // 1 × U
    let cross = f.matmul(&means.t()?)?; // B × U
    let d2 = (cross * -2.0)?.broadcast_add(&f2)?.broadcast_add(&m2)?;
    Ok(d2.neg()?.broadcast_add(penalty)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn herding_follows_the_running_mean_not_the_nearest_points() {
        // Mean (0.04, 0). Nearest points to it, in order: C, D, E, A, B. Herding picks C (nearest),
        // then B (pulls the running mean back from C towards μ), then A — and only then D, E.
        let pts = [
            vec![1.0f32, 0.0], // A
            vec![-1.0, 0.0],   // B
            vec![0.2, 0.0],    // C
            vec![0.0, 1.0],    // D
            vec![0.0, -1.0],   // E
        ];
        let (a, b, c, d, e) = (0, 1, 2, 3, 4);
        assert_eq!(herding(&pts, 3), vec![c, b, a]);
        assert_eq!(herding(&pts, 5), vec![c, b, a, d, e]);
        // Asking for more than there are returns each point once.
        assert_eq!(herding(&pts, 9).len(), 5);
        assert!(herding(&[], 3).is_empty());
    }

    #[test]
    fn nme_picks_the_nearest_class_mean_and_never_a_unit_without_exemplars() {
        let dev = Device::Cpu;
        // Units 0 and 2 have means along ±x; unit 1 has none (zero row, penalised).
        let means = Tensor::new(&[[1.0f32, 0.0], [0.0, 0.0], [-0.6, 0.8]], &dev).unwrap();
        let penalty = Tensor::new(&[[0.0f32, ABSENT, 0.0]], &dev).unwrap();
        // Unnormalised features: the scale must not matter.
        let f = Tensor::new(
            &[[5.0f32, 0.5], [-0.3, 0.5], [0.0, -2.0], [-1.0, -0.1]],
            &dev,
        )
        .unwrap();
        let s = nme_scores(&f, &means, &penalty).unwrap();
        let pred: Vec<u32> = s.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        // Rows 3 and 4 are more than √2 away from both means, so a zero "mean" (distance 1) would
        // win without the penalty.
        assert_eq!(pred, vec![0, 2, 0, 2]);
        let unpenalised = nme_scores(&f, &means, &penalty.zeros_like().unwrap())
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(unpenalised[2], 1);
        // Score = −‖f/‖f‖ − μ‖².
        let row0: Vec<f32> = s.get(0).unwrap().to_vec1().unwrap();
        let n = (25.0f32 + 0.25).sqrt();
        let want = -((5.0 / n - 1.0).powi(2) + (0.5 / n).powi(2));
        assert!((row0[0] - want).abs() < 1e-5, "{} vs {want}", row0[0]);
    }
}
