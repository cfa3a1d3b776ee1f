//! ER — Experience Replay with a reservoir buffer (Chaudhry et al. 2019, "On Tiny Episodic
//! Memories in Continual Learning"; Mammoth's `er`).
//!
//! Every step trains on the incoming batch joined with a batch drawn from the memory `M`:
//!
//! `L(θ) = CE( f_θ([x ; x′]), [y ; y′] )`,  `(x′, y′) ~ M`, `|x′| = replay_batch_size`
//!
//! one cross-entropy over the concatenation (so each replayed sample weighs as much as an incoming
//! one). After the step the *incoming* samples — never the replayed ones — are offered to the
//! buffer (Algorithm R by default, so after `N` samples each is stored with probability `M/N`).
//! With `insert: task_end` the buffer is filled from each finished task instead (Avalanche's
//! default), which makes ER a pure "rehearse the past" method within a task.

use sequel_core::checkpoint::StateDict;
use serde::{Deserialize, Serialize};

use sequel_core::buffer::{BufferPolicy, InsertAt};
use sequel_core::data::Batch;
use sequel_core::model::ModelOutput;
use sequel_core::{Algorithm, Result, StepCtx, TaskCtx};

use crate::check;
use crate::replay::Memory;

/// YAML keys of `algorithm: { name: er, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErConfig {
    /// Memory size M in samples. Default 200.
    #[serde(default = "default_buffer_size")]
    pub buffer_size: usize,
    /// Samples drawn from the memory per step. Default 10 (Mammoth uses the stream batch size).
    #[serde(default = "default_replay_batch_size")]
    pub replay_batch_size: usize,
    /// `reservoir` (default), `class_balanced` or `task_quota`.
    #[serde(default = "reservoir")]
    pub buffer_policy: BufferPolicy,
    /// `step` (default: insert every step) or `task_end`.
    #[serde(default = "step")]
    pub insert: InsertAt,
}

pub(crate) fn default_buffer_size() -> usize {
    200
}

pub(crate) fn default_replay_batch_size() -> usize {
    10
}

pub(crate) fn reservoir() -> BufferPolicy {
    BufferPolicy::Reservoir
}

pub(crate) fn step() -> InsertAt {
    InsertAt::Step
}

impl Default for ErConfig {
    fn default() -> Self {
        Self {
            buffer_size: default_buffer_size(),
            replay_batch_size: default_replay_batch_size(),
            buffer_policy: reservoir(),
            insert: step(),
        }
    }
}

pub struct Er {
    replay_batch_size: usize,
    memory: Memory,
}

impl Er {
    pub fn new(cfg: ErConfig) -> Result<Self> {
        check::at_least_one("buffer_size", cfg.buffer_size)?;
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        Ok(Self {
            replay_batch_size: cfg.replay_batch_size,
            memory: Memory::new(cfg.buffer_size, cfg.buffer_policy, cfg.insert, false),
        })
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }
}

impl Algorithm for Er {
    fn name(&self) -> &str {
        "er"
    }

