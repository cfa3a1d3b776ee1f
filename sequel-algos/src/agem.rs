//! A-GEM — Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient
//! Lifelong Learning with A-GEM", ICLR 2019, eq. 11).
//!
//! Every step, with `g` the gradient of the current batch's loss and `g_ref` the gradient of the
//! loss on `replay_batch_size` samples drawn at random from the episodic memory `M` (at the
//! current weights):
//!
//! `g̃ = g − (gᵀg_ref / g_refᵀg_ref) · g_ref`   if `gᵀg_ref < 0`,   else `g̃ = g`
//!
//! — the smallest change of `g` after which the step no longer increases the average loss on the
//! memory (to first order). The optimizer then steps with `g̃`. The episodic memory is filled at the
//! end of each task with a fixed quota of that task's samples (`⌊buffer_size / T⌋` for `T` tasks),
//! so it holds exactly the past tasks while a task trains.
//!
//! **Order.** The projection is the last edit before the optimizer step: it runs in
//! `edit_gradients`, after the trainer has removed the gradients of absent heads (multi-head
//! task-IL); sequel has no gradient clipping — if one is added, it must come *before* this hook,
//! or the clipped gradient would no longer satisfy `g̃ᵀg_ref ≥ 0`.
//!
//! **Vectors.** `g` and `g_ref` are flattened over every trainable parameter in the model's fixed
//! parameter order ([`crate::flat`]); a parameter absent from one of them counts as zero there.
//! In multi-head task-IL the memory batch reaches the heads of past tasks, which the current batch
//! does not: `g̃` then moves those heads too (by `−c·g_ref`), as the paper's single flattened
//! projection implies.
//!
//! **Defaults.** `replay_batch_size: 256` is the paper's reference-gradient batch (also SequeL's);
//! `buffer_size: 200` as ER. With `insert: step` the memory also holds the current task's samples
//! (Mammoth's "A-GEM-R" variant). In class-IL, A-GEM is expected to score close to naive
//! fine-tuning (Buzzega et al. 2020 report 20.04 % on seq-CIFAR-10, about naive's level): the
//! projection protects the shared features, not the old classes' logits against the new ones.
//!
//! **Cost.** One extra forward/backward pass on `replay_batch_size` samples per step (from the
//! second task on), and three f64 copies of the gradient.

use candle_core::{backprop::GradStore, Tensor};
use serde::{Deserialize, Serialize};

use sequel_core::buffer::{BufferPolicy, InsertAt};
use sequel_core::data::Batch;
use sequel_core::model::ModelOutput;
use sequel_core::{Algorithm, Result, StepCtx, TaskCtx};

use crate::check;
use crate::er::default_buffer_size;
use crate::flat;
use crate::replay::Memory;

/// YAML keys of `algorithm: { name: agem, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgemConfig {
    /// Episodic memory size in samples, over all tasks. Default 200.
    #[serde(default = "default_buffer_size")]
    pub buffer_size: usize,
    /// Memory samples of the reference gradient g_ref (all of them if the memory holds fewer).
    /// Default 256 (the paper).
    #[serde(default = "default_reference_batch")]
    pub replay_batch_size: usize,
    /// `task_quota` (default: ⌊buffer_size / T⌋ slots per task), `reservoir` or `class_balanced`.
    #[serde(default = "task_quota")]
    pub buffer_policy: BufferPolicy,
    /// `task_end` (default: insert each finished task) or `step`.
    #[serde(default = "task_end")]
    pub insert: InsertAt,
}

pub(crate) fn default_reference_batch() -> usize {
    256
}

pub(crate) fn task_quota() -> BufferPolicy {
    BufferPolicy::TaskQuota
}

pub(crate) fn task_end() -> InsertAt {
    InsertAt::TaskEnd
}

impl Default for AgemConfig {
    fn default() -> Self {
        Self {
            buffer_size: default_buffer_size(),
            replay_batch_size: default_reference_batch(),
            buffer_policy: task_quota(),
            insert: task_end(),
        }
    }
}

pub struct Agem {
    replay_batch_size: usize,
    memory: Memory,
    /// Steps that had a reference gradient, and steps whose gradient was projected.
    steps_with_reference: usize,
    projections: usize,
}

/// `g − (g·g_ref / g_ref·g_ref) g_ref` if `g·g_ref < 0`, else `None` (no change). Flat f64 vectors.
pub fn project(g: &Tensor, g_ref: &Tensor) -> Result<Option<Tensor>> {
    let gg_ref = flat::dot(g, g_ref)?;
    if gg_ref >= 0.0 {
        return Ok(None);
    }
    // g·g_ref < 0 implies g_ref ≠ 0, so the division is safe.
    let c = gg_ref / flat::dot(g_ref, g_ref)?;
    Ok(Some((g - (g_ref * c)?)?))
}

impl Agem {
    pub fn new(cfg: AgemConfig) -> Result<Self> {
        check::at_least_one("buffer_size", cfg.buffer_size)?;
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        Ok(Self {
            replay_batch_size: cfg.replay_batch_size,
            memory: Memory::new(cfg.buffer_size, cfg.buffer_policy, cfg.insert, false),
            steps_with_reference: 0,
            projections: 0,
        })
    }

    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// `(steps with a reference gradient, steps projected)` so far.
    pub fn projection_counts(&self) -> (usize, usize) {
        (self.steps_with_reference, self.projections)
    }
}

impl Algorithm for Agem {
    fn name(&self) -> &str {
        "agem"
    }

    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.memory.ensure(ctx.stream, ctx.rng)
    }

    fn edit_gradients(&mut self, grads: &mut GradStore, ctx: &mut StepCtx) -> Result<()> {
        let Some(drawn) = self
            .memory
            .draw(self.replay_batch_size, ctx.stream, ctx.device)?
        else {
            return Ok(());
        };
        let g_ref = flat::loss_gradient(ctx.model, ctx.stream, &drawn.batch)?;
        let params = ctx.model.params();
        let g = flat::flatten(params, grads)?;
        self.steps_with_reference += 1;
        if let Some(projected) = project(&g, &g_ref)? {
            flat::write_back(params, grads, &projected)?;
            self.projections += 1;
        }
        Ok(())
    }

    fn after_step(&mut self, batch: &Batch, out: &ModelOutput, _ctx: &mut StepCtx) -> Result<()> {
        self.memory.after_step(batch, out)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        tracing::info!(
            task = ctx.task + 1,
            steps = self.steps_with_reference,
            projected = self.projections,
            "a-gem projections so far"
        );
        self.memory.after_task(ctx)
    }
}
