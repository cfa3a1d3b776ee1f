//! Optimizers (candle's SGD has no momentum, Nesterov or weight decay) and learning-rate schedules.
//!
//! State is kept per trainable parameter in [`ParamSet`] order, so it can be checkpointed and reset
//! at task boundaries.

pub mod adam;
pub mod kernels;
pub mod schedule;
pub mod sgd;

use candle_core::{backprop::GradStore, Tensor};

use crate::config::{OptimizerConfig, OptimizerKind};
use crate::error::Result;
use crate::model::ParamSet;

pub use adam::Adam;
pub use schedule::LrSchedule;
pub use sgd::Sgd;

pub trait Optimizer: Send {
    /// Apply one update from `grads` to the trainable parameters of `params`.
    fn step(&mut self, params: &ParamSet, grads: &GradStore) -> Result<()>;
    fn learning_rate(&self) -> f32;
    fn set_learning_rate(&mut self, lr: f32);
    /// Forget all state (momentum buffers, moments, step count).
    fn reset(&mut self);
    /// The state tensors, in a fixed order (for checkpoints).
    fn state(&self) -> Vec<Option<Tensor>>;
}

pub fn build_optimizer(cfg: &OptimizerConfig) -> Box<dyn Optimizer> {
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
