//! The `Algorithm` trait: every continual-learning method plugs into the trainer through these
//! hooks, all of which default to plain fine-tuning. Hooks receive explicit context structs — never
//! a shared mutable bag — so what each hook may read or change is visible in its signature.
//!
//! Loop order (see docs/architecture.md):
//! `before_task → training_samples → [loss (forwards through StepCtx::forward) → backward →
//! edit_gradients → optimizer step → after_step]* → after_task → consolidation → [before_eval →
//! predict* → after_eval]`.
//!
//! A step's update rule lives in one place, [`Algorithm::loss`]: it forwards what it needs — the
//! incoming batch and any number of memory draws — in one fused pass with [`StepCtx::forward`], and
//! returns the objective. The trainer then does the one backward, gradient rules, optimizer step
//! and bookkeeping.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{backprop::GradStore, Device, Tensor};

use crate::data::{Batch, SampleRef, TaskStream};
use crate::error::{Error, Result};
use crate::loss;
use crate::memory::Memory;
use crate::model::{Model, ModelOutput, ParamSet};
use crate::rng::SeededRng;
use crate::state::StateIo;

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

/// The outputs of one fused forward pass over several parts (the incoming batch, memory draws),
/// and the parts joined in the order given.
pub struct Forward {
    /// Every row's output, `(Σ parts) × U` logits.
    pub out: ModelOutput,
    /// The parts joined into one batch (rows in the same order as `out`).
    pub batch: Batch,
    ranges: Vec<Range<usize>>,
}

impl Forward {
    /// The logits of part `i` (`|part| × U`).
    pub fn logits(&self, i: usize) -> Result<Tensor> {
        let r = self.range(i)?;
        Ok(self.out.logits.narrow(0, r.start, r.len())?)
    }

    /// The output (logits and features) of part `i`.
    pub fn output(&self, i: usize) -> Result<ModelOutput> {
        let r = self.range(i)?;
        Ok(ModelOutput {
            logits: self.out.logits.narrow(0, r.start, r.len())?,
            features: self.out.features.narrow(0, r.start, r.len())?,
        })
    }

    /// Whether part `i` has rows (a draw from an empty memory has none).
    pub fn has(&self, i: usize) -> bool {
        self.ranges.get(i).is_some_and(|r| !r.is_empty())
    }

    fn range(&self, i: usize) -> Result<Range<usize>> {
        self.ranges
            .get(i)
            .cloned()
            .ok_or_else(|| Error::msg(format!("forward pass has no part {i}")))
    }
}

/// The compute of one training step, counted deterministically in sample passes through the
/// model: each row forwarded adds 1 to `forward`, each row back-propagated 1 to `backward`. A
/// naive step on `B` incoming rows costs `(B, B)`. [`StepCtx::forward`] counts its rows
/// itself (they all enter the step's one backward pass); a hook that forwards or
/// back-propagates anything else (a teacher, a reference gradient, a virtual update) says so with
/// [`StepCtx::charge`]. Used by latency-aware evaluation (`training.realtime`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCost {
    pub forward: usize,
    pub backward: usize,
}

impl StepCost {
    /// The cost relative to a naive step on `rows` rows, a backward pass counting twice a
    /// forward (the multiply-adds of a dense or convolutional layer's two backward products):
    /// `(forward + 2·backward) / (3·rows)`.
    pub fn relative(&self, rows: usize) -> f64 {
        (self.forward + 2 * self.backward) as f64 / (3 * rows.max(1)) as f64
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
    incoming: &'a Batch,
    incoming_out: Option<ModelOutput>,
    /// Per task: whether any forwarded row belongs to it (multi-head gradient masking).
    present: Vec<bool>,
    /// The samples of every part forwarded in this step, in order (for logs and tests).
    parts: Vec<Vec<SampleRef>>,
    cost: StepCost,
}

impl<'a> StepCtx<'a> {
    /// The context of a step on `incoming` (built by [`crate::Trainer::step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        task: usize,
        epoch: usize,
        step: usize,
        stream: &'a TaskStream,
        model: &'a dyn Model,
        device: &'a Device,
        rng: &'a mut SeededRng,
        incoming: &'a Batch,
    ) -> Self {
        Self {
            task,
            epoch,
            step,
            stream,
            model,
            device,
            rng,
            incoming,
            incoming_out: None,
            present: vec![false; stream.len()],
            parts: Vec::new(),
            cost: StepCost::default(),
        }
    }

