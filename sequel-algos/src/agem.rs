//! A-GEM — Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient
//! Lifelong Learning with A-GEM", ICLR 2019).
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
//! task-IL) and after gradient clipping (`training.clip_grad_norm`), which must not come later or
//! the clipped gradient would no longer be the projection of the gradient the optimizer uses.
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
//! second task on), and three f64 copies of the gradient. The memory's forward pass runs in
//! training mode, like the current batch's (so both gradients see batch statistics); with batch
//! normalisation it also moves the running statistics, as in the reference implementations.

use candle_core::{backprop::GradStore, Tensor};
use serde::{Deserialize, Serialize};

use sequel_core::buffer::{BufferPolicy, InsertAt};
use sequel_core::{
    Algorithm, AlgorithmConfig, Memory, MemoryConfig, Result, StateIo, StepCtx, TaskCtx,
};

use crate::check;
use crate::flat;

/// YAML keys of `algorithm: { name: agem, ... }`, besides the memory's (`buffer_size: 200`;
/// `buffer_policy: task_quota`, ⌊buffer_size / T⌋ slots per task; `insert: task_end`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgemConfig {
    /// Memory samples of the reference gradient g_ref (all of them if the memory holds fewer).
    /// Default 256 (the paper).
    pub replay_batch_size: usize,
    #[serde(skip)]
    pub memory: MemoryConfig,
}

/// The memory of the paper: a fixed quota per task, filled at the task's end.
pub(crate) fn episodic_memory() -> MemoryConfig {
    MemoryConfig {
        buffer_size: 200,
        buffer_policy: BufferPolicy::TaskQuota,
        insert: InsertAt::TaskEnd,
    }
}

impl Default for AgemConfig {
    fn default() -> Self {
        Self {
            replay_batch_size: 256,
            memory: episodic_memory(),
        }
    }
}

impl AlgorithmConfig for AgemConfig {
    const NAME: &'static str = "agem";
    const SUMMARY: &'static str = "A-GEM: project the gradient when it conflicts with a memory batch's (Chaudhry et al. 2019)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Agem::new(self)?))
    }
    fn memory(&mut self) -> Option<&mut MemoryConfig> {
        Some(&mut self.memory)
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
    Ok(Some(flat::add_scaled(g, -c, g_ref)?))
}

impl Agem {
    pub fn new(cfg: AgemConfig) -> Result<Self> {
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        Ok(Self {
            replay_batch_size: cfg.replay_batch_size,
            memory: Memory::new(cfg.memory, false)?,
            steps_with_reference: 0,
            projections: 0,
        })
    }

    /// `(steps with a reference gradient, steps projected)` so far.
    pub fn projection_counts(&self) -> (usize, usize) {
        (self.steps_with_reference, self.projections)
    }
}

impl Algorithm for Agem {
    fn edit_gradients(&mut self, grads: &mut GradStore, ctx: &mut StepCtx) -> Result<()> {
        let drawn = self
            .memory
            .draw(self.replay_batch_size, ctx.stream, ctx.device)?;
        if drawn.is_empty() {
            return Ok(());
        }
        let g_ref = flat::loss_gradient(ctx.model, ctx.stream, &drawn.batch)?;
        ctx.charge(drawn.batch.len(), drawn.batch.len());
        let params = ctx.model.params();
        let g = flat::flatten(params, grads)?;
        self.steps_with_reference += 1;
        if let Some(projected) = project(&g, &g_ref)? {
            flat::write_back(params, grads, &projected)?;
            self.projections += 1;
        }
        Ok(())
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        tracing::info!(
            task = ctx.task + 1,
            steps = self.steps_with_reference,
            projected = self.projections,
            "a-gem projections so far"
        );
        Ok(())
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.field("steps_with_reference", &mut self.steps_with_reference)?;
        io.field("projections", &mut self.projections)
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::host_dot;
    use candle_core::Device;

    fn t(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn conflicting_gradient_is_projected_to_the_closed_form() {
        let g = [1.0, -2.0, 0.5, 3.0];
        let r = [-0.5, 1.0, 2.0, -1.0];
        // g·r = −0.5 − 2 + 1 − 3 = −4.5; r·r = 6.25; g̃ = g + 0.72 r.
        let want = [0.64, -1.28, 1.94, 2.28];
        let got: Vec<f64> = project(&t(&g), &t(&r)).unwrap().unwrap().to_vec1().unwrap();
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{got:?}");
        }
        assert!(host_dot(&got, &r).abs() < 1e-12);
    }

    #[test]
    fn non_conflicting_gradient_is_left_alone() {
        let g = t(&[1.0, 2.0, 0.0]);
        assert!(project(&g, &t(&[0.5, 0.1, -3.0])).unwrap().is_none());
        // Orthogonal and zero reference gradients: g·g_ref = 0, nothing to project (and no 0/0).
        assert!(project(&g, &t(&[-2.0, 1.0, 7.0])).unwrap().is_none());
        assert!(project(&g, &t(&[0.0, 0.0, 0.0])).unwrap().is_none());
    }
}
