//! ER-ACE — Experience Replay with the asymmetric cross-entropy (Caccia, Aljundi, Asadi,
//! Tuytelaars, Pineau & Belilovsky, "New Insights on Reducing Abrupt Representation Change in
//! Online Continual Learning", ICLR 2022).
//!
//! From the second task on, every step:
//!
//! `L(θ) = CE( f_θ(x) + m, y ) + CE( f_θ(x′), y′ )`,  `(x′, y′) ~ M`
//!
//! The incoming batch only competes against the classes it contains: the additive mask `m` is 0
//! on the units of the classes present in the batch and on the classes never seen so far, −∞
//! (−10⁹) on every other seen class. So new data does not push down the logits of old classes —
//! the abrupt change of the old classes' representation the paper measures at each task switch —
//! while the replayed samples are classified over all units, unmasked. Each term is a mean over
//! its own batch; the buffer batch is appended to the incoming one, so one training-mode forward
//! pass serves both terms and the loss splits the rows.
//! The buffer is a reservoir filled every step with the incoming samples.
//!
//! On the first task the loss is the plain cross-entropy of the incoming batch (no mask, no
//! replay), as Mammoth's `er_ace`: the buffer holds only the current task, so there is nothing
//! to protect yet.
//!
//! **Which classes stay.** "Present" is computed from the targets of each incoming batch;
//! "seen" is every target of an incoming batch so far, this one included. The unseen classes are
//! kept (as in Mammoth's `er_ace`): their logits are pushed down by new data, which is
//! harmless since nothing has been learnt for them. Mammoth keeps every unit ≥ the largest seen
//! one; that also keeps the largest seen class when it is absent from the batch — here the set of
//! seen units decides, so an absent seen class is always masked.
//!
//! **Task-IL.** With a single head (`task_il_head: masked`) training is as in class-IL. In
//! multi-head task-IL both masks apply: each incoming sample's logits are first restricted to its
//! task's head (old classes are already outside it), then the ACE mask removes the seen classes of
//! the current task absent from the batch; the replay CE uses each sample's own head
//! ([`task_loss`]), which is the "unmasked" loss of that scenario.
//!
//! **Domain-IL** (permuted, rotated) runs, but every task reuses the same units: from the second
//! task on, the incoming CE is restricted to the classes of each batch. The method was designed
//! for growing label spaces (Mammoth lists it for class-IL and task-IL only).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use sequel_core::data::{Batch, TaskStream};
use sequel_core::loss::task_loss;
use sequel_core::state::Flags;
use sequel_core::{
    Algorithm, AlgorithmConfig, Error, Memory, MemoryConfig, Result, StateIo, StepCtx, TaskCtx,
};

use crate::check;

/// The −∞ stand-in of the additive masks (as [`sequel_core::loss::unit_mask`]).
const MASKED: f32 = -1e9;

/// YAML keys of `algorithm: { name: er-ace, ... }`, besides the memory's (`buffer_size: 200`,
/// `buffer_policy: reservoir`, `insert: step`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErAceConfig {
    /// Samples drawn from the memory per step (Mammoth's `minibatch_size` = batch size).
    pub replay_batch_size: usize,
    #[serde(skip)]
    pub memory: MemoryConfig,
}

impl Default for ErAceConfig {
    fn default() -> Self {
        Self {
            replay_batch_size: 10,
            memory: MemoryConfig::default(),
        }
    }
}

impl AlgorithmConfig for ErAceConfig {
    const NAME: &'static str = "er-ace";
    const SUMMARY: &'static str = "ER with asymmetric CE: incoming logits masked to the batch's and unseen classes, replay unmasked (Caccia et al. 2022)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(ErAce::new(self)?))
    }
    fn memory(&mut self) -> Option<&mut MemoryConfig> {
        Some(&mut self.memory)
    }
}

pub struct ErAce {
    replay_batch_size: usize,
    memory: Memory,
    /// Per output unit: whether it has been the target of an incoming sample.
    seen: Flags,
}

impl ErAce {
    pub fn new(cfg: ErAceConfig) -> Result<Self> {
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        Ok(Self {
            replay_batch_size: cfg.replay_batch_size,
            memory: Memory::new(cfg.memory, false)?,
            seen: Flags::default(),
        })
    }
}

/// The ACE mask of an incoming batch, `B × U` additive (0 kept, −10⁹ masked), row-major. `units`
/// and `tasks` are the batch's targets and tasks; `seen` marks every unit seen as an incoming
/// target so far, this batch's included. A unit is kept for a row when it is the target of some
/// sample of the batch or unseen, and — in multi-head task-IL — belongs to the row's task.
pub fn ace_mask(units: &[u32], tasks: &[u32], seen: &[bool], stream: &TaskStream) -> Vec<f32> {
    let n = seen.len();
    let mut keep = seen.iter().map(|&s| !s).collect::<Vec<bool>>();
    for &u in units {
        keep[u as usize] = true;
    }
    let row: Vec<f32> = keep.iter().map(|&k| if k { 0.0 } else { MASKED }).collect();
    let mut m = Vec::with_capacity(units.len() * n);
    for &t in tasks {
        let start = m.len();
        m.extend_from_slice(&row);
        if stream.mask_in_training() {
            let r = &stream.tasks[t as usize].units;
            for (u, v) in m[start..start + n].iter_mut().enumerate() {
                if !r.contains(&u) {
                    *v = MASKED;
                }
            }
        }
    }
    m
}

