//! X-DER — eXtended Dark Experience Replay (Boschini, Bonicelli, Buzzega, Porrello & Calderara,
//! "Class-Incremental Continual Learning into the eXtended DER-verse", TPAMI 2022).
//!
//! DER++ ([`crate::der`]) whose memory logits are *rewritten* as the stream goes on. At task `t`,
//! with `Uₜ` the output units of task `t`, `P = ∪_{s<t} U_s` (past), `F = ∪_{s>t} U_s` (future):
//!
//! `L = CE_{Uₜ}(f(x), y) + α·MSE(f(x′), z′) + β·CE_P(f(x″), y″) + η·L_past + η·L_fut`
//!
//! - `CE_{Uₜ}`: the incoming batch is classified over the present task's units only (the paper's
//!   "present head"); `CE_P`: the replayed batch over the past units only.
//! - `L_past = mean_{violated} [ max_P σ(f(x))ₖ.detach() + m − max_{Uₜ} σ(f(x))ₖ ]₊`, softmax over
//!   `P ∪ Uₜ`: new samples must beat the past heads by a margin `m` (incoming rows, `t > 0`).
//! - `L_fut = mean_{violated} [ max_F f(x)ₖ + m − max_{U(x)} f(x)ₖ ]₊` on raw logits, over the
//!   incoming rows and the (distinct) replayed rows, `U(x)` the sample's own task units: future
//!   heads stay below the true head (`t < T − 1`).
//!
//! **Rewriting the stored logits** with the paper's margin rule. For a stored row `z` of true unit
//! `y`, new logits `ẑ` and a unit range `C` (never containing `y`):
//! `z_C ← ẑ_C · (γ z_y / max_C ẑ)` if `max_C ẑ > z_y`, else `z_C ← ẑ_C` — the true unit stays the
//! largest, by the factor γ < 1. It is applied
//! - (a) *future → present*, online: during task `t`, a past-task sample drawn for the first time
//!   in this task gets `C = Uₜ ∪ F` (units that were untrained "future" heads when it was stored)
//!   from the step's training-mode output; the k-th draw of the same slot within the task replaces
//!   them again with probability 1/k (Mammoth's `update_counter`, so the kept value is uniform over
//!   the draws); the coin comes from the algorithm's seeded stream;
//! - (b) *present → past*, at the end of task `t`: every stored sample of a past task gets
//!   `C = Uₜ ∪ F` from the final model (evaluation mode), and the samples of task `t`, inserted at
//!   that moment with the final model's logits, get their past units `C = P` rescaled by the rule
//!   with `ẑ = z`.
//!
//! The memory is filled at task end, class-balanced (`insert: task_end` is required: the rules
//! above assume the memory holds only past tasks while a task trains).
//!
//! **Left out.** The future-head *SupCon* term (λ, strong augmentations on the future heads) — the
//! library has no augmentation pipeline — and the "X-DER-RPC" prototype head. Defaults: Mammoth
//! `best_args` seq-cifar100/500 for α = 0.3, β = 0.8 and the reference code's defaults γ = 0.85,
//! η = 0.1, m = 0.3. In multi-head task-IL the two margin constraints are off (they compare heads
//! that evaluation never compares) and both cross-entropies use each sample's own head. Designed
//! for class-IL and task-IL; with shared units (domain-IL) `P` and `F` are empty.

use std::ops::Range;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::buffer::{BufferPolicy, InsertAt, ReplayBuffer};
use sequel_core::data::{Batch, Split};
use sequel_core::{Algorithm, AlgorithmConfig, Memory, MemoryConfig, Result, StepCtx, TaskCtx};

use crate::check;
use crate::der::logit_mse;

/// YAML keys of `algorithm: { name: xder, ... }`, besides the memory's (`buffer_size: 200`,
/// `buffer_policy: class_balanced`, `insert: task_end`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XderConfig {
    /// Weight α of the logit-matching (MSE) term.
    pub alpha: f64,
    /// Weight β of the replay cross-entropy on the past units.
    pub beta: f64,
    /// γ: a rewritten stored row keeps its true logit the largest by this factor.
    pub gamma: f64,
    /// η: weight of the past and future margin constraints.
    pub eta: f64,
    /// m: their margin.
    pub m: f64,
    /// Samples per buffer draw, for each of the two draws.
    pub replay_batch_size: usize,
    #[serde(skip)]
    pub memory: MemoryConfig,
}

