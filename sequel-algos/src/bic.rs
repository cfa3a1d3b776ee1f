//! BiC — Bias Correction (Wu, Chen, Wang, Ye, Liu, Guo & Fu, "Large Scale Incremental Learning",
//! CVPR 2019).
//!
//! Training on a new task `t` with `n` old and `m` new classes uses the task's data plus the
//! exemplars in memory, **minus a held-out validation split**, with
//!
//! `L = λ·L_d + (1 − λ)·L_c`,  `λ = n / (n + m)`,
//! `L_d = −Σ_{k ∈ old} π̂ₖ(x) log πₖ(x)`,  `π̂ = softmax(ẑ_old / T)`, `π = softmax(z_old / T)`
//!
//! where `ẑ` are the logits of the model at the start of the task (with its bias correction, as the
//! reference implementation's default `distill_after_bic`), `L_c` the cross-entropy of the labels
//! over the classes seen so far (the paper's classifier has no units for future classes; in
//! multi-head task-IL, over the sample's own head), and `T = 2`. The distillation is the paper's cross-entropy form (its gradient is the KL's) and is
//! not multiplied by `T²` (Mammoth multiplies it). On the first task `L = L_c`.
//!
//! **Bias correction.** After the task, two scalars act on the new classes' logits only:
//! `qₖ = α·oₖ + β` for `k` in the new task's units, `qₖ = oₖ` for the old ones, and `(α, β)`
//! are fitted to the cross-entropy of `softmax(q)` over the classes seen so far **on the validation
//! split only** (the model frozen), from `(1, 0)`, by `bias_epochs` Adam steps of rate `bias_lr`,
//! the split as one batch. Mammoth runs 250 epochs at 0.001, but over a split of 10 % of all the
//! training data in minibatches — tens of thousands of steps, a converged fit. The balanced split
//! here is a few dozen samples, one step per epoch, so the default rate is 0.05: at 0.001 the fit
//! moves `(α, β)` by at most ≈ 0.25 and leaves most of the bias (measured on split Fashion-MNIST,
//! M = 200, seed 0: 38.9 % class-IL at 0.001, 52.9 % with 5000 steps at 0.001, 53.9 % at 0.05).
//! Evaluation applies the latest task's correction ([`Algorithm::predict`]); earlier tasks'
//! corrections are dropped, as in the paper.
//!
//! **Validation split** (task `t ≥ 1`): with `k_min` the fewest exemplars of an old class in
//! memory, `v = max(1, ⌊val_fraction · k_min⌋)` samples per class are held out — drawn from the
//! memory for each old class and from the task's data for each new class — so old and new
//! classes are equally represented (the paper's balanced validation set). They are never trained
//! on during the task. The memory (class-balanced, filled at task end) later receives the task's
//! samples, held-out ones included.
//!
//! Designed for class-IL. In task-IL evaluation is within a task's units, where a correction with
//! `α > 0` changes nothing; in multi-head task-IL the distillation softmax spans the old heads.

use std::ops::Range;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::algorithm::task_samples;
use sequel_core::buffer::{BufferPolicy, InsertAt};
use sequel_core::data::{Batch, GatherBuf, SampleRef, Split};
use sequel_core::model::{Model, ModelOutput};
use sequel_core::{
    Algorithm, AlgorithmConfig, EvalCtx, Memory, MemoryConfig, Result, StateIo, StepCtx, TaskCtx,
};

use crate::check;

/// YAML keys of `algorithm: { name: bic, ... }`, besides the memory's (`buffer_size: 200`,
/// `buffer_policy: class_balanced`, `insert: task_end`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BicConfig {
    /// Distillation temperature T.
    pub temperature: f64,
    /// Fraction of each old class's exemplars held out for the bias correction.
    pub val_fraction: f64,
    /// Adam steps of the bias fit, each over the whole validation split.
    pub bias_epochs: usize,
    /// Adam's learning rate for the bias fit.
    pub bias_lr: f64,
    #[serde(skip)]
    pub memory: MemoryConfig,
}

impl Default for BicConfig {
    fn default() -> Self {
        Self {
            temperature: 2.0,
            val_fraction: 0.1,
            bias_epochs: 250,
            bias_lr: 0.05,
            memory: MemoryConfig {
                buffer_size: 200,
                buffer_policy: BufferPolicy::ClassBalanced,
                insert: InsertAt::TaskEnd,
            },
        }
    }
}

