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
