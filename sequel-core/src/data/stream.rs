//! Continual-learning task streams: split, permuted and rotated, in task-, class- or domain-IL.
//!
//! A task is a list of sample indices plus an input transform; no image is copied when the stream
//! is built. Batches are gathered by index into one reusable `f32` buffer, with the task's transform
//! (a pixel permutation or a precomputed bilinear rotation map) applied during the gather.
//!
//! Labels become *output units*: the index of the logit that must win. For split streams the unit
//! of a class is its position in the class order, so task `t` owns the contiguous units
//! `[t·k, (t+1)·k)` and task-IL masking is a slice. For permuted/rotated streams in class-IL or
//! multi-head task-IL each task gets its own block of `C` units; in domain-IL all tasks share `C`.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::augment::{check_against, AugmentationConfig, Augmenter};
use super::Dataset;
use crate::config::{BenchmarkConfig, ClassOrder, EvalSplit, Scenario, StreamKind, TaskIlHead};
use crate::error::{Error, Result};
use crate::rng::{RngState, SeededRng, Stream};

/// Input transform of a task.
#[derive(Debug, Clone)]
pub enum Transform {
    Identity,
    /// `out[p] = in[perm[p]]` within each channel.
    Permute(Arc<[u32]>),
    /// Bilinear rotation, precomputed: for every output pixel four source pixels and weights.
    Rotate(Arc<RotationMap>),
}

/// A bilinear rotation of an `H × W` image about its centre; pixels from outside the image are 0.
#[derive(Debug, Clone)]
pub struct RotationMap {
    pub degrees: f32,
    src: Vec<[u32; 4]>,
    weight: Vec<[f32; 4]>,
}

impl RotationMap {
    pub fn new(h: usize, w: usize, degrees: f32) -> Self {
        let (s, c) = (degrees.to_radians() as f64).sin_cos();
        let (cy, cx) = ((h as f64 - 1.0) / 2.0, (w as f64 - 1.0) / 2.0);
        let mut src = Vec::with_capacity(h * w);
        let mut weight = Vec::with_capacity(h * w);
        for y in 0..h {
            for x in 0..w {
                // Inverse mapping: where in the source does this output pixel come from?
                let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                let sx = c * dx + s * dy + cx;
                let sy = -s * dx + c * dy + cy;
                let (x0, y0) = (sx.floor(), sy.floor());
                let (fx, fy) = (sx - x0, sy - y0);
                let mut idx = [0u32; 4];
                let mut wt = [0f32; 4];
                let corners = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)];
                for (k, (ox, oy)) in corners.iter().enumerate() {
                    let (px, py) = (x0 + ox, y0 + oy);
                    let wk = (if *ox == 0.0 { 1.0 - fx } else { fx })
                        * (if *oy == 0.0 { 1.0 - fy } else { fy });
                    if px >= 0.0 && py >= 0.0 && (px as usize) < w && (py as usize) < h && wk > 0.0
                    {
                        idx[k] = (py as usize * w + px as usize) as u32;
                        wt[k] = wk as f32;
                    }
                }
                src.push(idx);
                weight.push(wt);
            }
        }
        Self {
            degrees,
            src,
            weight,
        }
    }
}

/// One task of the stream.
#[derive(Debug, Clone)]
pub struct Task {
    /// 0-based task index.
    pub id: usize,
    /// Original dataset labels that occur in this task.
    pub classes: Vec<u16>,
    /// Output units this task's labels map to (what task-IL restricts the head to).
    pub units: Range<usize>,
    /// Indices into the dataset's training split.
    pub train: Vec<u32>,
    /// Indices into the training split held out for validation.
    pub valid: Vec<u32>,
    /// Indices into the dataset's test split.
    pub test: Vec<u32>,
    pub transform: Transform,
}

/// Which dataset split a sample index refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// A sample of the stream: which task's view (transform, label map) of which dataset sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleRef {
    pub task: u32,
    pub index: u32,
}