impl AlgorithmConfig for BicConfig {
    const NAME: &'static str = "bic";
    const SUMMARY: &'static str = "BiC: exemplars + distillation, then alpha*o + beta on the new classes' logits fitted on a held-out split (Wu et al. 2019)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Bic::new(self)?))
    }
    fn memory(&mut self) -> Option<&mut MemoryConfig> {
        Some(&mut self.memory)
    }
}

/// A fitted correction: `α·o + β` on `units`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bias {
    pub units: Range<usize>,
    pub alpha: f64,
    pub beta: f64,
}

pub struct Bic {
    cfg: BicConfig,
    memory: Memory,
    /// The model at the start of the task (rebuilt by `before_task`).
    teacher: Option<Box<dyn Model>>,
    /// The latest task's correction.
    bias: Option<Bias>,
    /// The current task's held-out validation samples.
    val: Vec<SampleRef>,
}

impl Bic {
    pub fn new(cfg: BicConfig) -> Result<Self> {
        check::positive("temperature", cfg.temperature)?;
        check::unit_interval("val_fraction", cfg.val_fraction)?;
        check::non_negative("bias_lr", cfg.bias_lr)?;
        if cfg.memory.insert != InsertAt::TaskEnd {
            return Err(check::invalid(
                "insert",
                "bic keeps exemplars of finished tasks: must be `task_end`".into(),
            ));
        }
        Ok(Self {
            memory: Memory::new(cfg.memory, false)?,
            cfg,
            teacher: None,
            bias: None,
            val: Vec::new(),
        })
    }

    /// The correction applied at evaluation.
    pub fn bias(&self) -> Option<&Bias> {
        self.bias.as_ref()
    }

    /// The held-out samples of the current (or last) task.
    pub fn validation(&self) -> &[SampleRef] {
        &self.val
    }
}

