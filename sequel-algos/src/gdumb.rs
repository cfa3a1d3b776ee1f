//! GDumb — Greedy sampler and Dumb learner (Prabhu, Torr & Dokania, ECCV 2020).
//!
//! GDumb never learns from the stream. Its **sampler** keeps a class-balanced memory `M` of `K`
//! samples (`buffer_size`): a sample is stored while there is room; when full, a sample of a class
//! that is not (one of) the largest evicts a random sample of a largest class
//! ([`BufferPolicy::ClassBalanced`]). Its **learner**, after each task, resets the network to its
//! seeded initial weights θ₀ and trains it on `M` alone:
//!
//! `θ ← θ₀;  for e in 1..E, for (x, y) ~ M shuffled:  θ ← θ − η_e · clip(∇ CE(f_θ(x), y))`
//!
//! with SGD (momentum, weight decay), the cross-entropy under the scenario's mask
//! ([`sequel_core::loss::task_loss`]), gradient-norm clipping, and the paper's schedule (stepped per
//! epoch, as in the authors' code): one warm-up epoch at `max_lr / 10`, then cosine annealing with
//! warm restarts (SGDR, `T₀ = 1` epoch, `T_mult = 2`) from `max_lr` to `min_lr`:
//!
//! `η = min_lr + ½(max_lr − min_lr)(1 + cos(π · n_cur / T))`,
//!
//! `n_cur` = epochs since the current cycle started, `T` = its length (1, 2, 4, …). With one warm-up
//! epoch, `2ᵏ` epochs end exactly at the end of a cycle (128 = 1 + 1 + 2 + … + 64), near `min_lr`.
//!
//! **Task-end insertion.** The trainer gets no samples from this algorithm (`training_samples` is
//! empty: zero optimizer steps); the finished task's samples are offered to the memory at its end in
//! a seeded random order (`ctx.rng`). The class-balanced sampler's decision for a sample depends
//! only on the memory's content, the sample's class and the memory's own random draws — never on the
//! model — so this equals the paper's online sampler run on a stream arriving in that order.
//!
//! **When it fits** (`fit_after`). By default after *every* task (`every_task`), so every row of the
//! accuracy matrix is the model GDumb would deploy at that point (Avalanche also refits after each
//! experience). `last_task` fits once, after the last task (Mammoth): the final model is drawn
//! from the same distribution — each fit starts from θ₀ on the memory as it then is, which the fit
//! never changes — at a fifth of the cost on 5 tasks, but the earlier rows are the untrained θ₀
//! (their forgetting and BWT say nothing about GDumb). Evaluation uses the logits.
//!
//! **Re-initialisation** restores the snapshot of the weights taken before task 1 (the experiment
//! seed's initialisation, candle's RNG is never used); a fresh optimizer (no momentum) is built for
//! each fit.
//!
//! **Left out.** CutMix (the paper uses it on CIFAR/SVHN with probability 0.5, α = 1; its MNIST runs
//! use none; Mammoth's fit applies it with α = 1 on every dataset), the paper's half precision, and
//! its selection of the best pass on the test set (we report the weights after the last epoch).
//! Defaults are the authors' (`maxlr 0.05, minlr 0.0005, weight_decay 1e-6, batch_size 16,
//! clip 10`, SGD momentum 0.9, 128 passes on MNIST), except `buffer_size` (ER's 200, to compare at
//! equal memory). Mammoth's recipe is the same schedule with `fitting_epochs 256`, the stream's
//! batch size, plain SGD (`optim_mom 0`, `optim_wd 0`), no clipping, CutMix α = 1 and
//! `fit_after: last_task`; every part of it but CutMix is a key here.

use serde::{Deserialize, Serialize};

use sequel_core::buffer::{BufferPolicy, InsertAt};
use sequel_core::data::SampleRef;
use sequel_core::model::Snapshot;
use sequel_core::optim::{Optimizer, Sgd};
use sequel_core::step::train_step;
use sequel_core::{
    Algorithm, AlgorithmConfig, Error, Memory, MemoryConfig, Result, StateIo, TaskCtx,
};

use crate::check;

/// When GDumb re-fits its model on the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FitAfter {
    /// After every task (the paper's learner at every point; Avalanche).
    EveryTask,
    /// Only after the last task (Mammoth); earlier rows evaluate the untrained θ₀.
    LastTask,
}

/// YAML keys of `algorithm: { name: gdumb, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GdumbConfig {
    /// Memory size K in samples.
    pub buffer_size: usize,
    /// Epochs (passes over the memory) of each fit (the paper's MNIST value; 256 on CIFAR,
    /// Mammoth's default).
    pub fit_epochs: usize,
    /// Minibatch size of the fit.
    pub fit_batch_size: usize,
    /// Learning rate at the start of each cosine cycle.
    pub max_lr: f64,
    /// Learning rate at the end of each cosine cycle.
    pub min_lr: f64,
    /// Epochs at `max_lr / 10` before the cosine cycles.
    pub warmup_epochs: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// Coupled L2 weight decay.
    pub weight_decay: f64,
    /// Largest global gradient L2 norm; larger gradients are rescaled to it. 0 disables.
    pub clip_grad_norm: f64,
    /// `every_task` or `last_task`.
    pub fit_after: FitAfter,
}