impl Default for XderConfig {
    fn default() -> Self {
        Self {
            alpha: 0.3,
            beta: 0.8,
            gamma: 0.85,
            eta: 0.1,
            m: 0.3,
            replay_batch_size: 10,
            memory: MemoryConfig {
                buffer_size: 200,
                buffer_policy: BufferPolicy::ClassBalanced,
                insert: InsertAt::TaskEnd,
            },
        }
    }
}

impl AlgorithmConfig for XderConfig {
    const NAME: &'static str = "xder";
    const SUMMARY: &'static str = "X-DER: DER++ whose stored logits are rewritten for new classes (margin gamma), plus past/future head constraints (Boschini et al. 2022)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Xder::new(self)?))
    }
    fn memory(&mut self) -> Option<&mut MemoryConfig> {
        Some(&mut self.memory)
    }
}

pub struct Xder {
    cfg: XderConfig,
    memory: Memory,
    /// Per slot: draws of it within the current task (reset at each task start).
    counter: Vec<u32>,
}

impl Xder {
    pub fn new(cfg: XderConfig) -> Result<Self> {
        check::non_negative("alpha", cfg.alpha)?;
        check::non_negative("beta", cfg.beta)?;
        check::unit_interval("gamma", cfg.gamma)?;
        check::non_negative("eta", cfg.eta)?;
        check::non_negative("m", cfg.m)?;
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        if cfg.memory.insert != InsertAt::TaskEnd {
            return Err(check::invalid(
                "insert",
                "xder fills its memory at task end: must be `task_end`".into(),
            ));
        }
        Ok(Self {
            memory: Memory::new(cfg.memory, true)?,
            counter: vec![0; cfg.memory.buffer_size],
            cfg,
        })
    }
}

/// The paper's rewrite of one stored row `stored` (true unit `gt`) on the units `cols` from the
/// new logits `new`: copied, scaled by `γ·z_gt / max` when their max exceeds the stored true logit.
pub fn transplant(stored: &mut [f32], new: &[f32], cols: Range<usize>, gt: usize, gamma: f32) {
    if cols.is_empty() {
        return;
    }
    let z_gt = stored[gt];
    let max = new[cols.clone()]
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let coeff = if max > z_gt { gamma * z_gt / max } else { 1.0 };
    for c in cols {
        stored[c] = new[c] * coeff;
    }
}

/// Rewrite the stored logits of `slots` on `cols` from `new` (one row per slot).
pub fn rewrite(
    buffer: &mut ReplayBuffer,
    slots: &[u32],
    new: &[Vec<f32>],
    cols: Range<usize>,
    gamma: f32,
) -> Result<()> {
    for (&s, z) in slots.iter().zip(new) {
        let mut row = buffer.logits(s as usize).to_vec();
        transplant(
            &mut row,
            z,
            cols.clone(),
            buffer.unit(s as usize) as usize,
            gamma,
        );
        buffer.set_logits(s as usize, &row)?;
    }
    Ok(())
}

/// Cross-entropy of `logits` restricted to the units `r` (targets shifted into it).
fn ce_over(logits: &Tensor, units: &[u32], r: &Range<usize>) -> Result<Tensor> {
    let y: Vec<u32> = units.iter().map(|&u| u - r.start as u32).collect();
    let y = Tensor::from_vec(y, units.len(), logits.device())?;
    Ok(candle_nn::loss::cross_entropy(
        &logits.narrow(1, r.start, r.len())?,
        &y,
    )?)
}

/// `mean over rows with v > 0 of v`, `v = [bad + m − good]₊` (0 when no row violates).
fn hinge_mean(bad: &Tensor, good: &Tensor, m: f64) -> Result<Tensor> {
    let v = ((bad - good)? + m)?.relu()?;
    let violated = v.to_vec1::<f32>()?.iter().filter(|&&x| x > 0.0).count();
    Ok((v.sum_all()? / violated.max(1) as f64)?)
}