    fn save_state(&self) -> Result<Option<StateDict>> {
        self.memory.state()
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        self.memory.load(state)
    }

    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.memory.ensure(ctx.stream, ctx.rng)
    }

    fn prepare_batch(&mut self, batch: Batch, ctx: &mut StepCtx) -> Result<Batch> {
        match self
            .memory
            .draw(self.replay_batch_size, ctx.stream, ctx.device)?
        {
            Some(drawn) => batch.append(&drawn.batch),
            None => Ok(batch),
        }
    }

    fn after_step(&mut self, batch: &Batch, out: &ModelOutput, _ctx: &mut StepCtx) -> Result<()> {
        self.memory.after_step(batch, out)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.memory.after_task(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mini_trainer, Probe};
    use sequel_core::trainer::Silent;

    /// ER with a recorder of what each step trained on.
    struct Watch {
        er: Er,
        /// (task, incoming, replayed tasks) per step.
        steps: Vec<(usize, usize, Vec<u32>)>,
    }

    impl Algorithm for Watch {
        fn name(&self) -> &str {
            "er-watch"
        }
        fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
            self.er.before_task(ctx)
        }
        fn prepare_batch(&mut self, batch: Batch, ctx: &mut StepCtx) -> Result<Batch> {
            let b = self.er.prepare_batch(batch, ctx)?;
            self.steps
                .push((ctx.task, b.incoming, b.tasks[b.incoming..].to_vec()));
            Ok(b)
        }
        fn after_step(&mut self, b: &Batch, o: &ModelOutput, ctx: &mut StepCtx) -> Result<()> {
            self.er.after_step(b, o, ctx)
        }
        fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
            self.er.after_task(ctx)
        }
    }

    fn watch(cfg: ErConfig) -> Probe<Watch> {
        Probe::new(Watch {
            er: Er::new(cfg).unwrap(),
            steps: Vec::new(),
        })
    }

    #[test]
    fn replays_past_samples_and_stores_only_incoming_ones() {
        let probe = watch(ErConfig {
            buffer_size: 30,
            replay_batch_size: 7,
            ..ErConfig::default()
        });
        let mut t = mini_trainer(Box::new(probe.clone()), &["benchmark.tasks=3"]);
        t.run(&mut Silent).unwrap();
        let w = probe.lock();
        // 3 tasks × 50 samples at batch 10.
        assert_eq!(w.steps.len(), 15);
        assert!(
            w.steps[0].2.is_empty(),
            "nothing to replay at the first step"
        );
        for (task, incoming, replayed) in &w.steps[1..] {
            assert_eq!(*incoming, 10);
            assert_eq!(replayed.len(), 7);
            assert!(replayed.iter().all(|&r| r as usize <= *task));
        }
        // Later tasks replay earlier ones.
        assert!(w.steps[10..].iter().any(|s| s.2.contains(&0)));
        let buffer = w.er.memory().buffer().unwrap();
        // Only the 150 stream samples were offered — never the replayed ones.
        assert_eq!(buffer.seen(), 150);
        assert_eq!(buffer.len(), 30);
        let mut refs = buffer.samples().to_vec();
        refs.sort_by_key(|r| (r.task, r.index));
        refs.dedup();
        assert_eq!(refs.len(), 30, "a sample was stored twice");
    }

    #[test]
    fn task_end_insertion_fills_the_buffer_after_each_task_only() {
        let probe = watch(ErConfig {
            buffer_size: 20,
            insert: InsertAt::TaskEnd,
            ..ErConfig::default()
        });
        let mut t = mini_trainer(Box::new(probe.clone()), &["benchmark.tasks=2"]);
        t.run(&mut Silent).unwrap();
        let w = probe.lock();
        // Task 1 never replays (the buffer is empty until its end); task 2 always does, task 1's.
        assert!(w.steps[..5].iter().all(|s| s.2.is_empty()));
        assert!(w.steps[5..]
            .iter()
            .all(|s| s.2.len() == 10 && s.2.iter().all(|&r| r == 0)));
        assert_eq!(w.er.memory().buffer().unwrap().seen(), 100);
    }

    #[test]
    fn er_changes_the_trajectory_and_reduces_class_il_forgetting() {
        let run = |algo: Box<dyn Algorithm>| {
            let mut t = mini_trainer(algo, &["benchmark.train_subset=100"]);
            t.run(&mut Silent).unwrap().matrix
        };
        let naive = run(Box::new(crate::naive::Naive));
        let er = run(Box::new(
            Er::new(ErConfig {
                buffer_size: 100,
                ..ErConfig::default()
            })
            .unwrap(),
        ));
        assert_ne!(naive.rows, er.rows);
        let old = |m: &sequel_core::metrics::AccuracyMatrix| m.rows[4][..4].iter().sum::<f64>();
        // Naive keeps (almost) nothing of tasks 1–4 in class-IL; replay must keep something.
        assert!(
            old(&er) > old(&naive) + 0.2,
            "er {:?} naive {:?}",
            er.rows[4],
            naive.rows[4]
        );
    }
}