impl Default for GdumbConfig {
    fn default() -> Self {
        Self {
            buffer_size: 200,
            fit_epochs: 128,
            fit_batch_size: 16,
            max_lr: 0.05,
            min_lr: 0.0005,
            warmup_epochs: 1,
            momentum: 0.9,
            weight_decay: 1e-6,
            clip_grad_norm: 10.0,
            fit_after: FitAfter::EveryTask,
        }
    }
}

impl AlgorithmConfig for GdumbConfig {
    const NAME: &'static str = "gdumb";
    const SUMMARY: &'static str = "GDumb: class-balanced greedy memory; after each task re-initialise and train on the memory only (Prabhu et al. 2020)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Gdumb::new(self)?))
    }
}

pub struct Gdumb {
    cfg: GdumbConfig,
    memory: Memory,
    /// θ₀, taken before the first task.
    initial: Option<Snapshot>,
}

impl Gdumb {
    pub fn new(cfg: GdumbConfig) -> Result<Self> {
        check::at_least_one("fit_epochs", cfg.fit_epochs)?;
        check::at_least_one("fit_batch_size", cfg.fit_batch_size)?;
        check::positive("max_lr", cfg.max_lr)?;
        check::non_negative("min_lr", cfg.min_lr)?;
        if cfg.min_lr > cfg.max_lr {
            return Err(Error::Config {
                file: String::new(),
                path: "algorithm.min_lr".into(),
                message: format!(
                    "must not exceed algorithm.max_lr ({}), got {}",
                    cfg.max_lr, cfg.min_lr
                ),
            });
        }
        check::unit_interval("momentum", cfg.momentum)?;
        check::non_negative("weight_decay", cfg.weight_decay)?;
        check::non_negative("clip_grad_norm", cfg.clip_grad_norm)?;
        // The greedy class-balanced sampler at the task's end is the method, not an option.
        let memory = MemoryConfig {
            buffer_size: cfg.buffer_size,
            buffer_policy: BufferPolicy::ClassBalanced,
            insert: InsertAt::TaskEnd,
        };
        Ok(Self {
            memory: Memory::new(memory, false)?,
            cfg,
            initial: None,
        })
    }

    /// Learning rate of fit epoch `epoch` (0-based): warm-up, then SGDR with `T₀ = 1`, `T_mult = 2`.
    pub fn learning_rate(&self, epoch: usize) -> f64 {
        let (max, min) = (self.cfg.max_lr, self.cfg.min_lr);
        if epoch < self.cfg.warmup_epochs {
            return max / 10.0;
        }
        let n = epoch - self.cfg.warmup_epochs;
        let (mut start, mut len) = (0usize, 1usize);
        while n >= start + len {
            start += len;
            len *= 2;
        }
        let frac = (n - start) as f64 / len as f64;
        min + 0.5 * (max - min) * (1.0 + (std::f64::consts::PI * frac).cos())
    }

    /// Train the (re-initialised) model on the memory alone, with the trainer's step rules.
    fn fit(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        let len = self.memory.buffer().map_or(0, |b| b.len());
        if len == 0 {
            return Ok(());
        }
        let c = &self.cfg;
        let mut opt = Sgd::new(
            c.max_lr as f32,
            c.momentum as f32,
            false,
            c.weight_decay as f32,
        );
        let clip = (c.clip_grad_norm > 0.0).then_some(c.clip_grad_norm);
        let mut slots: Vec<u32> = (0..len as u32).collect();
        let mut step = 0;
        for epoch in 0..self.cfg.fit_epochs {
            if ctx.interrupted() {
                return Err(Error::Stopped(format!(
                    "interrupted during the GDumb fit after task {}; the checkpoint of the last finished task is intact",
                    ctx.task + 1
                )));
            }
            opt.set_learning_rate(self.learning_rate(epoch) as f32);
            ctx.rng.shuffle(&mut slots);
            for chunk in slots.chunks(self.cfg.fit_batch_size) {
                let batch = self
                    .memory
                    .batch_of(chunk.to_vec(), ctx.stream, ctx.device)?
                    .batch;
                let at = (ctx.task + 1, epoch + 1, step + 1);
                train_step(ctx.model, ctx.stream, &batch, &mut opt, clip, at).inspect_err(
                    |_| {
                        tracing::warn!(
                            task = ctx.task + 1,
                            epoch = epoch + 1,
                            "GDumb's fit on the memory diverged; lower algorithm.max_lr"
                        )
                    },
                )?;
                step += 1;
            }
        }
        Ok(())
    }
}

impl Algorithm for Gdumb {
    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.initial.is_none() {
            self.initial = Some(ctx.model.params().snapshot()?);
        }
        Ok(())
    }

    fn trains_on_the_stream(&self) -> bool {
        false
    }

    fn training_samples(&mut self, _ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        Ok(Vec::new())
    }

    /// The memory is filled (by the trainer) before this runs.
    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        let initial = self
            .initial
            .as_ref()
            .ok_or_else(|| Error::msg("GDumb: no initial weights (before_task never ran)"))?;
        if self.cfg.fit_after == FitAfter::LastTask && ctx.task + 1 < ctx.stream.len() {
            return Ok(());
        }
        ctx.model.params().restore(initial)?;
        self.fit(ctx)
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.field("initial", &mut self.initial)
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}
