//! The `Algorithm` trait: every continual-learning method plugs into the trainer through these
//! hooks, all of which default to plain fine-tuning. Hooks receive explicit context structs — never
//! a shared mutable bag — so what each hook may read or change is visible in its signature.
//!
//! Loop order (see docs/architecture.md):
//! `before_task → training_samples → [prepare_batch → forward → loss → backward → edit_gradients →
//! optimizer step → after_step]* → after_task → consolidation → evaluation (predict)`.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{backprop::GradStore, Device, Tensor};

use crate::checkpoint::StateDict;
use crate::data::{Batch, SampleRef, TaskStream};
use crate::error::Result;
use crate::loss;
use crate::model::{Model, ModelOutput};
use crate::rng::SeededRng;

/// What hooks at task granularity see.
pub struct TaskCtx<'a> {
    /// 0-based index of the current task.
    pub task: usize,
    pub stream: &'a TaskStream,
    pub model: &'a dyn Model,
    pub device: &'a Device,
    /// The algorithm's own seeded random stream (buffer sampling etc.).
    pub rng: &'a mut SeededRng,
    /// Set when the user asked to stop (Ctrl-C): long task-level work (a re-fit, an importance
    /// estimate) should return [`crate::Error::Stopped`] at its next convenient point.
    pub interrupt: Option<&'a AtomicBool>,
}

impl TaskCtx<'_> {
    /// Whether the user asked to stop.
    pub fn interrupted(&self) -> bool {
        self.interrupt.is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// What hooks at step granularity see.
pub struct StepCtx<'a> {
    pub task: usize,
    pub epoch: usize,
    /// Step within the current task (0-based, counts across epochs).
    pub step: usize,
    pub stream: &'a TaskStream,
    pub model: &'a dyn Model,
    pub device: &'a Device,
    pub rng: &'a mut SeededRng,
}

impl StepCtx<'_> {
    /// Cross-entropy of the batch under the scenario's training mask (see [`loss::task_loss`]).
    pub fn task_loss(&self, out: &ModelOutput, batch: &Batch) -> Result<Tensor> {
        loss::task_loss(&out.logits, batch, self.stream)
    }
}

/// What prediction sees.
pub struct EvalCtx<'a> {
    /// The task being evaluated.
    pub task: usize,
    /// The number of tasks trained so far (0 for the untrained model).
    pub trained_tasks: usize,
    pub stream: &'a TaskStream,
    pub model: &'a dyn Model,
}

/// A continual-learning algorithm. Override only the hooks you need.
pub trait Algorithm: Send {
    /// Registry name.
    fn name(&self) -> &str;

    /// H0: before training on a task (snapshot a teacher, swap the data, ...).
    fn before_task(&mut self, _ctx: &mut TaskCtx) -> Result<()> {
        Ok(())
    }

    /// The samples to train on during this task. Default: the task's own training set.
    fn training_samples(&mut self, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        Ok(task_samples(ctx.stream, ctx.task))
    }

    /// H1: extend or replace the incoming batch (replay appends buffer samples here).
    fn prepare_batch(&mut self, batch: Batch, _ctx: &mut StepCtx) -> Result<Batch> {
        Ok(batch)
    }

    /// H2: the loss to minimise. Default: masked cross-entropy of the batch.
    fn loss(&mut self, out: &ModelOutput, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        ctx.task_loss(out, batch)
    }

    /// H3: edit gradients before the optimizer step (projection, clipping).
    fn edit_gradients(&mut self, _grads: &mut GradStore, _ctx: &mut StepCtx) -> Result<()> {
        Ok(())
    }

    /// H4: after the optimizer step (path integrals, buffer insertion).
    fn after_step(&mut self, _batch: &Batch, _out: &ModelOutput, _ctx: &mut StepCtx) -> Result<()> {
        Ok(())
    }

    /// H5: after the last step of a task (importances, exemplars).
    fn after_task(&mut self, _ctx: &mut TaskCtx) -> Result<()> {
        Ok(())
    }

    /// H6: scores over the output units for evaluation, or `None` to use the logits.
    fn predict(&self, _x: &Tensor, _out: &ModelOutput, _ctx: &EvalCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Everything this algorithm carries from one task to the next (buffers, importances,
    /// anchors, exemplars), as named tensors, taken after `after_task`. `Ok(None)` — the default —
    /// declares the algorithm not resumable: checkpoints then hold weights only and
    /// `sequel run --resume` refuses the run instead of continuing with a silently lost state.
    /// A stateless algorithm returns `Ok(Some(StateDict::new()))`. State rebuilt by `before_task`
    /// (e.g. a teacher forked from the model) need not be saved.
    fn save_state(&self) -> Result<Option<StateDict>> {
        Ok(None)
    }

    /// Restore what [`Algorithm::save_state`] returned, before the next task's `before_task`.
    fn load_state(&mut self, _state: &StateDict) -> Result<()> {
        Err(crate::error::Error::msg(format!(
            "algorithm `{}` does not implement Algorithm::load_state",
            self.name()
        )))
    }
}

/// The training samples of one task.
pub fn task_samples(stream: &TaskStream, task: usize) -> Vec<SampleRef> {
    stream.tasks[task]
        .train
        .iter()
        .map(|&index| SampleRef {
            task: task as u32,
            index,
        })
        .collect()
}