impl Algorithm for Xder {
    fn before_task(&mut self, _ctx: &mut TaskCtx) -> Result<()> {
        self.counter.fill(0);
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let (s, dev, t) = (ctx.stream, ctx.device, ctx.task);
        let (r, units) = (s.tasks[t].units.clone(), s.num_units);
        let size = |w: f64| {
            if w > 0.0 {
                self.cfg.replay_batch_size
            } else {
                0
            }
        };
        let mse = self.memory.draw(size(self.cfg.alpha), s, dev)?;
        let ce = self.memory.draw(size(self.cfg.beta), s, dev)?;
        let f = ctx.forward(&[batch, &mse.batch, &ce.batch])?;
        let multi = s.mask_in_training();
        let present = f.logits(0)?;
        let mut loss = if multi {
            ctx.task_loss(&present, batch)?
        } else {
            ce_over(&present, &batch.units, &r)?
        };
        if let Some(z) = &mse.logits {
            loss = (loss + (logit_mse(&f.logits(1)?, &mse.batch, z, s)? * self.cfg.alpha)?)?;
        }
        if f.has(2) {
            let past = 0..r.start;
            let term = if multi || past.is_empty() {
                ctx.task_loss(&f.logits(2)?, &ce.batch)?
            } else {
                ce_over(&f.logits(2)?, &ce.batch.units, &past)?
            };
            loss = (loss + (term * self.cfg.beta)?)?;
        }
        // The distinct replayed rows (first occurrence), as (row in the forward pass, slot).
        let n = batch.len();
        let mut rows: Vec<(usize, u32)> = Vec::new();
        for (offset, slots) in [(n, &mse.slots), (n + mse.slots.len(), &ce.slots)] {
            for (i, &slot) in slots.iter().enumerate() {
                if !rows.iter().any(|&(_, s2)| s2 == slot) {
                    rows.push((offset + i, slot));
                }
            }
        }
        if !rows.is_empty() {
            self.rewrite_future(&f.out.logits, &rows, t, r.start..units, ctx)?;
        }
        if self.cfg.eta > 0.0 && !multi {
            if r.start > 0 {
                let p = candle_nn::ops::softmax(&present.narrow(1, 0, r.end)?, D::Minus1)?;
                let bad = p.narrow(1, 0, r.start)?.max(D::Minus1)?.detach();
                let good = p.narrow(1, r.start, r.len())?.max(D::Minus1)?;
                loss = (loss + (hinge_mean(&bad, &good, self.cfg.m)? * self.cfg.eta)?)?;
            }
            if r.end < units {
                let idx: Vec<u32> = (0..n as u32)
                    .chain(rows.iter().map(|&(i, _)| i as u32))
                    .collect();
                let own: Vec<f32> = idx
                    .iter()
                    .flat_map(|&i| {
                        let u = &s.tasks[f.batch.tasks[i as usize] as usize].units;
                        (0..units).map(move |k| if u.contains(&k) { 0.0 } else { -1e9 })
                    })
                    .collect();
                let z = f
                    .out
                    .logits
                    .index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?;
                let own = Tensor::from_vec(own, (idx.len(), units), dev)?;
                let good = (&z + own)?.max(D::Minus1)?;
                let bad = z.narrow(1, r.end, units - r.end)?.max(D::Minus1)?;
                loss = (loss + (hinge_mean(&bad, &good, self.cfg.m)? * self.cfg.eta)?)?;
            }
        }
        Ok(loss)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        let (s, t) = (ctx.stream, ctx.task);
        let r = s.tasks[t].units.clone();
        let gamma = self.cfg.gamma as f32;
        let Some(buffer) = self.memory.buffer_mut() else {
            return Ok(());
        };
        // (b) The new samples' past units, rescaled on their own logits.
        let new = buffer.slots_of_task(t as u32);
        let own: Vec<Vec<f32>> = new
            .iter()
            .map(|&i| buffer.logits(i as usize).to_vec())
            .collect();
        rewrite(buffer, &new, &own, 0..r.start, gamma)?;
        // (b) The past samples' present and future units, from the final model.
        let past: Vec<u32> = (0..buffer.len() as u32)
            .filter(|&i| (buffer.sample(i as usize).task as usize) < t)
            .collect();
        let mut gather = Default::default();
        for chunk in past.chunks(256) {
            let refs: Vec<_> = chunk.iter().map(|&i| buffer.sample(i as usize)).collect();
            let b = s.gather(&refs, Split::Train, &mut gather, ctx.device)?;
            let z = sequel_core::model::forward_batch(ctx.model, &b, false)?
                .logits
                .to_vec2::<f32>()?;
            rewrite(buffer, chunk, &z, r.start..s.num_units, gamma)?;
        }
        Ok(())
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}

impl Xder {
    /// (a) Online: the distinct replayed rows of past tasks, each with probability 1/(its draws
    /// this task), get `cols` from the step's training-mode logits.
    fn rewrite_future(
        &mut self,
        logits: &Tensor,
        rows: &[(usize, u32)],
        t: usize,
        cols: Range<usize>,
        ctx: &mut StepCtx,
    ) -> Result<()> {
        let buffer = match self.memory.buffer_mut() {
            Some(b) => b,
            None => return Ok(()),
        };
        let mut chosen = Vec::new();
        for &(row, slot) in rows {
            if (buffer.sample(slot as usize).task as usize) >= t {
                continue;
            }
            let k = &mut self.counter[slot as usize];
            *k += 1;
            if *k == 1 || ctx.rng.uniform_f64() * f64::from(*k) < 1.0 {
                chosen.push((row, slot));
            }
        }
        if chosen.is_empty() {
            return Ok(());
        }
        let idx: Vec<u32> = chosen.iter().map(|&(r, _)| r as u32).collect();
        let z = logits
            .detach()
            .index_select(&Tensor::new(idx.as_slice(), logits.device())?, 0)?
            .to_vec2::<f32>()?;
        let slots: Vec<u32> = chosen.iter().map(|&(_, s)| s).collect();
        rewrite(buffer, &slots, &z, cols, self.cfg.gamma as f32)
    }
}

#[cfg(test)]
mod tests {
    use sequel_core::data::{GatherBuf, SampleRef};

