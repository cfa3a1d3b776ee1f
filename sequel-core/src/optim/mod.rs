//! Optimizers (candle's SGD has no momentum, Nesterov or weight decay) and learning-rate schedules.
//!
//! State is kept per trainable parameter in [`ParamSet`] order, so it can be checkpointed and reset
//! at task boundaries.

pub mod adam;
pub mod kernels;
pub mod lookahead;
pub mod schedule;
pub mod sgd;

use candle_core::{backprop::GradStore, Tensor};

use crate::config::{OptimizerConfig, OptimizerKind};
use crate::error::Result;
use crate::model::ParamSet;
use crate::state::StateDict;

pub use adam::Adam;
pub use lookahead::Lookahead;
pub use schedule::LrSchedule;
pub use sgd::Sgd;

pub trait Optimizer: Send {
    /// Apply one update from `grads` to the trainable parameters of `params`.
    fn step(&mut self, params: &ParamSet, grads: &GradStore) -> Result<()>;
    fn learning_rate(&self) -> f32;
    fn set_learning_rate(&mut self, lr: f32);
    /// Forget all state (momentum buffers, moments, step count).
    fn reset(&mut self);
    /// Every piece of state (buffers, moments, step count) as named tensors, copied, for
    /// checkpoints.
    fn save_state(&self) -> Result<StateDict>;
    /// Restore what [`Optimizer::save_state`] returned; afterwards steps continue bit-identically.
    fn load_state(&mut self, state: &StateDict) -> Result<()>;
    /// Slow weights kept beside the trained ones ([`Lookahead`]'s φ), one per trainable
    /// parameter; `None` for an optimizer without them or before its first step.
    fn slow_weights(&self) -> Option<&[Tensor]> {
        None
    }
}

/// `slots[i]` = `state["<key>.<i>"]` as a fresh in-place-updatable buffer, for `i < state["<key>.len"]`.
pub(crate) fn load_slots(state: &StateDict, key: &str) -> Result<Vec<Option<Tensor>>> {
    let n = match state.get(&format!("{key}.len")) {
        Some(t) => t.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize,
        None => return Ok(Vec::new()),
    };
    (0..n)
        .map(|i| {
            state
                .get(&format!("{key}.{i}"))
                .map(kernels::state_buffer)
                .transpose()
        })
        .collect()
}

/// The inverse of [`load_slots`].
pub(crate) fn save_slots(out: &mut StateDict, key: &str, slots: &[Option<&Tensor>]) -> Result<()> {
    out.insert(
        format!("{key}.len"),
        Tensor::new(&[slots.len() as u32], &candle_core::Device::Cpu)?,
    );
    for (i, t) in slots.iter().enumerate() {
        if let Some(t) = t {
            out.insert(format!("{key}.{i}"), t.copy()?);
        }
    }
    Ok(())
}

/// The configured optimizer, wrapped in [`Lookahead`] when `optimizer.lookahead` is set.
pub fn build_optimizer(cfg: &OptimizerConfig) -> Box<dyn Optimizer> {
    let inner = build_inner(cfg);
    match &cfg.lookahead {
        Some(la) => Box::new(Lookahead::new(inner, la.k, la.alpha).with_mode(la.mode)),
        None => inner,
    }
}

fn build_inner(cfg: &OptimizerConfig) -> Box<dyn Optimizer> {
    match cfg.kind {
        OptimizerKind::Sgd => Box::new(Sgd::new(
            cfg.lr,
            cfg.momentum,
            cfg.nesterov,
            cfg.weight_decay(),
        )),
        OptimizerKind::Adam => Box::new(Adam::new(
            cfg.lr,
            cfg.betas,
            cfg.eps,
            cfg.weight_decay(),
            false,
        )),
        OptimizerKind::Adamw => Box::new(Adam::new(
            cfg.lr,
            cfg.betas,
            cfg.eps,
            cfg.weight_decay(),
            true,
        )),
    }
}
