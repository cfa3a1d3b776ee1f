//! iCaRL — incremental Classifier and Representation Learning (Rebuffi, Kolesnikov, Sperl & Lampert,
//! CVPR 2017).
//!
//! **Representation update** (H0, H2). Task t trains on its own samples ∪ every stored exemplar
//! (the trainer batches them like any training set). At the start of task t > 1 the model is forked
//! into a frozen copy `f_old` (as in LwF). With `σ` the sigmoid, each sample `(x, y)` of a batch gets
//! the targets
//!
//! `q_u = σ(f_old(x)_u)` for the *past* units `u ∈ P_t`,   `q_u = [u = y]` for the other covered units
//!
//! and the loss is the binary cross-entropy with logits `z = f_θ(x)`, averaged over the covered
//! (sample, unit) cells:
//!
//! `L(θ) = (1/|C|) Σ_{(i,u) ∈ C} −[ q_iu log σ(z_iu) + (1 − q_iu) log(1 − σ(z_iu)) ]`.
//!
//! **Exemplars** (H5). The memory of `K` samples (`buffer_size`) is split evenly:
//! `m = ⌊K / #groups seen⌋` per group. A new group's exemplars are chosen by herding on
//! L2-normalised features φ (evaluation mode, extracted in chunks): with `μ` the group's mean
//! feature, for `k = 1..m` pick, among the samples not picked yet,
//!
//! `p_k = argmin_x ‖ μ − (1/k)(φ(x) + Σ_{j<k} φ(p_j)) ‖`,
//!
//! then every older group keeps only the first `m` of its exemplars — herding order makes that
//! prefix the best `m`-subset the herding found.
//!
//! **Prediction** (H6): nearest mean of exemplars. `μ_u` = normalised mean of the normalised features
//! of unit u's exemplars (the current model's features); a sample scores `−‖φ(x)/‖φ(x)‖ − μ_u‖²` on
//! each unit with exemplars and `−10³⁰` (never wins) on the others; before any exemplar exists
//! (the untrained model) the logits are used.
//!
//! **Units are classes.** The paper's classes are our output units. A herding *group* is a
//! (task, unit) pair: in split and permuted class-IL every unit belongs to one task, so groups are
//! exactly the paper's classes; in domain-IL a unit recurs in every task and each task's samples of
//! it form their own group, so the memory stays balanced across domains (the NME mean of a unit
//! pools all its groups).
//!
//! **Which units the BCE covers.** `P_t` = units of tasks `1..t−1` that task t does not use
//! (in class-IL: the past classes). With a single head (class-IL, domain-IL, masked task-IL) every
//! sample covers the units of tasks `1..t` — those seen so far, like the paper's growing output
//! layer; units of future tasks get no gradient. In multi-head task-IL a sample covers only its own
//! task's head (an exemplar of task k is distilled on head k, a current sample is trained one-hot on
//! head t), the per-sample counterpart of `loss::task_loss`. In domain-IL `P_t` is empty (every past
//! unit is also a current one), so iCaRL becomes exemplar rehearsal with BCE and NME.
//!
//! **Deviations.** No data augmentation, so no flipped copies in the class means; the paper's weight
//! decay is the optimizer's `weight_decay`; `⌊K / #groups⌋` leaves `K mod #groups` slots unused, as
//! in the paper. Exemplars are [`SampleRef`]s in herding order per group; herding, the class means
//! and NME live in [`crate::exemplars`].

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::algorithm::task_samples;
use sequel_core::data::{Batch, GatherBuf, SampleRef, TaskStream};
use sequel_core::model::{Model, ModelOutput};
use sequel_core::{Algorithm, AlgorithmConfig, Error, EvalCtx, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::exemplars::{class_means, features_of, ClassMeans};
pub use crate::exemplars::{herding, nme_scores, ExemplarSet};

/// YAML keys of `algorithm: { name: icarl, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IcarlConfig {
    /// Memory size K in samples (the paper's 2000 is for CIFAR-100's 100 classes). Default 200:
    /// ER's default and Mammoth's smallest buffer, so replay methods compare at equal memory.
    pub buffer_size: usize,
}