    /// One training-mode forward pass over `parts` joined in order (one pass, so its speed is that
    /// of a single batch of `Σ |part|` rows; with batch normalisation the statistics span every
    /// part). The incoming batch of the step is recognised by reference: pass the `batch` that
    /// [`Algorithm::loss`] received, and its rows are what the trainer logs and hands to
    /// [`Algorithm::after_step`]. The rows' tasks go to the model ([`crate::model::forward_batch`]):
    /// with PaLoRA adapters in task-IL each row, replayed or incoming, goes through its own
    /// task's adapter.
    ///
    /// # Errors
    /// Model errors; shape mismatches between parts.
    pub fn forward(&mut self, parts: &[&Batch]) -> Result<Forward> {
        let mut ranges = Vec::with_capacity(parts.len());
        let mut start = 0;
        for p in parts {
            ranges.push(start..start + p.len());
            start += p.len();
        }
        let batch = match parts {
            [one] => (*one).clone(),
            _ => {
                let nonempty: Vec<&Batch> =
                    parts.iter().copied().filter(|p| !p.is_empty()).collect();
                let (first, rest) = nonempty
                    .split_first()
                    .ok_or_else(|| Error::msg("forward needs at least one non-empty part"))?;
                let mut joined = (*first).clone();
                for p in rest {
                    joined = joined.append(p)?;
                }
                joined
            }
        };
        let out = crate::model::forward_batch(self.model, &batch, true)?;
        for &t in &batch.tasks {
            if let Some(p) = self.present.get_mut(t as usize) {
                *p = true;
            }
        }
        self.parts.extend(parts.iter().map(|p| p.refs.clone()));
        self.cost.forward += batch.len();
        self.cost.backward += batch.len();
        let f = Forward { out, batch, ranges };
        if self.incoming_out.is_none() {
            if let Some(i) = parts.iter().position(|p| std::ptr::eq(*p, self.incoming)) {
                self.incoming_out = Some(f.output(i)?);
            }
        }
        Ok(f)
    }

    /// Cross-entropy of `logits` against `batch` under the scenario's training mask (see
    /// [`loss::task_loss`]).
    pub fn task_loss(&self, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        loss::task_loss(logits, batch, self.stream)
    }

    /// Fine-tuning's objective: forward `batch` alone and take its masked cross-entropy.
    pub fn ce(&mut self, batch: &Batch) -> Result<Tensor> {
        let f = self.forward(&[batch])?;
        self.task_loss(&f.out.logits, batch)
    }

    /// Per task: whether a row of it was forwarded in this step.
    pub fn forwarded_tasks(&self) -> &[bool] {
        &self.present
    }

    /// The samples of every part forwarded so far in this step, in order.
    pub fn forwarded_parts(&self) -> &[Vec<SampleRef>] {
        &self.parts
    }

    /// Count model passes made outside [`StepCtx::forward`]: `forward` rows forwarded (a
    /// teacher's logits) and `backward` rows back-propagated (a reference gradient). See
    /// [`StepCost`].
    pub fn charge(&mut self, forward: usize, backward: usize) {
        self.cost.forward += forward;
        self.cost.backward += backward;
    }

    /// The passes counted so far in this step.
    pub fn cost(&self) -> StepCost {
        self.cost
    }

    /// The incoming batch's output, once `loss` has forwarded it.
    pub fn incoming_output(&self) -> Option<&ModelOutput> {
        self.incoming_out.as_ref()
    }
}

/// What evaluation sees.
pub struct EvalCtx<'a> {
    pub stream: &'a TaskStream,
    pub model: &'a dyn Model,
    pub device: &'a Device,
}

/// A continual-learning algorithm. Override only the hooks you need.
pub trait Algorithm: std::any::Any + Send {
    /// Checks of the configuration that need the stream (numbers of tasks, classes and output
    /// units): run once before any run folder is created, and by `sequel validate` and `sequel
    /// sweep`. Return a [`crate::Error::Config`] naming the key (e.g. `algorithm.buffer_size`).
    /// Every config error a run could meet must come from here or from the config's `build`,
    /// never from a training hook: a hook's error is found only after the run folder exists.
    /// The replay memory's own checks ([`Memory::check`]) are run by the trainer. Default: none.
    fn check_stream(&mut self, _stream: &TaskStream) -> Result<()> {
        Ok(())
    }

    /// Whether [`Algorithm::training_samples`] is the task's own stream. A method that mixes
    /// exemplars into it (iCaRL, LUCIR, BiC), trains on the tasks seen so far (joint) or on
    /// nothing (GDumb) returns `false`, and latency-aware evaluation (`training.realtime`), whose
    /// arrivals are the stream's batches, refuses it before a run folder exists. Default: `true`.
    fn trains_on_the_stream(&self) -> bool {
        true
    }

    /// H0: before training on a task (snapshot a teacher, swap the data, ...).
    fn before_task(&mut self, _ctx: &mut TaskCtx) -> Result<()> {
        Ok(())
    }