/// A minibatch on the device, with its host-side bookkeeping.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Inputs, `B × C × H × W`, f32.
    pub x: Tensor,
    /// Target output units, `B`, u32.
    pub y: Tensor,
    /// The same targets on the host.
    pub units: Vec<u32>,
    /// Task of each sample.
    pub tasks: Vec<u32>,
    /// Where each sample comes from (what a replay buffer stores).
    pub refs: Vec<SampleRef>,
    /// The first `incoming` samples come from the stream; the rest were appended by the
    /// algorithm (replay). Buffers insert, and training metrics count, only the incoming ones.
    pub incoming: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.units.len()
    }

    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// This batch followed by `other`'s samples, which count as replayed (not incoming).
    pub fn append(&self, other: &Batch) -> Result<Batch> {
        if other.is_empty() {
            return Ok(self.clone());
        }
        let cat = |a: &[u32], b: &[u32]| [a, b].concat();
        Ok(Batch {
            x: Tensor::cat(&[&self.x, &other.x], 0)?,
            y: Tensor::cat(&[&self.y, &other.y], 0)?,
            units: cat(&self.units, &other.units),
            tasks: cat(&self.tasks, &other.tasks),
            refs: [self.refs.as_slice(), other.refs.as_slice()].concat(),
            incoming: self.incoming,
        })
    }

    /// Samples `start..start + len` as a batch of their own (incoming as far as they were).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Batch> {
        let r = start..start + len;
        Ok(Batch {
            x: self.x.narrow(0, start, len)?,
            y: self.y.narrow(0, start, len)?,
            units: self.units[r.clone()].to_vec(),
            tasks: self.tasks[r.clone()].to_vec(),
            refs: self.refs[r].to_vec(),
            incoming: self.incoming.saturating_sub(start).min(len),
        })
    }

    /// The task shared by every sample, if there is one.
    pub fn single_task(&self) -> Option<u32> {
        let first = *self.tasks.first()?;
        self.tasks.iter().all(|&t| t == first).then_some(first)
    }
}

/// The whole stream of tasks over one dataset.
#[derive(Debug, Clone)]
pub struct TaskStream {
    pub dataset: Arc<Dataset>,
    pub kind: StreamKind,
    pub scenario: Scenario,
    pub task_il_head: TaskIlHead,
    pub tasks: Vec<Task>,
    /// Whether `tasks[0]` is the pre-training task of `benchmark.base_classes`: trained before
    /// the stream with the plain step and evaluated after every stream task as a control task.
    pub control: bool,
    /// Number of output units the model needs.
    pub num_units: usize,
    /// Where each dataset label goes within its task's block of units.
    unit_of_class: Vec<u16>,
    /// Per-channel (shift, scale): x_norm = (x/255 − shift)·scale.
    norm: Vec<(f32, f32)>,
    pub eval_on: EvalSplit,
    /// Training-time random crop and flip (see [`TaskStream::gather_train`]).
    augment: Option<Augmenter>,
}

/// Buffers reused across gathers so the hot path does not allocate.
#[derive(Debug, Default)]
pub struct GatherBuf {
    x: Vec<f32>,
    units: Vec<u32>,
    tasks: Vec<u32>,
    scratch: Vec<f32>,
}