    use super::*;
    use crate::testing::{observe_run, observed, Observer};

    #[test]
    fn transplant_keeps_the_true_logit_largest_by_gamma() {
        // Units 0–1 past (true unit 1), 2–5 rewritten.
        let mut z = vec![0.5, 2.0, 9.0, 9.0, 9.0, 9.0];
        let new = vec![7.0, 7.0, 1.0, 4.0, -2.0, 3.0];
        transplant(&mut z, &new, 2..6, 1, 0.85);
        // max 4 > z_y = 2: scaled by 0.85·2/4.
        let c = 0.85 * 2.0 / 4.0;
        assert_eq!(z, vec![0.5, 2.0, c, 4.0 * c, -2.0 * c, 3.0 * c]);
        assert!((z[3] - 0.85 * z[1]).abs() < 1e-6);
        // Below the true logit: copied unscaled; an empty range changes nothing.
        let mut z = vec![0.5, 5.0, 9.0, 9.0];
        transplant(&mut z, &[0.0, 0.0, 1.0, -1.0], 2..4, 1, 0.85);
        assert_eq!(z, vec![0.5, 5.0, 1.0, -1.0]);
        transplant(&mut z, &[7.0; 4], 0..0, 1, 0.85);
        assert_eq!(z, vec![0.5, 5.0, 1.0, -1.0]);
    }

    #[test]
    fn step_insertion_is_rejected() {
        let mut cfg = XderConfig::default();
        cfg.memory.insert = InsertAt::Step;
        let e = Xder::new(cfg).err().unwrap().to_string();
        assert!(e.contains("algorithm.insert"), "{e}");
    }

    type Logits = Vec<Vec<f32>>;

    /// X-DER's stored logits recorded around each loss and each `after_task`, and the
    /// final model's evaluation-mode logits of every stored sample at each task end.
    struct Rec {
        /// (task, samples of the step's replay parts, logits before, logits after).
        steps: Steps,
        /// (task, samples, units, logits before, logits after, model logits).
        ends: Ends,
    }

    fn stored(m: &mut Memory) -> Logits {
        let b = m.buffer().unwrap();
        (0..b.len()).map(|i| b.logits(i).to_vec()).collect()
    }

    impl Observer<Xder> for Rec {
        fn loss(&mut self, x: &mut Xder, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
            let before = stored(&mut x.memory);
            let l = x.loss(batch, ctx)?;
            let drawn = ctx.forwarded_parts()[1..].concat();
            self.steps
                .push((ctx.task, drawn, before, stored(&mut x.memory)));
            Ok(l)
        }
        fn after_task(&mut self, x: &mut Xder, ctx: &mut TaskCtx) -> Result<()> {
            let before = stored(&mut x.memory);
            x.after_task(ctx)?;
            let b = x.memory.buffer().unwrap();
            let slots: Vec<u32> = (0..b.len() as u32).collect();
            let batch = b
                .gather(&slots, ctx.stream, &mut GatherBuf::default(), ctx.device)
                .unwrap();
            let model = ctx.model.forward(&batch.x, false)?.logits.to_vec2()?;
            let units = (0..b.len()).map(|i| b.unit(i)).collect();
            let samples = b.samples().to_vec();
            let after = stored(&mut x.memory);
            self.ends
                .push((ctx.task, samples, units, before, after, model));
            Ok(())
        }
    }