    /// The samples to train on during this task. Default: the task's own training set.
    fn training_samples(&mut self, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        Ok(task_samples(ctx.stream, ctx.task))
    }

    /// H1: the objective of one step on the incoming `batch`. Forward what the rule needs with
    /// [`StepCtx::forward`] (the incoming batch must be among the parts). Default: masked
    /// cross-entropy of `batch` ([`StepCtx::ce`]).
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        ctx.ce(batch)
    }

    /// H2: edit gradients before the optimizer step (projection).
    fn edit_gradients(&mut self, _grads: &mut GradStore, _ctx: &mut StepCtx) -> Result<()> {
        Ok(())
    }

    /// H3: after the optimizer step, with the incoming batch and its training-mode output from
    /// `loss`'s forward pass (path integrals, memory insertion).
    fn after_step(&mut self, _batch: &Batch, _out: &ModelOutput, _ctx: &mut StepCtx) -> Result<()> {
        Ok(())
    }

    /// H4: after the last step of a task (importances, exemplars).
    fn after_task(&mut self, _ctx: &mut TaskCtx) -> Result<()> {
        Ok(())
    }

    /// H5: before each evaluation pass over every task, with the weights about to be evaluated
    /// (the trained or the consolidated ones): compute what `predict` needs (class means).
    fn before_eval(&mut self, _ctx: &EvalCtx) -> Result<()> {
        Ok(())
    }

    /// H5′: after each evaluation pass, with what [`Algorithm::before_eval`] left in the model:
    /// undo it. An algorithm that is evaluated with other weights than the ones it trains (CLS-ER's
    /// stable model) loads them in `before_eval` and restores the trained ones here, so training,
    /// checkpoints and saved weights see only the trained weights.
    fn after_eval(&mut self, _ctx: &EvalCtx) -> Result<()> {
        Ok(())
    }

    /// H6: scores over the output units for a batch of task `task`'s evaluation samples, or
    /// `None` to use the logits.
    fn predict(&self, _out: &ModelOutput, _task: usize, _ctx: &EvalCtx) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Everything this algorithm carries from one task to the next (buffers, importances,
    /// anchors, exemplars), each field listed once for both saving and loading (see
    /// [`StateIo`]). Called after `after_task` to save, and before the next task's `before_task`
    /// to load. State rebuilt by `before_task` (a teacher forked from the model) need not be
    /// listed. Default: no state.
    fn state(&mut self, _io: &mut StateIo) -> Result<()> {
        Ok(())
    }

    /// Trainable tensors the algorithm owns besides the model's (a classifier of its own: LUCIR's
    /// cosine-normalised classifier and its scale σ). The trainer's optimizer updates them with
    /// the model's, in the same step: they follow the model's parameters in the optimizer's state
    /// and in gradient-norm clipping ([`crate::step::optimize_with`]). The algorithm persists
    /// their values in [`Algorithm::state`] (the checkpoint saves only the model's parameters)
    /// and must keep their number and shapes fixed once training has started, as the optimizer's
    /// state is matched to parameters by position. With `optimizer.lookahead.evaluate_with:
    /// slow` only the model's parameters are evaluated at their slow weights. Default: none —
    /// every step is then exactly the model-only step.
    fn own_params(&self) -> Option<&ParamSet> {
        None
    }

    /// The replay memory, for a rehearsal method: the trainer creates it before the first task,
    /// offers it each step's incoming samples (after `after_step`) or each finished task's
    /// (before `after_task`), and saves it with the state. The method only draws from it.
    fn memory(&mut self) -> Option<&mut Memory> {
        None
    }
}

/// An algorithm's YAML section, which also describes and builds the algorithm: the registry adds
/// it with one line (`registry.add::<ErConfig>()`), and `sequel list`, the help text and the
/// config reference take its name, summary and defaults from here.
///
/// The YAML keys are the struct's fields (parsed with `deny_unknown_fields`); missing keys take
/// the values of `Default::default()` (use a container-level `#[serde(default)]`).
pub trait AlgorithmConfig:
    serde::de::DeserializeOwned + serde::Serialize + Default + Send + Sync + 'static
{
    /// `algorithm.name` in the YAML.
    const NAME: &'static str;
    /// One line: what the method does and its source.
    const SUMMARY: &'static str;

    /// Build the algorithm; an out-of-range value is a [`crate::Error::Config`] naming the key.
    fn build(self) -> Result<Box<dyn Algorithm>>;

    /// The shared replay-memory keys (`buffer_size`, `buffer_policy`, `insert`), if the method
    /// keeps a memory: the registry parses them once for every method, with this method's
    /// defaults.
    fn memory(&mut self) -> Option<&mut crate::buffer::MemoryConfig> {
        None
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