impl TaskStream {
    /// Build the stream that `cfg` describes. `seed` is the experiment seed.
    pub fn build(dataset: Arc<Dataset>, cfg: &BenchmarkConfig, seed: u64) -> Result<Self> {
        let nc = dataset.num_classes;
        let t = cfg.tasks;
        let kind = cfg.kind;
        let bad = |m: String| Error::Benchmark(m);
        if t == 0 {
            return Err(bad("benchmark.tasks: must be at least 1".into()));
        }
        let [c, h, w] = dataset.train.shape;

        // Class order and per-task classes.
        let (task_classes, unit_of_class, unit_ranges, num_units) = match kind {
            StreamKind::Split => {
                let order: Vec<u16> = if let Some(list) = &cfg.classes {
                    let mut sorted = list.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    if sorted.len() != list.len() || list.iter().any(|&k| k as usize >= nc) {
                        return Err(bad(format!(
                            "benchmark.classes: must list distinct classes in 0..{nc}, found {list:?}"
                        )));
                    }
                    list.clone()
                } else {
                    let mut o: Vec<u16> = (0..nc as u16).collect();
                    if cfg.class_order == ClassOrder::Seeded {
                        SeededRng::new(seed, Stream::ClassOrder).shuffle(&mut o);
                    }
                    o
                };
                // With `base_classes: n`, the first n classes form the pre-training (control)
                // task 0 and the stream's `tasks` tasks share the rest.
                let base = cfg.base_classes.unwrap_or(0);
                if base > 0 && base >= order.len() {
                    return Err(bad(format!(
                        "benchmark.base_classes: {base} base classes leave none of the {} classes of {} for the stream; lower benchmark.base_classes",
                        order.len(), dataset.name
                    )));
                }
                let (head, order) = order.split_at(base);
                let k = match cfg.classes_per_task {
                    Some(k) => {
                        if k == 0 || k * t > order.len() {
                            return Err(bad(format!(
                                "benchmark.classes_per_task: {t} tasks × {k} classes per task need {} classes, but {} has {}; lower benchmark.tasks or benchmark.classes_per_task",
                                t * k, dataset.name, order.len()
                            )));
                        }
                        k
                    }
                    None => {
                        if order.len() % t != 0 {
                            let divisors: Vec<String> = (1..=order.len())
                                .filter(|d| order.len() % d == 0)
                                .map(|d| d.to_string())
                                .collect();
                            let left = if base > 0 {
                                " left after benchmark.base_classes"
                            } else {
                                ""
                            };
                            return Err(bad(format!(
                                "benchmark.tasks: {t} tasks do not divide the {} classes of {}{left}; use one of {} or set benchmark.classes_per_task",
                                order.len(), dataset.name, divisors.join(", ")
                            )));
                        }
                        order.len() / t
                    }
                };
                let mut unit_of_class = vec![u16::MAX; nc];
                let domain = cfg.scenario == Scenario::DomainIl;
                for (pos, &cls) in head.iter().chain(order).enumerate().take(base + t * k) {
                    unit_of_class[cls as usize] =
                        if domain { (pos % k) as u16 } else { pos as u16 };
                }
                let base_task = (base > 0).then(|| head.to_vec());
                let classes: Vec<Vec<u16>> = base_task
                    .into_iter()
                    .chain((0..t).map(|i| order[i * k..(i + 1) * k].to_vec()))
                    .collect();
                let base_range = (base > 0).then_some(0..base);
                let ranges: Vec<Range<usize>> = base_range
                    .into_iter()
                    .chain((0..t).map(|i| {
                        if domain {
                            0..k
                        } else {
                            base + i * k..base + (i + 1) * k
                        }
                    }))
                    .collect();
                let units = if domain { k } else { base + t * k };
                (classes, unit_of_class, ranges, units)
            }
            StreamKind::Permuted | StreamKind::Rotated => {
                let all: Vec<u16> = (0..nc as u16).collect();
                let shared = cfg.scenario == Scenario::DomainIl;
                let ranges: Vec<Range<usize>> = (0..t)
                    .map(|i| if shared { 0..nc } else { i * nc..(i + 1) * nc })
                    .collect();
                (
                    vec![all.clone(); t],
                    all,
                    ranges,
                    if shared { nc } else { t * nc },
                )
            }
        };

        // Transforms.
        let transforms: Vec<Transform> = match kind {
            StreamKind::Split => vec![Transform::Identity; task_classes.len()],
            StreamKind::Permuted => (0..t)
                .map(|i| {
                    if i == 0 && !cfg.permute_first_task {
                        Transform::Identity
                    } else {
                        let p = SeededRng::derived(seed, Stream::Permutation, i as u64)
                            .permutation(h * w);
                        Transform::Permute(p.into())
                    }
                })
                .collect(),
            StreamKind::Rotated => (0..t)
                .map(|i| {
                    let deg = match &cfg.angles {
                        Some(a) => a[i],
                        None => i as f32 * 180.0 / t as f32,
                    };
                    if deg == 0.0 {
                        Transform::Identity
                    } else {
                        Transform::Rotate(Arc::new(RotationMap::new(h, w, deg)))
                    }
                })
                .collect(),
        };

        // Sample indices per task, grouped by class in one pass.
        let by_class = |labels: &[u16]| {
            let mut v: Vec<Vec<u32>> = vec![Vec::new(); nc];
            for (i, &l) in labels.iter().enumerate() {
                v[l as usize].push(i as u32);
            }
            v
        };
        let train_by_class = by_class(&dataset.train.labels);
        let test_by_class = by_class(&dataset.test.labels);
        let n_train = dataset.train.len();
        let mut held_out = vec![false; n_train];
        let shared_valid: Option<Vec<u32>> =
            (kind != StreamKind::Split && cfg.validation_fraction > 0.0).then(|| {
                let mut all: Vec<u32> = (0..n_train as u32).collect();
                SeededRng::derived(seed, Stream::Subset, 1 << 20).shuffle(&mut all);
                all.truncate(((n_train as f64) * cfg.validation_fraction as f64).round() as usize);
                for &i in &all {
                    held_out[i as usize] = true;
                }
                all
            });
        let mut tasks = Vec::with_capacity(t);
        for (i, classes) in task_classes.into_iter().enumerate() {
            let gather = |groups: &[Vec<u32>]| {
                let mut v: Vec<u32> = classes
                    .iter()
                    .flat_map(|&k| groups[k as usize].iter().copied())
                    .collect();
                v.sort_unstable();
                v
            };
            let mut train = gather(&train_by_class);
            let test = gather(&test_by_class);
            // Held-out samples first, so that no task ever trains on another task's validation
            // images (permuted/rotated tasks share their base images: one shared held-out set).
            let fraction = cfg.validation_fraction as f64;
            let mut valid: Vec<u32> = match &shared_valid {
                Some(v) => {
                    train.retain(|i| !held_out[*i as usize]);
                    v.clone()
                }
                None if fraction > 0.0 => {
                    let n_valid = ((train.len() as f64) * fraction).round() as usize;
                    let mut rng = SeededRng::derived(seed, Stream::Subset, (1 << 20) + i as u64);
                    rng.shuffle(&mut train);
                    let v = train.split_off(train.len() - n_valid);
                    train.sort_unstable();
                    v
                }
                None => Vec::new(),
            };
            if let Some(n) = cfg.train_subset {
                if n < train.len() {
                    let mut rng = SeededRng::derived(seed, Stream::Subset, i as u64);
                    rng.shuffle(&mut train);
                    train.truncate(n);
                    train.sort_unstable();
                }
                // Keep the validation set in proportion to the training subset.
                let cap = ((n as f64) * fraction / (1.0 - fraction)).round() as usize;
                valid.truncate(cap.max(1));
            }
            valid.sort_unstable();
            if fraction > 0.0 && valid.is_empty() {
                return Err(bad(format!(
                    "benchmark.validation_fraction: task {} gets no validation samples; raise benchmark.validation_fraction or benchmark.train_subset",
                    i + 1
                )));
            }
            if train.is_empty() {
                return Err(bad(format!(
                    "benchmark: task {} has no training samples; raise benchmark.train_subset or lower benchmark.validation_fraction",
                    i + 1
                )));
            }
            tasks.push(Task {
                id: i,
                classes,
                units: unit_ranges[i].clone(),
                train,
                valid,
                test,
                transform: transforms[i].clone(),
            });
        }

        let norm = (0..c)
            .map(|ch| {
                if cfg.normalize {
                    let sd = dataset.std.get(ch).copied().unwrap_or(1.0).max(1e-6);
                    (dataset.mean.get(ch).copied().unwrap_or(0.0), 1.0 / sd)
                } else {
                    (0.0, 1.0)
                }
            })
            .collect();

        Ok(Self {
            dataset,
            kind,
            control: cfg.base_classes.is_some_and(|n| n > 0),
            scenario: cfg.scenario,
            task_il_head: cfg.task_il_head,
            tasks,
            num_units,
            unit_of_class,
            norm,
            eval_on: cfg.eval_on,
            augment: None,
        })
    }