impl Default for IcarlConfig {
    fn default() -> Self {
        Self { buffer_size: 200 }
    }
}

impl AlgorithmConfig for IcarlConfig {
    const NAME: &'static str = "icarl";
    const SUMMARY: &'static str = "iCaRL: exemplars by herding, BCE with distillation, nearest-mean-of-exemplars prediction (Rebuffi et al. 2017)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Icarl::new(self)?))
    }
}

/// Which cells of a batch's logits the BCE covers and which of them are distilled, for one task.
#[derive(Debug, Clone, Default)]
struct LossPlan {
    /// Units seen so far (single head).
    seen: Vec<bool>,
    /// `P_t`: units of past tasks not used by the current one.
    past: Vec<bool>,
}

/// iCaRL's representation loss (the module documentation's BCE with distillation targets on the
/// past units): the frozen task-start teacher and the loss plan of the current task. Shared with
/// LwF.MC ([`crate::lwf_mc`]), which is this loss without exemplars.
#[derive(Default)]
pub struct BceDistillation {
    teacher: Option<Box<dyn Model>>,
    plan: LossPlan,
    /// Multi-head task-IL only: every sample also covers the old tasks' heads (distilled), not
    /// only its own head. iCaRL leaves it off (an exemplar of task k is distilled on head k);
    /// LwF.MC, which has no exemplars, needs it to distil anything in that scenario.
    old_heads: bool,
}

impl BceDistillation {
    /// The loss with `old_heads` as documented on the field.
    pub fn new(old_heads: bool) -> Self {
        Self {
            old_heads,
            ..Self::default()
        }
    }

    /// At the start of task `ctx.task`: the plan (units seen, past units `P_t`) and, from the
    /// second task on, the teacher forked from the model.
    pub fn before_task(&mut self, ctx: &TaskCtx) -> Result<()> {
        let stream = ctx.stream;
        let n = stream.num_units;
        let mut seen = vec![false; n];
        let mut past = vec![false; n];
        for (k, task) in stream.tasks[..=ctx.task].iter().enumerate() {
            for u in task.units.clone() {
                seen[u] = true;
                past[u] |= k < ctx.task;
            }
        }
        for u in stream.tasks[ctx.task].units.clone() {
            past[u] = false;
        }
        self.plan = LossPlan { seen, past };
        self.teacher = if ctx.task > 0 {
            Some(ctx.model.fork()?)
        } else {
            None
        };
        Ok(())
    }

    /// Drop the teacher (it is only needed while training on a task).
    pub fn release(&mut self) {
        self.teacher = None;
    }

    /// The loss of a batch with training-mode `logits` (see the module documentation).
    pub fn loss(&self, logits: &Tensor, batch: &Batch, stream: &TaskStream) -> Result<Tensor> {
        Ok(self.loss_and_teacher_rows(logits, batch, stream)?.0)
    }

