//! ER — Experience Replay with a reservoir buffer (Chaudhry et al. 2019, "On Tiny Episodic
//! Memories in Continual Learning"; Mammoth's `er`).
//!
//! Every step trains on the incoming batch joined with a batch drawn from the memory `M`:
//!
//! `L(θ) = CE( f_θ([x ; x′]), [y ; y′] )`,  `(x′, y′) ~ M`, `|x′| = replay_batch_size`
//!
//! one cross-entropy over the concatenation (so each replayed sample weighs as much as an incoming
//! one). After the step the *incoming* samples — never the replayed ones — are offered to the
//! memory (Algorithm R by default, so after `N` samples each is stored with probability `M/N`).
//! With `insert: task_end` the memory is filled from each finished task instead (Avalanche's
//! default), which makes ER a pure "rehearse the past" method within a task.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::{Algorithm, AlgorithmConfig, Memory, MemoryConfig, Result, StepCtx};

use crate::check;

/// YAML keys of `algorithm: { name: er, ... }`, besides the memory's (`buffer_size: 200`,
/// `buffer_policy: reservoir`, `insert: step`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErConfig {
    /// Samples drawn from the memory per step (Mammoth uses the stream batch size).
    pub replay_batch_size: usize,
    #[serde(skip)]
    pub memory: MemoryConfig,
}

impl Default for ErConfig {
    fn default() -> Self {
        Self {
            replay_batch_size: 10,
            memory: MemoryConfig::default(),
        }
    }
}

impl AlgorithmConfig for ErConfig {
    const NAME: &'static str = "er";
    const SUMMARY: &'static str =
        "Experience Replay: each batch joined with a reservoir-buffer batch (Chaudhry et al. 2019)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Er::new(self)?))
    }
    fn memory(&mut self) -> Option<&mut MemoryConfig> {
        Some(&mut self.memory)
    }
}

pub struct Er {
    replay_batch_size: usize,
    memory: Memory,
}

impl Er {
    pub fn new(cfg: ErConfig) -> Result<Self> {
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        Ok(Self {
            replay_batch_size: cfg.replay_batch_size,
            memory: Memory::new(cfg.memory, false)?,
        })
    }
}

impl Algorithm for Er {
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let replay = self
            .memory
            .draw(self.replay_batch_size, ctx.stream, ctx.device)?;
        let f = ctx.forward(&[batch, &replay.batch])?;
        ctx.task_loss(&f.out.logits, &f.batch)
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}
