//! The rules of one optimisation step, shared by the trainer's loop and by any "train on the
//! memory" method (GDumb's re-fit): one non-finite-loss check, one head mask, one clipping.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use crate::data::{Batch, TaskStream};
use crate::error::{Error, Result};
use crate::model::{Model, ParamSet};
use crate::optim::Optimizer;

/// Where a step is, 1-based, for error messages: `(task, epoch, step)`.
pub type At = (usize, usize, usize);

/// The loss's value, or [`Error::NonFiniteLoss`] naming `at` when it is NaN or infinite.
pub fn finite_loss(loss: &Tensor, at: At) -> Result<f32> {
    let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    if value.is_finite() {
        return Ok(value);
    }
    Err(Error::NonFiniteLoss {
        value,
        task: at.0,
        epoch: at.1,
        step: at.2,
    })
}

/// Backward of `loss` and the update, in this order: in multi-head task-IL the heads of tasks
/// with no forwarded row (`forwarded[t]` false) lose their gradient — not a zero one, so weight
/// decay and momentum leave them alone, as with separate heads; likewise the backbone's while
/// PaLoRA adapters freeze it ([`crate::model::Adapters::backbone_frozen`]); global-norm clipping at `clip`;
/// `edit` (an algorithm's projection); the optimizer's step.
pub fn optimize(
    loss: &Tensor,
    model: &dyn Model,
    stream: &TaskStream,
    forwarded: &[bool],
    clip: Option<f64>,
    optimizer: &mut dyn Optimizer,
    edit: impl FnOnce(&mut GradStore) -> Result<()>,
) -> Result<()> {
    optimize_with(loss, model, None, stream, forwarded, clip, optimizer, edit)
}

/// [`optimize`] over the model's parameters followed by `own`, the parameters an algorithm owns
/// ([`crate::Algorithm::own_params`]): they share the clipping norm and the optimizer's step
/// (and so its learning rate and schedule). With `own` `None` or empty this is exactly
/// [`optimize`]. A parameter the loss does not reach gets no update.
#[allow(clippy::too_many_arguments)]
pub fn optimize_with(
    loss: &Tensor,
    model: &dyn Model,
    own: Option<&ParamSet>,
    stream: &TaskStream,
    forwarded: &[bool],
    clip: Option<f64>,
    optimizer: &mut dyn Optimizer,
    edit: impl FnOnce(&mut GradStore) -> Result<()>,
) -> Result<()> {
    let mut grads = loss.backward()?;
    if stream.mask_in_training() {
        for p in model.params().iter() {
            if p.head
                .is_some_and(|h| !forwarded.get(h).copied().unwrap_or(false))
            {
                grads.remove(p.var.as_tensor());
            }
        }
    }
    // PaLoRA with a frozen backbone: only adapters and heads move.
    let frozen = model.adapters().is_some_and(|a| a.backbone_frozen());
    let drop_backbone = |grads: &mut GradStore| {
        if frozen {
            for p in model.params().iter() {
                if p.role == crate::model::Role::Body && p.adapter.is_none() {
                    grads.remove(p.var.as_tensor());
                }
            }
        }
    };
    drop_backbone(&mut grads);
    let joined;
    let params = match own.filter(|o| !o.is_empty()) {
        Some(o) => {
            joined = model.params().joined(o);
            &joined
        }
        None => model.params(),
    };
    if let Some(max) = clip {
        clip_grad_norm(params, &mut grads, max)?;
    }
    edit(&mut grads)?;
    // A projection (A-GEM, GEM) mixes in a reference gradient that reaches the backbone.
    drop_backbone(&mut grads);
    optimizer.step(params, &grads)
}

/// One plain step on `batch`: training-mode forward, masked cross-entropy, [`finite_loss`],
/// [`optimize`]. Returns the loss value.
pub fn train_step(
    model: &dyn Model,
    stream: &TaskStream,
    batch: &Batch,
    optimizer: &mut dyn Optimizer,
    clip: Option<f64>,
    at: At,
) -> Result<f32> {
    let out = crate::model::forward_batch(model, batch, true)?;
    let loss = crate::loss::task_loss(&out.logits, batch, stream)?;
    let value = finite_loss(&loss, at)?;
    let mut forwarded = vec![false; stream.len()];
    for &t in &batch.tasks {
        forwarded[t as usize] = true;
    }
    optimize(
        &loss,
        model,
        stream,
        &forwarded,
        clip,
        optimizer,
        |_| Ok(()),
    )?;
    Ok(value)
}

/// Scale every trainable gradient by `max / ‖g‖` when the global L2 norm `‖g‖` exceeds `max`;
/// returns the norm before clipping. Parameters without a gradient count as zero.
pub fn clip_grad_norm(params: &ParamSet, grads: &mut GradStore, max: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    for p in params.trainable() {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm > max {
        let scale = max / norm;
        for p in params.trainable() {
            if let Some(g) = grads.remove(p.var.as_tensor()) {
                grads.insert(p.var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::build_model;
    use candle_core::Device;

    fn grads_of(model: &dyn Model, scale: f64) -> candle_core::backprop::GradStore {
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 2, 2))
            .unwrap();
        let out = model.forward(&x, true).unwrap();
        (out.logits.sqr().unwrap().sum_all().unwrap() * scale)
            .unwrap()
            .backward()
            .unwrap()
    }

    fn flat(model: &dyn Model, g: &candle_core::backprop::GradStore) -> Vec<f64> {
        model
            .params()
            .trainable()
            .flat_map(|p| {
                g.get(p.var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn clipping_rescales_to_the_max_norm_and_keeps_the_direction() {
        let m = build_model(&ModelConfig::default(), [1, 2, 2], &[3], 0, &Device::Cpu).unwrap();
        let mut g = grads_of(m.as_ref(), 10.0);
        let before = flat(m.as_ref(), &g);
        let norm = clip_grad_norm(m.params(), &mut g, 0.5).unwrap();
        let after = flat(m.as_ref(), &g);
        let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - n(&before)).abs() < 1e-6 * norm, "{norm}");
        assert!(norm > 0.5);
        assert!((n(&after) - 0.5).abs() < 1e-5, "{}", n(&after));
        for (a, b) in after.iter().zip(&before) {
            assert!((a - b * 0.5 / norm).abs() < 1e-6, "{a} vs {b}");
        }
        // Below the threshold nothing changes.
        let mut g = grads_of(m.as_ref(), 1e-6);
        let before = flat(m.as_ref(), &g);
        clip_grad_norm(m.params(), &mut g, 1e6).unwrap();
        assert_eq!(flat(m.as_ref(), &g), before);
    }
}