    /// [`BceDistillation::loss`] and the rows the teacher forwarded for it (0 or the batch), for
    /// [`sequel_core::StepCtx::charge`].
    pub fn loss_and_teacher_rows(
        &self,
        logits: &Tensor,
        batch: &Batch,
        stream: &TaskStream,
    ) -> Result<(Tensor, usize)> {
        let units = logits.dim(D::Minus1)?;
        let rows = batch.len();
        let mut cover = vec![0f32; rows * units];
        let mut distil = vec![0f32; rows * units];
        let mut onehot = vec![0f32; rows * units];
        for i in 0..rows {
            let row = i * units;
            if stream.mask_in_training() {
                let own = &stream.tasks[batch.tasks[i] as usize].units;
                cover[row + own.start..row + own.end].fill(1.0);
                if self.old_heads {
                    for (u, &p) in self.plan.past.iter().enumerate().take(units) {
                        if p {
                            cover[row + u] = 1.0;
                        }
                    }
                }
            } else {
                for (u, &s) in self.plan.seen.iter().enumerate().take(units) {
                    cover[row + u] = if s { 1.0 } else { 0.0 };
                }
            }
            for (u, &p) in self.plan.past.iter().enumerate().take(units) {
                if p && cover[row + u] > 0.0 {
                    distil[row + u] = 1.0;
                }
            }
            onehot[row + batch.units[i] as usize] = 1.0;
        }
        let count: f32 = cover.iter().sum();
        if count == 0.0 {
            return Err(Error::msg(
                "BCE with distillation: a batch covers no output unit",
            ));
        }
        let dev = logits.device();
        let shape = (rows, units);
        let onehot = Tensor::from_vec(onehot, shape, dev)?;
        let (targets, teacher_rows) = match &self.teacher {
            Some(teacher) if distil.iter().any(|&d| d > 0.0) => {
                let old = sequel_core::model::forward_batch(teacher.as_ref(), batch, false)?
                    .logits
                    .detach();
                let soft = candle_nn::ops::sigmoid(&old)?;
                let distil = Tensor::from_vec(distil, shape, dev)?;
                ((&onehot + distil.mul(&(soft - &onehot)?)?)?, rows)
            }
            _ => (onehot, 0),
        };
        let cover = Tensor::from_vec(cover, shape, dev)?;
        let z = logits.to_dtype(DType::F32)?;
        let loss = (bce_with_logits(&z, &targets)?.mul(&cover)?.sum_all()? / count as f64)?;
        Ok((loss, teacher_rows))
    }
}

pub struct Icarl {
    memory_size: usize,
    bce: BceDistillation,
    exemplars: Vec<ExemplarSet>,
    /// Computed by `before_eval` for the weights about to be evaluated (a consolidation strategy
    /// may change them after `after_task`).
    means: Option<ClassMeans>,
    gather: GatherBuf,
}

impl Icarl {
    pub fn new(cfg: IcarlConfig) -> Result<Self> {
        check::at_least_one("buffer_size", cfg.buffer_size)?;
        Ok(Self {
            memory_size: cfg.buffer_size,
            bce: BceDistillation::new(false),
            exemplars: Vec::new(),
            means: None,
            gather: GatherBuf::default(),
        })
    }

    /// The exemplar sets, oldest group first, each in herding order.
    pub fn exemplars(&self) -> &[ExemplarSet] {
        &self.exemplars
    }

    /// Exemplars per group for `groups` groups.
    fn per_group(&self, groups: usize) -> usize {
        self.memory_size / groups.max(1)
    }

    /// The iCaRL loss of a batch (see the module documentation).
    pub fn bce_loss(&self, logits: &Tensor, batch: &Batch, stream: &TaskStream) -> Result<Tensor> {
        self.bce.loss(logits, batch, stream)
    }
}

/// Element-wise `−[q log σ(z) + (1 − q) log(1 − σ(z))]`, in the overflow-free form
/// `max(z, 0) − z·q + log(1 + e^{−|z|})`.
fn bce_with_logits(z: &Tensor, q: &Tensor) -> Result<Tensor> {
    let soft_plus = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((z.relu()? - z.mul(q)?)? + soft_plus)?)
}