/// `z` with `α·z + β` on the columns of `b.units`.
pub fn correct(z: &Tensor, b: &Bias) -> Result<Tensor> {
    let r = &b.units;
    let units = z.dim(D::Minus1)?;
    let mut parts = Vec::new();
    if r.start > 0 {
        parts.push(z.narrow(1, 0, r.start)?);
    }
    parts.push(((z.narrow(1, r.start, r.len())? * b.alpha)? + b.beta)?);
    if r.end < units {
        parts.push(z.narrow(1, r.end, units - r.end)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Mean cross-entropy over rows of `z` (logits of the seen units) with `α·z + β` on `new`, and
/// its gradient in `(α, β)`.
fn objective(z: &[Vec<f32>], y: &[u32], new: &Range<usize>, a: f64, b: f64) -> (f64, [f64; 2]) {
    let (mut f, mut g) = (0.0, [0.0; 2]);
    for (row, &t) in z.iter().zip(y) {
        let q: Vec<f64> = row
            .iter()
            .enumerate()
            .map(|(k, &o)| {
                if new.contains(&k) {
                    a * o as f64 + b
                } else {
                    o as f64
                }
            })
            .collect();
        let max = q.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = q.iter().map(|v| (v - max).exp()).sum();
        f += sum.ln() + max - q[t as usize];
        // ∂/∂(α, β) = Σ_{k ∈ new} pₖ·(oₖ, 1) − [y ∈ new]·(o_y, 1).
        for k in new.clone() {
            let p = (q[k] - max).exp() / sum;
            g[0] += p * row[k] as f64;
            g[1] += p;
        }
        if new.contains(&(t as usize)) {
            g[0] -= row[t as usize] as f64;
            g[1] -= 1.0;
        }
    }
    let n = z.len().max(1) as f64;
    (f / n, [g[0] / n, g[1] / n])
}

/// `(α, β)` fitted on the rows `z` (seen units) against `y` with the correction on `new`: `steps`
/// Adam steps (β₁ = 0.9, β₂ = 0.999, ε = 1e-8) of rate `lr` on the mean cross-entropy over all
/// rows, from `(1, 0)`.
pub fn fit_bias(z: &[Vec<f32>], y: &[u32], new: Range<usize>, steps: usize, lr: f64) -> (f64, f64) {
    let (mut x, mut m, mut v) = ([1.0, 0.0], [0.0; 2], [0.0; 2]);
    for step in 1..=steps {
        let (_, g) = objective(z, y, &new, x[0], x[1]);
        for i in 0..2 {
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
            let mh = m[i] / (1.0 - 0.9f64.powi(step as i32));
            let vh = v[i] / (1.0 - 0.999f64.powi(step as i32));
            x[i] -= lr * mh / (vh.sqrt() + 1e-8);
        }
    }
    (x[0], x[1])
}

impl Algorithm for Bic {
    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.teacher = if ctx.task > 0 {
            Some(ctx.model.fork()?)
        } else {
            None
        };
        Ok(())
    }

    fn trains_on_the_stream(&self) -> bool {
        false
    }

    fn training_samples(&mut self, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        self.val.clear();
        let own = task_samples(ctx.stream, ctx.task);
        let buffer = match self.memory.buffer() {
            Some(b) if ctx.task > 0 && !b.is_empty() => b,
            _ => return Ok(own),
        };
        // Exemplars per old unit, then v per class from each.
        let mut by_unit: std::collections::BTreeMap<u32, Vec<SampleRef>> = Default::default();
        for i in 0..buffer.len() {
            by_unit
                .entry(buffer.unit(i))
                .or_default()
                .push(buffer.sample(i));
        }
        let k_min = by_unit.values().map(Vec::len).min().unwrap_or(0);
        let v = ((self.cfg.val_fraction * k_min as f64).floor() as usize).max(1);
        let mut train = Vec::new();
        let mut hold = |mut group: Vec<SampleRef>, rng: &mut sequel_core::rng::SeededRng| {
            rng.shuffle(&mut group);
            let cut = v.min(group.len().saturating_sub(1));
            self.val.extend_from_slice(&group[..cut]);
            train.extend_from_slice(&group[cut..]);
        };
        let s = ctx.stream;
        let mut new_units: std::collections::BTreeMap<u32, Vec<SampleRef>> = Default::default();
        for r in own {
            let u = s.unit(ctx.task, s.dataset.train.labels[r.index as usize]);
            new_units.entry(u).or_default().push(r);
        }
        for group in by_unit.into_values().chain(new_units.into_values()) {
            hold(group, ctx.rng);
        }
        Ok(train)
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let f = ctx.forward(&[batch])?;
        let (old, seen) = {
            let r = &ctx.stream.tasks[ctx.task].units;
            (r.start, r.end)
        };
        // The paper's classifier has the seen classes only: the softmax spans them.
        let ce = if ctx.stream.mask_in_training() {
            ctx.task_loss(&f.out.logits, batch)?
        } else {
            candle_nn::loss::cross_entropy(&f.out.logits.narrow(1, 0, seen)?, &batch.y)?
        };
        let Some(teacher) = self.teacher.as_ref().filter(|_| old > 0) else {
            return Ok(ce);
        };
        let mut zt = sequel_core::model::forward_batch(teacher.as_ref(), batch, false)?
            .logits
            .detach();
        ctx.charge(batch.len(), 0);
        if let Some(b) = &self.bias {
            zt = correct(&zt, b)?;
        }
        let t = self.cfg.temperature;
        let q = candle_nn::ops::softmax(&(zt.narrow(1, 0, old)? / t)?, D::Minus1)?;
        let log_p =
            candle_nn::ops::log_softmax(&(f.out.logits.narrow(1, 0, old)? / t)?, D::Minus1)?;
        let distill = (q * log_p)?.sum(D::Minus1)?.mean_all()?.neg()?;
        let (n, m) = (old as f64, ctx.stream.tasks[ctx.task].units.len() as f64);
        let lambda = n / (n + m);
        Ok(((distill * lambda)? + (ce * (1.0 - lambda))?)?)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.teacher = None;
        if ctx.task == 0 || self.val.is_empty() {
            return Ok(());
        }
        let new = ctx.stream.tasks[ctx.task].units.clone();
        let (mut z, mut y) = (Vec::new(), Vec::new());
        let mut buf = GatherBuf::default();
        for chunk in self.val.chunks(256) {
            let b = ctx
                .stream
                .gather(chunk, Split::Train, &mut buf, ctx.device)?;
            let logits = ctx
                .model
                .forward(&b.x, false)?
                .logits
                .narrow(1, 0, new.end)?;
            z.extend(logits.to_vec2::<f32>()?);
            y.extend_from_slice(&b.units);
        }
        let (alpha, beta) = fit_bias(&z, &y, new.clone(), self.cfg.bias_epochs, self.cfg.bias_lr);
        self.bias = Some(Bias {
            units: new,
            alpha,
            beta,
        });
        Ok(())
    }

    fn predict(&self, out: &ModelOutput, _task: usize, _ctx: &EvalCtx) -> Result<Option<Tensor>> {
        self.bias
            .as_ref()
            .map(|b| correct(&out.logits, b))
            .transpose()
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        let mut v = self
            .bias
            .as_ref()
            .map(|b| vec![b.units.start as f64, b.units.end as f64, b.alpha, b.beta]);
        io.field("bias", &mut v)?;
        if io.is_loading() {
            self.bias = v.filter(|v| v.len() == 4).map(|v| Bias {
                units: v[0] as usize..v[1] as usize,
                alpha: v[2],
                beta: v[3],
            });
        }
        Ok(())
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn identity_correction_leaves_the_logits_unchanged() {
        let z = Tensor::new(
            &[[1f32, -2.0, 3.0, 0.5], [0.0, 4.0, -1.0, 2.0]],
            &Device::Cpu,
        )
        .unwrap();
        let id = Bias {
            units: 2..4,
            alpha: 1.0,
            beta: 0.0,
        };
        assert_eq!(
            correct(&z, &id).unwrap().to_vec2::<f32>().unwrap(),
            z.to_vec2::<f32>().unwrap()
        );
        let b = Bias {
            units: 2..4,
            alpha: 0.5,
            beta: -1.0,
        };
        let c = correct(&z, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            c,
            vec![vec![1.0, -2.0, 0.5, -0.75], vec![0.0, 4.0, -1.5, 0.0]]
        );
        let first = Bias {
            units: 0..2,
            alpha: 2.0,
            beta: 1.0,
        };
        let c = correct(&z, &first).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(c[0], vec![3.0, -3.0, 3.0, 0.5]);
    }

    #[test]
    fn the_fit_descends_the_validation_cross_entropy() {
        // New units 2–3 are inflated by 3 and scaled ×2: old-class samples are misclassified.
        let mut rng = sequel_core::rng::SeededRng::new(5, sequel_core::rng::Stream::Subset);
        let (mut z, mut y) = (Vec::new(), Vec::new());
        for i in 0..200 {
            let t = (i % 4) as u32;
            let mut row: Vec<f32> = (0..4).map(|_| rng.normal()).collect();
            row[t as usize] += 2.0;
            for v in &mut row[2..] {
                *v = 2.0 * *v + 3.0;
            }
            z.push(row);
            y.push(t);
        }
        assert_eq!(fit_bias(&z, &y, 2..4, 0, 0.001), (1.0, 0.0));
        let (a, b) = fit_bias(&z, &y, 2..4, 250, 0.001);
        let (f0, g0) = objective(&z, &y, &(2..4), 1.0, 0.0);
        let (f, _) = objective(&z, &y, &(2..4), a, b);
        assert!(f < f0 - 0.1, "{f} vs {f0}");
        // The gradient at (1, 0) asks for a smaller scale and shift; Adam's first steps move by
        // ≈ lr each, so after 250 steps both moved by about 0.25 in that direction.
        assert!(g0[0] > 0.0 && g0[1] > 0.0);
        assert!(
            (a - 0.75).abs() < 0.05 && (b + 0.25).abs() < 0.05,
            "{a} {b}"
        );
        // The analytic gradient is the objective's (central differences).
        let (_, g) = objective(&z, &y, &(2..4), a, b);
        let h = 1e-5;
        let da = (objective(&z, &y, &(2..4), a + h, b).0 - objective(&z, &y, &(2..4), a - h, b).0)
            / (2.0 * h);
        let db = (objective(&z, &y, &(2..4), a, b + h).0 - objective(&z, &y, &(2..4), a, b - h).0)
            / (2.0 * h);
        assert!(
            (g[0] - da).abs() < 1e-6 && (g[1] - db).abs() < 1e-6,
            "{g:?} vs {da} {db}"
        );
    }
}