    type Steps = Vec<(usize, Vec<SampleRef>, Logits, Logits)>;
    type Ends = Vec<(usize, Vec<SampleRef>, Vec<u32>, Logits, Logits, Logits)>;

    fn recorded() -> (Steps, Ends, sequel_core::data::TaskStream) {
        let rec = Rec {
            steps: Vec::new(),
            ends: Vec::new(),
        };
        let x = Xder::new(XderConfig::default()).unwrap();
        let (t, _) = observe_run(x, rec, &["benchmark.train_subset=100"]);
        let rec = &observed::<Xder, Rec>(&t).observer;
        (rec.steps.clone(), rec.ends.clone(), t.stream.clone())
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
    }

    #[test]
    fn task_end_rewrites_the_right_slots_and_units_only() {
        let (_, ends, s) = recorded();
        let units = s.num_units;
        let (mut scaled, mut past_rows) = (0, 0);
        assert_eq!(ends.len(), 5);
        for (t, samples, ys, before, after, model) in &ends {
            let r = s.tasks[*t].units.clone();
            for i in 0..samples.len() {
                let (b, a, m, y) = (&before[i], &after[i], &model[i], ys[i] as usize);
                if (samples[i].task as usize) < *t {
                    past_rows += 1;
                    // Past sample: its past units untouched, bit for bit …
                    assert_eq!(a[..r.start], b[..r.start], "task {t} slot {i}");
                    // … units of task t and later: the final model's, by the margin rule.
                    let mut want = b.clone();
                    transplant(&mut want, m, r.start..units, y, 0.85);
                    assert!(close(a, &want), "task {t} slot {i}: {a:?} vs {want:?}");
                    let max = a[r.start..].iter().copied().fold(f32::MIN, f32::max);
                    if (max - 0.85 * a[y]).abs() < 1e-5 * a[y].abs().max(1.0) {
                        scaled += 1;
                    }
                    assert!(max <= a[y] || a[y] <= 0.0, "task {t} slot {i}");
                } else {
                    assert_eq!(samples[i].task as usize, *t);
                    // New sample: inserted with the final model's logits; only its past units
                    // are rescaled (on its own logits).
                    assert!(close(b, m), "task {t} slot {i}");
                    assert_eq!(a[r.start..], b[r.start..], "task {t} slot {i}");
                    let mut want = b.clone();
                    transplant(&mut want, b, 0..r.start, y, 0.85);
                    assert_eq!(a, &want, "task {t} slot {i}");
                }
            }
        }
        assert!(past_rows > 300, "{past_rows}");
        // After training on a new task its units dominate old samples: the rule must bite.
        assert!(scaled > past_rows / 10, "{scaled} of {past_rows}");
    }

    #[test]
    fn online_rewrites_touch_drawn_past_samples_on_present_and_future_units_only() {
        let (steps, ends, s) = recorded();
        let units = s.num_units;
        let (mut checked, mut task, mut drawn_before) = (0, usize::MAX, Vec::new());
        for (k, (t, drawn, before, after)) in steps.iter().enumerate() {
            let r = s.tasks[*t].units.clone();
            let first_step = *t != task;
            if first_step {
                task = *t;
                drawn_before.clear();
            }
            // The buffer holds only past tasks while a task trains.
            let Some((_, samples, ..)) = ends.iter().find(|e| e.0 + 1 == *t) else {
                assert!(drawn.is_empty() && before == after, "step {k}");
                continue;
            };
            for i in 0..before.len() {
                let (b, a) = (&before[i], &after[i]);
                assert_eq!(a[..r.start], b[..r.start], "step {k} slot {i}");
                if !drawn.contains(&samples[i]) {
                    assert_eq!(a, b, "step {k}: undrawn slot {i} changed");
                } else if !first_step && !drawn_before.contains(&samples[i]) {
                    // First draw in the task, once the model has moved: always rewritten.
                    assert_ne!(a[r.start..units], b[r.start..units], "step {k} slot {i}");
                    checked += 1;
                }
            }
            drawn_before.extend(drawn.iter().copied());
        }
        assert!(checked > 100, "{checked}");
    }
}