impl Algorithm for Icarl {
    /// The exemplars; the teacher, the loss plan and the class means are rebuilt from the model
    /// and the stream.
    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.field("exemplars", &mut self.exemplars)
    }

    fn check_stream(&mut self, stream: &TaskStream) -> Result<()> {
        let groups: usize = stream.tasks.iter().map(|t| t.units.len()).sum();
        if self.memory_size < groups {
            return Err(Error::Config {
                file: String::new(),
                path: "algorithm.buffer_size".into(),
                message: format!(
                    "iCaRL keeps at least one exemplar per class and task: {groups} are needed, got {}",
                    self.memory_size
                ),
            });
        }
        Ok(())
    }

    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.bce.before_task(ctx)
    }

    fn trains_on_the_stream(&self) -> bool {
        false
    }

    fn training_samples(&mut self, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        Ok(crate::exemplars::task_and_exemplars(
            ctx.stream,
            ctx.task,
            &self.exemplars,
        ))
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let f = ctx.forward(&[batch])?;
        let (loss, teacher_rows) =
            self.bce
                .loss_and_teacher_rows(&f.out.logits, batch, ctx.stream)?;
        ctx.charge(teacher_rows, 0);
        Ok(loss)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.bce.release();
        let samples = task_samples(ctx.stream, ctx.task);
        let (feats, units) = features_of(
            ctx.model,
            ctx.stream,
            &samples,
            ctx.device,
            &mut self.gather,
        )?;
        let mut by_unit: Vec<(u32, Vec<usize>)> = Vec::new();
        for (i, &u) in units.iter().enumerate() {
            match by_unit.iter_mut().find(|(v, _)| *v == u) {
                Some((_, idx)) => idx.push(i),
                None => by_unit.push((u, vec![i])),
            }
        }
        by_unit.sort_by_key(|(u, _)| *u);
        let m = self.per_group(self.exemplars.len() + by_unit.len());
        for g in &mut self.exemplars {
            g.samples.truncate(m);
        }
        for (unit, idx) in by_unit {
            let class: Vec<Vec<f32>> = idx.iter().map(|&i| feats[i].clone()).collect();
            let picks = herding(&class, m);
            self.exemplars.push(ExemplarSet {
                task: ctx.task as u32,
                unit,
                samples: picks.into_iter().map(|p| samples[idx[p]]).collect(),
            });
        }
        Ok(())
    }

    fn before_eval(&mut self, ctx: &EvalCtx) -> Result<()> {
        self.means = if self.exemplars.iter().all(|g| g.samples.is_empty()) {
            None
        } else {
            Some(class_means(
                &self.exemplars,
                ctx.model,
                ctx.stream,
                ctx.device,
            )?)
        };
        Ok(())
    }

    fn predict(&self, out: &ModelOutput, _task: usize, _ctx: &EvalCtx) -> Result<Option<Tensor>> {
        self.means
            .as_ref()
            .map(|c| nme_scores(&out.features, &c.means, &c.penalty))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mini_trainer, observe_run, observed, Observer};
    use candle_core::Device;
    use sequel_core::data::Split;
    use sequel_core::state::StateDict;
    use sequel_core::Trainer;

    fn icarl(k: usize) -> Icarl {
        Icarl::new(IcarlConfig { buffer_size: k }).unwrap()
    }

    #[test]
    fn bce_matches_the_formula_with_distillation_on_past_units_only() {
        let t = mini_trainer(Box::new(crate::naive::Naive), &[]);
        let mut alg = icarl(200);
        // Task 2 (0-based 1) of split class-IL: units 0–1 past, 2–3 current, 4–9 unseen.
        let mut seen = vec![false; 10];
        let mut past = vec![false; 10];
        seen[..4].fill(true);
        past[..2].fill(true);
        alg.bce.plan = LossPlan { seen, past };
        let teacher = t.model.fork().unwrap();
        // A different student so teacher and student logits differ.
        for p in t.model.params().iter() {
            p.var.set(&(p.var.as_tensor() * 1.5).unwrap()).unwrap();
        }
        let refs = [
            SampleRef {
                task: 1,
                index: t.stream.tasks[1].train[0],
            },
            SampleRef {
                task: 0,
                index: t.stream.tasks[0].train[3],
            },
        ];
        let batch = t
            .stream
            .gather(&refs, Split::Train, &mut GatherBuf::default(), &Device::Cpu)
            .unwrap();
        // The exemplar of task 1 has its label on a past unit: its target there is σ(z_old), not 1.
        assert!(batch.units[1] < 2 && (2..4).contains(&batch.units[0]));
        let z: Vec<Vec<f32>> = t
            .model
            .forward(&batch.x, true)
            .unwrap()
            .logits
            .to_vec2()
            .unwrap();
        let zo: Vec<Vec<f32>> = teacher
            .forward(&batch.x, false)
            .unwrap()
            .logits
            .to_vec2()
            .unwrap();
        alg.bce.teacher = Some(teacher);
        let logits = t.model.forward(&batch.x, true).unwrap().logits;
        let got = alg
            .bce_loss(&logits, &batch, &t.stream)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let mut want = 0.0;
        for i in 0..2 {
            for u in 0..4 {
                let q = if u < 2 {
                    sig(zo[i][u] as f64)
                } else if batch.units[i] as usize == u {
                    1.0
                } else {
                    0.0
                };
                let p = sig(z[i][u] as f64);
                want -= q * p.ln() + (1.0 - q) * (1.0 - p).ln();
            }
        }
        want /= 8.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    /// Records what the trainer gave iCaRL.
    #[derive(Default)]
    struct Record {
        train_sizes: Vec<usize>,
        after: Vec<Vec<ExemplarSet>>,
    }

    impl Observer<Icarl> for Record {
        fn training_samples(
            &mut self,
            ic: &mut Icarl,
            ctx: &mut TaskCtx,
        ) -> Result<Vec<SampleRef>> {
            let s = ic.training_samples(ctx)?;
            self.train_sizes.push(s.len());
            Ok(s)
        }
        fn after_task(&mut self, ic: &mut Icarl, ctx: &mut TaskCtx) -> Result<()> {
            ic.after_task(ctx)?;
            self.after.push(ic.exemplars().to_vec());
            Ok(())
        }
    }

    /// iCaRL with `buffer_size` k on the mini stream, observed by a [`Record`].
    fn recorded(k: usize, overrides: &[&str]) -> (Trainer, sequel_core::RunOutcome) {
        observe_run(icarl(k), Record::default(), overrides)
    }

    fn record_of(t: &Trainer) -> (&Icarl, &Record) {
        let p = observed::<Icarl, Record>(t);
        (&p.algo, &p.observer)
    }

    fn eval_ctx(t: &Trainer) -> EvalCtx<'_> {
        EvalCtx {
            stream: &t.stream,
            model: t.model.as_ref(),
            device: &Device::Cpu,
        }
    }

    #[test]
    fn exemplars_are_herded_shrunk_in_herding_order_and_trained_on() {
        let (t, _) = recorded(40, &["benchmark.tasks=3"]);
        let (_, r) = record_of(&t);
        // m = 40/2, 40/4, 40/6 per class.
        let per = [20usize, 10, 6];
        for (task, sets) in r.after.iter().enumerate() {
            assert_eq!(sets.len(), 2 * (task + 1));
            for g in sets {
                assert!(!g.samples.is_empty());
                assert!(g.samples.len() <= per[task], "{g:?}");
                assert!(g.samples.iter().all(|s| s.task == g.task));
            }
        }
        // Shrinking keeps the first m, in herding order.
        for (pair, &m) in r.after.windows(2).zip(&per[1..]) {
            for (old, new) in pair[0].iter().zip(&pair[1]) {
                assert_eq!((old.task, old.unit), (new.task, new.unit));
                let keep = old.samples.len().min(m);
                assert_eq!(new.samples, old.samples[..keep].to_vec());
            }
        }
        // Task t trains on its 50 samples plus every exemplar kept after task t − 1.
        let stored = |sets: &[ExemplarSet]| sets.iter().map(|g| g.samples.len()).sum::<usize>();
        assert_eq!(
            r.train_sizes,
            vec![50, 50 + stored(&r.after[0]), 50 + stored(&r.after[1])]
        );
        // Herding happened on the right class: every exemplar's unit is its group's unit.
        let mut buf = GatherBuf::default();
        for g in &r.after[2] {
            let b = t
                .stream
                .gather(&g.samples, Split::Train, &mut buf, &Device::Cpu)
                .unwrap();
            assert!(b.units.iter().all(|&u| u == g.unit));
        }
    }

    #[test]
    fn buffer_too_small_for_one_exemplar_per_class_is_a_config_error() {
        // 5 tasks of 2 classes need 10 exemplars; the check runs before any training.
        let t = mini_trainer(Box::new(icarl(10)), &[]);
        assert!(icarl(10).check_stream(&t.stream).is_ok());
        let e = icarl(9).check_stream(&t.stream).unwrap_err().to_string();
        assert!(e.contains("algorithm.buffer_size"), "{e}");
    }

    fn run_scenario(overrides: &[&str]) {
        let (t, out) = recorded(100, overrides);
        assert_eq!(out.matrix.rows.len(), 5);
        assert!(out.matrix.rows.iter().flatten().all(|a| a.is_finite()));
        let (ic, r) = record_of(&t);
        let sets = r.after.last().unwrap();
        let total: usize = sets.iter().map(|g| g.samples.len()).sum();
        assert!(total <= 100 && total > 0, "{total}");
        assert!(sets.iter().all(|g| g.samples.len() <= 10));
        // NME is what evaluation uses once exemplars exist, and it beats chance on the last task.
        let ctx = eval_ctx(&t);
        let refs: Vec<SampleRef> = sets[sets.len() - 1].samples.clone();
        let b = t
            .stream
            .gather(&refs, Split::Train, &mut GatherBuf::default(), &Device::Cpu)
            .unwrap();
        let o = t.model.forward(&b.x, false).unwrap();
        let s = ic.predict(&o, 4, &ctx).unwrap().unwrap();
        assert_eq!(s.dims(), &[refs.len(), 10]);
        let last = out.matrix.rows[4][4];
        assert!(
            last > 0.5,
            "{overrides:?}: accuracy on the last task {last}"
        );
    }

    #[test]
    fn five_tasks_in_class_il() {
        run_scenario(&[]);
    }

    #[test]
    fn five_tasks_in_task_il_single_head() {
        run_scenario(&["benchmark.scenario=task-il"]);
    }

    #[test]
    fn five_tasks_in_task_il_multi_head() {
        run_scenario(&["benchmark.scenario=task-il", "benchmark.task_il_head=multi"]);
    }

    #[test]
    fn multi_head_covers_each_samples_own_head() {
        // In multi-head task-IL a sample covers only its own head: the current sample is trained
        // one-hot on head 2 (units 2–3), the exemplar of task 1 is distilled on head 1 (units 0–1).
        let t = mini_trainer(
            Box::new(crate::naive::Naive),
            &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"],
        );
        let mut alg = icarl(200);
        let mut seen = vec![false; 10];
        let mut past = vec![false; 10];
        seen[..4].fill(true);
        past[..2].fill(true);
        alg.bce.plan = LossPlan { seen, past };
        let teacher = t.model.fork().unwrap();
        for p in t.model.params().iter() {
            p.var.set(&(p.var.as_tensor() * 0.5).unwrap()).unwrap();
        }
        let refs = [
            SampleRef {
                task: 1,
                index: t.stream.tasks[1].train[0],
            },
            SampleRef {
                task: 0,
                index: t.stream.tasks[0].train[0],
            },
        ];
        let batch = t
            .stream
            .gather(&refs, Split::Train, &mut GatherBuf::default(), &Device::Cpu)
            .unwrap();
        let zo: Vec<Vec<f32>> = teacher
            .forward(&batch.x, false)
            .unwrap()
            .logits
            .to_vec2()
            .unwrap();
        alg.bce.teacher = Some(teacher);
        let logits = t.model.forward(&batch.x, true).unwrap().logits;
        let got = alg
            .bce_loss(&logits, &batch, &t.stream)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let z: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let bce = |q: f64, z: f32| {
            let p = sig(z as f64);
            -(q * p.ln() + (1.0 - q) * (1.0 - p).ln())
        };
        let current: f64 = (2..4)
            .map(|u| bce(f64::from(batch.units[0] as usize == u), z[0][u]))
            .sum();
        let exemplar: f64 = (0..2).map(|u| bce(sig(zo[1][u] as f64), z[1][u])).sum();
        let want = (current + exemplar) / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn domain_il_keeps_one_group_per_task_and_unit() {
        let (t, _) = recorded(60, &["benchmark.scenario=domain-il", "benchmark.tasks=3"]);
        let (ic, r) = record_of(&t);
        let sets = r.after.last().unwrap();
        let keys: Vec<(u32, u32)> = sets.iter().map(|g| (g.task, g.unit)).collect();
        assert_eq!(keys, vec![(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]);
        assert!(sets.iter().all(|g| g.samples.len() <= 10));
        // No unit is "past only" in domain-IL, so nothing is distilled.
        assert!(ic.bce.plan.past.iter().all(|&p| !p));
    }

    #[test]
    fn permuted_class_il_runs() {
        let (t, _) = recorded(
            60,
            &[
                "benchmark.kind=permuted",
                "benchmark.tasks=3",
                "benchmark.classes_per_task=null",
            ],
        );
        let (_, r) = record_of(&t);
        // 10 classes per task, each task its own block of units.
        assert_eq!(r.after.last().unwrap().len(), 30);
        assert_eq!(r.after.last().unwrap()[29].unit, 29);
    }

    #[test]
    fn untrained_model_uses_logits_and_state_round_trips() {
        let t = mini_trainer(Box::new(crate::naive::Naive), &["benchmark.tasks=2"]);
        let mut fresh = icarl(40);
        fresh.before_eval(&eval_ctx(&t)).unwrap();
        let x = Tensor::zeros((1, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        let o = t.model.forward(&x, false).unwrap();
        assert!(fresh.predict(&o, 0, &eval_ctx(&t)).unwrap().is_none());
        let (t, _) = recorded(40, &["benchmark.tasks=2"]);
        let (ic, _) = record_of(&t);
        let mut state = StateDict::new();
        let mut trained = icarl(40);
        trained.exemplars = ic.exemplars().to_vec();
        trained.state(&mut StateIo::save(&mut state)).unwrap();
        let mut back = icarl(40);
        back.state(&mut StateIo::load(&state)).unwrap();
        assert_eq!(back.exemplars(), ic.exemplars());
        assert!(!back.exemplars().is_empty());
    }

    #[test]
    fn class_means_follow_the_weights_evaluated() {
        // A consolidation strategy may change the weights after `after_task`: `before_eval` runs
        // before every evaluation pass, so the means `predict` uses are those of the weights
        // being evaluated.
        let (t, _) = recorded(40, &["benchmark.tasks=2"]);
        let mut a = icarl(40);
        a.exemplars = record_of(&t).0.exemplars().to_vec();
        let refs = &a.exemplars()[0].samples;
        let b = t
            .stream
            .gather(refs, Split::Train, &mut GatherBuf::default(), &Device::Cpu)
            .unwrap();
        let scores = |a: &mut Icarl| -> Vec<Vec<f32>> {
            a.before_eval(&eval_ctx(&t)).unwrap();
            let o = t.model.forward(&b.x, false).unwrap();
            a.predict(&o, 0, &eval_ctx(&t))
                .unwrap()
                .unwrap()
                .to_vec2()
                .unwrap()
        };
        let before = scores(&mut a);
        let means_before = a.means.as_ref().unwrap().means.to_vec2::<f32>().unwrap();
        for p in t.model.params().iter().filter(|p| p.head.is_none()) {
            let noise = p.var.as_tensor().ones_like().unwrap();
            p.var
                .set(&(p.var.as_tensor() + (noise * 0.05)).unwrap())
                .unwrap();
        }
        let after = scores(&mut a);
        assert_ne!(before, after);
        assert_ne!(
            means_before,
            a.means.as_ref().unwrap().means.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn registry_builds_it_from_yaml_keys() {
        let reg = crate::Registry::builtin();
        let spec: serde_yaml::Value = serde_yaml::from_str("{ name: icarl }").unwrap();
        let (_, resolved) = reg.build_algorithm(&spec, "t.yaml").unwrap();
        assert_eq!(resolved["buffer_size"].as_u64(), Some(200));
        let zero: serde_yaml::Value =
            serde_yaml::from_str("{ name: icarl, buffer_size: 0 }").unwrap();
        let e = reg
            .build_algorithm(&zero, "t.yaml")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("algorithm.buffer_size"), "{e}");
    }
}