    /// Apply the `augmentation:` section: its normalisation (training and evaluation) replaces
    /// `benchmark.normalize`'s, and its crop and flip, drawn from the experiment seed's
    /// augmentation stream, apply to [`TaskStream::gather_train`].
    ///
    /// # Errors
    /// A value that does not fit the input shape (a crop padding larger than the image, a mean
    /// per channel missing), as [`Error::Config`] naming the key under `augmentation.`.
    pub fn with_augmentation(mut self, cfg: &AugmentationConfig, seed: u64) -> Result<Self> {
        check_against(cfg, self.input_shape())?;
        if let Some(n) = &cfg.normalize {
            self.norm = n
                .mean
                .iter()
                .zip(&n.std)
                .map(|(&m, &s)| (m, 1.0 / s))
                .collect();
        }
        self.augment = Augmenter::new(cfg, seed);
        Ok(self)
    }

    /// The augmentation stream's position, when the stream augments (for checkpoints).
    pub fn augment_state(&self) -> Option<RngState> {
        self.augment.as_ref().map(Augmenter::state)
    }

    /// Restore the augmentation stream's position from a checkpoint.
    pub fn set_augment_state(&self, s: RngState) {
        if let Some(a) = &self.augment {
            a.set_state(s);
        }
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Index of the stream's first task: 1 when `tasks[0]` is the pre-training (control) task,
    /// else 0.
    pub fn first(&self) -> usize {
        usize::from(self.control)
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// `[C, H, W]` of every input.
    pub fn input_shape(&self) -> [usize; 3] {
        self.dataset.train.shape
    }

    /// The output unit a label of `task` must activate.
    pub fn unit(&self, task: usize, label: u16) -> u32 {
        let t = &self.tasks[task];
        let within = self.unit_of_class[label as usize] as usize;
        match self.kind {
            StreamKind::Split => within as u32,
            _ => (t.units.start + within) as u32,
        }
    }

    /// Evaluation indices of a task (test or validation, as configured) and the split they index.
    pub fn eval_indices(&self, task: usize) -> (&[u32], Split) {
        match self.eval_on {
            EvalSplit::Test => (&self.tasks[task].test, Split::Test),
            EvalSplit::Validation => (&self.tasks[task].valid, Split::Train),
        }
    }

    /// [`Self::eval_indices`] as sample references of task `task`, ready to gather.
    pub fn eval_refs(&self, task: usize) -> (Vec<SampleRef>, Split) {
        let (indices, split) = self.eval_indices(task);
        let refs = indices
            .iter()
            .map(|&index| SampleRef {
                task: task as u32,
                index,
            })
            .collect();
        (refs, split)
    }

    /// Output units of each head of the model: one per task when logits are restricted to the
    /// task's units in training (multi-head), else a single shared head.
    pub fn head_sizes(&self) -> Vec<usize> {
        if self.mask_in_training() {
            self.tasks.iter().map(|t| t.units.len()).collect()
        } else {
            vec![self.num_units]
        }
    }

    /// Whether logits are restricted to the task's units when training.
    pub fn mask_in_training(&self) -> bool {
        self.scenario == Scenario::TaskIl && self.task_il_head == TaskIlHead::Multi
    }

    /// Whether logits are restricted to the task's units when evaluating.
    pub fn mask_in_eval(&self) -> bool {
        self.scenario == Scenario::TaskIl
    }

    /// Gather samples into a batch on `device`, reusing `buf`'s storage: the inputs as they are
    /// evaluated (task transform and normalisation, never augmented).
    pub fn gather(
        &self,
        refs: &[SampleRef],
        split: Split,
        buf: &mut GatherBuf,
        device: &Device,
    ) -> Result<Batch> {
        self.gather_with(refs, split, buf, device, false)
    }

    /// Gather training samples as they are trained on: [`TaskStream::gather`] followed by the
    /// configured random crop and flip of every sample (the same as `gather` when none is
    /// configured; then no random draw is made). The trainer gathers incoming batches this way,
    /// and a replay memory every batch it draws, so stored (non-augmented) samples are augmented
    /// afresh at each draw.
    pub fn gather_train(
        &self,
        refs: &[SampleRef],
        buf: &mut GatherBuf,
        device: &Device,
    ) -> Result<Batch> {
        self.gather_with(refs, Split::Train, buf, device, true)
    }

    fn gather_with(
        &self,
        refs: &[SampleRef],
        split: Split,
        buf: &mut GatherBuf,
        device: &Device,
        augment: bool,
    ) -> Result<Batch> {
        let set = match split {
            Split::Train => &self.dataset.train,
            Split::Test => &self.dataset.test,
        };
        let [c, h, w] = set.shape;
        let plane = h * w;
        let d = c * plane;
        buf.x.clear();
        buf.x.resize(refs.len() * d, 0.0);
        buf.units.clear();
        buf.tasks.clear();
        for (row, r) in refs.iter().enumerate() {
            let task = &self.tasks[r.task as usize];
            let src = set.sample(r.index as usize);
            let out = &mut buf.x[row * d..(row + 1) * d];
            for ch in 0..c {
                let (shift, scale) = self.norm[ch];
                let s = &src[ch * plane..(ch + 1) * plane];
                let o = &mut out[ch * plane..(ch + 1) * plane];
                let px = |v: f32| (v * (1.0 / 255.0) - shift) * scale;
                match &task.transform {
                    Transform::Identity => {
                        for (o, &v) in o.iter_mut().zip(s) {
                            *o = px(v as f32);
                        }
                    }
                    Transform::Permute(p) => {
                        for (o, &j) in o.iter_mut().zip(p.iter()) {
                            *o = px(s[j as usize] as f32);
                        }
                    }
                    Transform::Rotate(m) => {
                        for ((o, idx), wt) in o.iter_mut().zip(&m.src).zip(&m.weight) {
                            let v: f32 = (0..4).map(|k| wt[k] * s[idx[k] as usize] as f32).sum();
                            *o = px(v);
                        }
                    }
                }
            }
            buf.units
                .push(self.unit(r.task as usize, set.labels[r.index as usize]));
            buf.tasks.push(r.task);
        }
        if let (true, Some(a)) = (augment, &self.augment) {
            // A zero pixel (the crop's padding) after normalisation.
            let fill: Vec<f32> = self.norm.iter().map(|&(m, s)| -m * s).collect();
            a.apply(&mut buf.x, [c, h, w], &fill, &mut buf.scratch);
        }
        let x = Tensor::from_slice(&buf.x, (refs.len(), c, h, w), device)?;
        let y = Tensor::from_slice(&buf.units, refs.len(), device)?;
        Ok(Batch {
            x,
            y,
            units: buf.units.clone(),
            tasks: buf.tasks.clone(),
            refs: refs.to_vec(),
            incoming: refs.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageSet;

    /// 10 classes, 4 train + 2 test images per class, 1×4×4, pixel value = label·10 + sample.
    fn toy() -> Arc<Dataset> {
        let mk = |per: usize| {
            let mut images = Vec::new();
            let mut labels = Vec::new();
            for i in 0..10 * per {
                let l = (i % 10) as u16;
                labels.push(l);
                images.extend((0..16).map(|p| (l as usize * 10 + p) as u8));
            }
            ImageSet {
                images,
                labels,
                shape: [1, 4, 4],
            }
        };
        Arc::new(Dataset {
            name: "toy".into(),
            train: mk(4),
            test: mk(2),
            num_classes: 10,
            mean: vec![0.5],
            std: vec![0.25],
        })
    }

    fn cfg(kind: StreamKind, scenario: Scenario, tasks: usize) -> BenchmarkConfig {
        let yaml = format!(
            "{{ dataset: toy, kind: {}, tasks: {tasks}, scenario: {} }}",
            serde_yaml::to_string(&kind).unwrap().trim(),
            serde_yaml::to_string(&scenario).unwrap().trim()
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    #[test]
    fn split_fixed_order_assigns_contiguous_units() {
        let s = TaskStream::build(toy(), &cfg(StreamKind::Split, Scenario::ClassIl, 5), 0).unwrap();
        assert_eq!(s.num_units, 10);
        assert_eq!(s.tasks[1].classes, vec![2, 3]);
        assert_eq!(s.tasks[1].units, 2..4);
        assert_eq!(s.tasks[1].train.len(), 8);
        assert_eq!(s.tasks[1].test.len(), 4);
        for t in &s.tasks {
            for &i in &t.train {
                let u = s.unit(t.id, s.dataset.train.labels[i as usize]) as usize;
                assert!(t.units.contains(&u));
            }
        }
    }

    #[test]
    fn seeded_class_order_depends_on_seed_only() {
        let mut c = cfg(StreamKind::Split, Scenario::ClassIl, 5);
        c.class_order = ClassOrder::Seeded;
        let a = TaskStream::build(toy(), &c, 1).unwrap();
        let b = TaskStream::build(toy(), &c, 1).unwrap();
        let other = TaskStream::build(toy(), &c, 2).unwrap();
        let classes = |s: &TaskStream| {
            s.tasks
                .iter()
                .map(|t| t.classes.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(classes(&a), classes(&b));
        assert_ne!(classes(&a), classes(&other));
    }

    #[test]
    fn tasks_that_do_not_divide_classes_are_an_error() {
        let e =
            TaskStream::build(toy(), &cfg(StreamKind::Split, Scenario::ClassIl, 3), 0).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("3 tasks do not divide the 10 classes"), "{m}");
        assert!(m.contains("1, 2, 5, 10"), "{m}");
    }

    #[test]
    fn domain_il_split_shares_units() {
        let s =
            TaskStream::build(toy(), &cfg(StreamKind::Split, Scenario::DomainIl, 5), 0).unwrap();
        assert_eq!(s.num_units, 2);
        assert_eq!(s.unit(3, 7), 1);
        assert_eq!(s.unit(3, 6), 0);
    }

    #[test]
    fn permuted_gather_applies_each_tasks_permutation() {
        let s =
            TaskStream::build(toy(), &cfg(StreamKind::Permuted, Scenario::DomainIl, 3), 4).unwrap();
        assert_eq!(s.num_units, 10);
        let mut buf = GatherBuf::default();
        let dev = Device::Cpu;
        let refs: Vec<SampleRef> = (0..3).map(|t| SampleRef { task: t, index: 5 }).collect();
        let b = s.gather(&refs, Split::Train, &mut buf, &dev).unwrap();
        let x: Vec<Vec<f32>> = b.x.flatten_from(1).unwrap().to_vec2().unwrap();
        let raw: Vec<f32> = s
            .dataset
            .train
            .sample(5)
            .iter()
            .map(|&v| v as f32 * (1.0 / 255.0))
            .collect();
        let mut raw_sorted = raw.clone();
        raw_sorted.sort_by(f32::total_cmp);
        for (t, row) in x.iter().enumerate() {
            let mut sorted = row.clone();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(
                sorted, raw_sorted,
                "task {t} must permute, not change, the pixels"
            );
            assert_ne!(row, &raw, "task {t} should be permuted");
        }
        assert_ne!(x[1], x[2]);
        assert_eq!(b.units, vec![5, 5, 5]);
    }

    #[test]
    fn permuted_task_il_uses_separate_blocks() {
        let mut c = cfg(StreamKind::Permuted, Scenario::TaskIl, 3);
        c.task_il_head = TaskIlHead::Multi;
        let s = TaskStream::build(toy(), &c, 0).unwrap();
        assert_eq!(s.num_units, 30);
        assert_eq!(s.unit(2, 4), 24);
        assert!(s.mask_in_training());
    }

    #[test]
    fn rotation_by_zero_and_360_is_identity_and_90_moves_pixels() {
        let id = RotationMap::new(4, 4, 360.0);
        let img: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let apply = |m: &RotationMap| -> Vec<f32> {
            m.src
                .iter()
                .zip(&m.weight)
                .map(|(i, w)| (0..4).map(|k| w[k] * img[i[k] as usize]).sum())
                .collect()
        };
        let out = apply(&id);
        for (a, b) in out.iter().zip(&img) {
            assert!((a - b).abs() < 1e-3, "{out:?}");
        }
        let r90 = apply(&RotationMap::new(4, 4, 90.0));
        let mut sorted = r90.clone();
        sorted.sort_by(f32::total_cmp);
        for (a, b) in sorted.iter().zip(&img) {
            assert!(
                (a - b).abs() < 1e-3,
                "a 90° rotation of a square permutes its pixels"
            );
        }
        assert!(r90.iter().zip(&img).any(|(a, b)| (a - b).abs() > 0.5));
    }

    #[test]
    fn normalization_uses_dataset_statistics() {
        let mut c = cfg(StreamKind::Split, Scenario::ClassIl, 5);
        c.normalize = true;
        let s = TaskStream::build(toy(), &c, 0).unwrap();
        let mut buf = GatherBuf::default();
        let b = s
            .gather(
                &[SampleRef { task: 0, index: 0 }],
                Split::Train,
                &mut buf,
                &Device::Cpu,
            )
            .unwrap();
        let v: Vec<f32> = b.x.flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[0] - (0.0 - 0.5) / 0.25).abs() < 1e-6);
    }

    #[test]
    fn subset_and_validation_are_disjoint_and_seeded() {
        let mut c = cfg(StreamKind::Split, Scenario::ClassIl, 5);
        c.train_subset = Some(6);
        c.validation_fraction = 0.5;
        let s = TaskStream::build(toy(), &c, 3).unwrap();
        let t = &s.tasks[0];
        assert_eq!(
            (t.train.len(), t.valid.len()),
            (4, 4),
            "8 samples: 4 held out, 4 left (< subset 6)"
        );
        assert!(t.train.iter().all(|i| !t.valid.contains(i)));
        let again = TaskStream::build(toy(), &c, 3).unwrap();
        assert_eq!(again.tasks[0].train, t.train);
        c.train_subset = Some(2);
        let small = TaskStream::build(toy(), &c, 3).unwrap();
        assert_eq!(
            (small.tasks[0].train.len(), small.tasks[0].valid.len()),
            (2, 2),
            "validation kept in proportion"
        );
    }

    #[test]
    fn permuted_tasks_share_one_held_out_set() {
        let mut c = cfg(StreamKind::Permuted, Scenario::DomainIl, 3);
        c.validation_fraction = 0.25;
        let s = TaskStream::build(toy(), &c, 0).unwrap();
        assert_eq!(s.tasks[0].valid.len(), 10);
        for t in &s.tasks {
            assert_eq!(t.valid, s.tasks[0].valid);
            for other in &s.tasks {
                assert!(
                    other.train.iter().all(|i| !t.valid.contains(i)),
                    "validation image trained on"
                );
            }
        }
    }

    #[test]
    fn empty_validation_split_is_an_error() {
        let mut c = cfg(StreamKind::Split, Scenario::ClassIl, 5);
        c.validation_fraction = 0.01;
        let e = TaskStream::build(toy(), &c, 0).unwrap_err().to_string();
        assert!(e.contains("benchmark.validation_fraction"), "{e}");
    }

    fn augmentation(yaml: &str) -> AugmentationConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn pixels(b: &Batch) -> Vec<f32> {
        b.x.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn normalisation_is_exact_at_training_and_evaluation() {
        let a = augmentation("{ normalize: { mean: [0.25], std: [0.5] } }");
        let s = TaskStream::build(toy(), &cfg(StreamKind::Split, Scenario::ClassIl, 5), 0)
            .unwrap()
            .with_augmentation(&a, 0)
            .unwrap();
        let refs = [SampleRef { task: 1, index: 2 }];
        let raw: Vec<f32> = s
            .dataset
            .train
            .sample(2)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let want: Vec<f32> = raw.iter().map(|v| (v / 255.0 - 0.25) / 0.5).collect();
        let mut buf = GatherBuf::default();
        let train = pixels(&s.gather_train(&refs, &mut buf, &Device::Cpu).unwrap());
        let eval = pixels(
            &s.gather(&refs, Split::Train, &mut buf, &Device::Cpu)
                .unwrap(),
        );
        for got in [train, eval] {
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{got:?} vs {want:?}"
                );
            }
        }
        assert!(
            s.augment_state().is_none(),
            "no crop or flip: nothing to draw"
        );
    }

    #[test]
    fn training_gathers_are_augmented_and_evaluation_gathers_never() {
        let a = augmentation("{ random_crop: { padding: 2 }, horizontal_flip: 0.5 }");
        let s = TaskStream::build(toy(), &cfg(StreamKind::Split, Scenario::ClassIl, 5), 0)
            .unwrap()
            .with_augmentation(&a, 0)
            .unwrap();
        let refs: Vec<SampleRef> = (0..8).map(|i| SampleRef { task: 0, index: i }).collect();
        let mut buf = GatherBuf::default();
        let plain = pixels(
            &s.gather(&refs, Split::Train, &mut buf, &Device::Cpu)
                .unwrap(),
        );
        let before = s.augment_state();
        for split in [Split::Train, Split::Test] {
            let r: Vec<SampleRef> = refs
                .iter()
                .map(|r| SampleRef {
                    index: r.index % 4,
                    ..*r
                })
                .collect();
            s.gather(&r, split, &mut buf, &Device::Cpu).unwrap();
        }
        assert_eq!(
            s.augment_state(),
            before,
            "an evaluation gather drew augmentation"
        );
        let trained = pixels(&s.gather_train(&refs, &mut buf, &Device::Cpu).unwrap());
        assert_ne!(trained, plain);
        assert_ne!(s.augment_state(), before);
        // Labels and bookkeeping are untouched.
        let b = s.gather_train(&refs, &mut buf, &Device::Cpu).unwrap();
        assert_eq!(b.refs, refs);
    }

    #[test]
    fn augmentation_that_does_not_fit_the_images_is_refused_naming_the_key() {
        let s =
            || TaskStream::build(toy(), &cfg(StreamKind::Split, Scenario::ClassIl, 5), 0).unwrap();
        let e = s()
            .with_augmentation(&augmentation("{ random_crop: { padding: 5 } }"), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("augmentation.random_crop.padding"), "{e}");
        let e = s()
            .with_augmentation(
                &augmentation("{ normalize: { mean: [0, 0, 0], std: [1, 1, 1] } }"),
                0,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("augmentation.normalize.mean"), "{e}");
    }

    #[test]
    fn cifar_protocol_on_synthetic_3x32x32_pads_with_each_channels_normalised_zero() {
        // Every pixel 255: anything not (1 − mean)/std is the crop's padding, (0 − mean)/std.
        let set = ImageSet {
            images: vec![255; 2 * 3 * 32 * 32],
            labels: vec![0, 1],
            shape: [3, 32, 32],
        };
        let ds = Arc::new(Dataset {
            name: "synthetic".into(),
            train: set.clone(),
            test: set,
            num_classes: 2,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        });
        let a = augmentation(
            "{ random_crop: { padding: 4 }, horizontal_flip: 0.5, \
             normalize: { mean: [0.4914, 0.4822, 0.4465], std: [0.2470, 0.2435, 0.2615] } }",
        );
        let (mean, std) = ([0.4914f32, 0.4822, 0.4465], [0.2470f32, 0.2435, 0.2615]);
        let s = TaskStream::build(ds, &cfg(StreamKind::Split, Scenario::ClassIl, 1), 0)
            .unwrap()
            .with_augmentation(&a, 0)
            .unwrap();
        let refs = vec![SampleRef { task: 0, index: 0 }; 64];
        let x = pixels(
            &s.gather_train(&refs, &mut GatherBuf::default(), &Device::Cpu)
                .unwrap(),
        );
        let mut padded = 0;
        for (k, v) in x.iter().enumerate() {
            let ch = (k / 1024) % 3;
            let (one, zero) = (
                (1.0 - mean[ch]) * (1.0 / std[ch]),
                -mean[ch] * (1.0 / std[ch]),
            );
            assert!(*v == one || *v == zero, "{v}");
            padded += usize::from(*v == zero);
        }
        // Mean padded fraction of a 32×32 crop with offsets uniform in −4..=4: 1 − (1 − 20/9/32)².
        let frac = padded as f64 / x.len() as f64;
        let expect = 1.0 - (1.0 - 20.0 / 9.0 / 32.0f64).powi(2);
        assert!((frac - expect).abs() < 0.03, "{frac} vs {expect}");
        let eval = pixels(
            &s.gather(
                &refs[..1],
                Split::Test,
                &mut GatherBuf::default(),
                &Device::Cpu,
            )
            .unwrap(),
        );
        assert!(eval
            .iter()
            .enumerate()
            .all(|(k, v)| *v == (1.0 - mean[k / 1024]) * (1.0 / std[k / 1024])));
    }
}