/// `CE(f(x) + m, y)` for the incoming batch under the ACE mask.
pub fn asymmetric_ce(
    logits: &Tensor,
    batch: &Batch,
    seen: &[bool],
    stream: &TaskStream,
) -> Result<Tensor> {
    let mask = ace_mask(&batch.units, &batch.tasks, seen, stream);
    let mask = Tensor::from_vec(mask, logits.dims(), logits.device())?;
    Ok(candle_nn::loss::cross_entropy(&(logits + mask)?, &batch.y)?)
}

impl Algorithm for ErAce {
    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.seen.0.resize(ctx.stream.num_units, false);
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        for &u in &batch.units {
            let s = self.seen.0.get_mut(u as usize);
            *s.ok_or_else(|| Error::msg(format!("target unit {u} outside the output units")))? =
                true;
        }
        if ctx.task == 0 {
            return ctx.ce(batch);
        }
        let replay = self
            .memory
            .draw(self.replay_batch_size, ctx.stream, ctx.device)?;
        let f = ctx.forward(&[batch, &replay.batch])?;
        let mut loss = asymmetric_ce(&f.logits(0)?, batch, &self.seen.0, ctx.stream)?;
        if f.has(1) {
            loss = (loss + task_loss(&f.logits(1)?, &replay.batch, ctx.stream)?)?;
        }
        Ok(loss)
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.field("seen", &mut self.seen)
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};
    use sequel_core::data::GatherBuf;
    use sequel_core::trainer::Silent;

    use super::*;
    use crate::testing::{mini_trainer, observe_run, observed, Observer};

    fn stream(over: &[&str]) -> TaskStream {
        mini_trainer(Box::new(crate::naive::Naive), over).stream
    }

    fn kept(mask: &[f32], rows: usize) -> Vec<Vec<usize>> {
        mask.chunks(mask.len() / rows)
            .map(|r| (0..r.len()).filter(|&u| r[u] == 0.0).collect())
            .collect()
    }

    fn seen(units: &[usize]) -> Vec<bool> {
        (0..10).map(|u| units.contains(&u)).collect()
    }

    #[test]
    fn mask_keeps_the_present_and_the_unseen_classes() {
        let class_il = stream(&[]);
        let masked_til = stream(&["benchmark.scenario=task-il"]);
        let multi = stream(&["benchmark.scenario=task-il", "benchmark.task_il_head=multi"]);
        // Task 3 (units 4–5) after tasks 1–2; the batch holds units 2 (a replayed-looking old class,
        // as in a task-free stream) and 4; unit 5 has not been seen yet.
        let s = seen(&[0, 1, 2, 3, 4]);
        for st in [&class_il, &masked_til] {
            let m = ace_mask(&[4, 2, 4], &[2, 1, 2], &s, st);
            assert_eq!(kept(&m, 3), vec![vec![2, 4, 5, 6, 7, 8, 9]; 3]);
            assert!(m.iter().all(|&v| v == 0.0 || v == MASKED));
        }
        // Once unit 5 has been seen, a batch without it masks it too.
        let s = seen(&[0, 1, 2, 3, 4, 5]);
        assert_eq!(
            kept(&ace_mask(&[4, 4], &[2, 2], &s, &class_il), 2),
            vec![vec![4, 6, 7, 8, 9]; 2]
        );
        // Multi-head: each row also stays inside its task's head.
        assert_eq!(
            kept(&ace_mask(&[4, 4], &[2, 2], &s, &multi), 2),
            vec![vec![4]; 2]
        );
        let s = seen(&[0, 1, 2, 3, 4]);
        assert_eq!(kept(&ace_mask(&[4], &[2], &s, &multi), 1), vec![vec![4, 5]]);
    }

    #[test]
    fn masked_logits_get_no_gradient() {
        let st = stream(&[]);
        let dev = Device::Cpu;
        let z = candle_core::Var::from_vec(
            (0..30)
                .map(|i| (i % 7) as f32 * 0.3 - 1.0)
                .collect::<Vec<f32>>(),
            (3, 10),
            &dev,
        )
        .unwrap();
        let batch = Batch {
            x: Tensor::zeros((3, 1, 1, 1), candle_core::DType::F32, &dev).unwrap(),
            y: Tensor::new(&[4u32, 2, 4], &dev).unwrap(),
            units: vec![4, 2, 4],
            tasks: vec![2, 1, 2],
            refs: vec![sequel_core::data::SampleRef { task: 0, index: 0 }; 3],
            incoming: 3,
        };
        let s = seen(&[0, 1, 2, 3, 4]);
        let l = asymmetric_ce(z.as_tensor(), &batch, &s, &st).unwrap();
        let g = l.backward().unwrap();
        let g = g.get(z.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        for row in &g {
            for (u, &v) in row.iter().enumerate() {
                assert_eq!(v == 0.0, [0, 1, 3].contains(&u), "unit {u}: {v}");
            }
        }
        // The value is the CE over the kept units only.
        let zs = z.to_vec2::<f32>().unwrap();
        let keep = [2usize, 4, 5, 6, 7, 8, 9];
        let want = zs
            .iter()
            .zip([4usize, 2, 4])
            .map(|(r, y)| {
                let lse = keep.iter().map(|&u| (r[u] as f64).exp()).sum::<f64>().ln();
                lse - r[y] as f64
            })
            .sum::<f64>()
            / 3.0;
        let got = l.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    /// Checks, at every step, that ER-ACE's loss is the masked CE of the incoming batch plus
    /// the *unmasked* CE of the drawn buffer batch (recomputed by hand on the host).
    struct Check {
        checked: usize,
        old_targets_replayed: usize,
    }

    impl Observer<ErAce> for Check {
        fn loss(&mut self, ace: &mut ErAce, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
            let loss = ace.loss(batch, ctx)?;
            let l = loss.to_scalar::<f32>()? as f64;
            let out = ctx.incoming_output().unwrap().clone();
            let parts = ctx.forwarded_parts().to_vec();
            if ctx.task == 0 {
                assert_eq!(
                    l,
                    ctx.task_loss(&out.logits, batch)?.to_scalar::<f32>()? as f64
                );
                assert_eq!(parts.len(), 1, "no replay on the first task");
                return Ok(loss);
            }
            let incoming = asymmetric_ce(&out.logits, batch, &ace.seen.0, ctx.stream)?
                .to_scalar::<f32>()? as f64;
            assert_eq!(parts[1].len(), 10);
            let b = ctx.stream.gather(
                &parts[1],
                sequel_core::data::Split::Train,
                &mut GatherBuf::default(),
                ctx.device,
            )?;
            let z = ctx.model.forward(&b.x, true)?.logits;
            let lse = z.exp()?.sum(D::Minus1)?.log()?.to_vec1::<f32>()?;
            let z = z.to_vec2::<f32>()?;
            let replay = (0..b.len())
                .map(|i| lse[i] as f64 - z[i][b.units[i] as usize] as f64)
                .sum::<f64>()
                / b.len() as f64;
            assert!(
                (l - incoming - replay).abs() < 1e-4,
                "{l} ≠ {incoming} + {replay}"
            );
            self.checked += 1;
            // Replayed targets the incoming batch's mask removes.
            let masked = ace_mask(&batch.units, &batch.tasks, &ace.seen.0, ctx.stream);
            self.old_targets_replayed += b
                .units
                .iter()
                .filter(|&&u| masked[u as usize] != 0.0)
                .count();
            Ok(loss)
        }
    }

    #[test]
    fn loss_is_masked_incoming_ce_plus_unmasked_replay_ce() {
        let check = Check {
            checked: 0,
            old_targets_replayed: 0,
        };
        let ace = ErAce::new(ErAceConfig::default()).unwrap();
        let (t, _) = observe_run(ace, check, &["benchmark.tasks=3"]);
        let p = observed::<ErAce, Check>(&t);
        let c = &p.observer;
        assert_eq!(c.checked, 10);
        assert!(c.old_targets_replayed > 50, "{}", c.old_targets_replayed);
        // Three tasks of two classes: six units, all seen.
        assert_eq!(p.algo.seen.0, &[true; 6]);
    }

    #[test]
    fn runs_five_tasks_in_every_scenario_and_differs_from_er() {
        let reg = crate::Registry::builtin();
        let spec: serde_yaml::Value = serde_yaml::from_str("{ name: er-ace }").unwrap();
        let mut rows = Vec::new();
        for over in [
            &[][..],
            &["benchmark.scenario=task-il"][..],
            &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"][..],
        ] {
            let (algo, _) = reg.build_algorithm(&spec, "t.yaml").unwrap();
            let mut t = mini_trainer(algo, over);
            let out = t.run(&mut Silent).unwrap();
            assert!(out.failure.is_none(), "{over:?}");
            assert_eq!(out.matrix.rows.len(), 5);
            rows.push(out.results.matrix.rows);
        }
        let er = mini_trainer(
            Box::new(crate::er::Er::new(Default::default()).unwrap()),
            &[],
        )
        .run(&mut Silent)
        .unwrap();
        assert_ne!(rows[0], er.matrix.rows);
    }
}
