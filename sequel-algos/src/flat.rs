//! Gradients as one vector over every trainable parameter, for methods that take dot products and
//! projections of the whole gradient (A-GEM, GEM).
//!
//! The concatenation follows the `ParamSet`'s fixed construction order — never candle's
//! hash-ordered `VarMap` — so the vector, and every dot product summed over it, is the same in
//! every run. Normalisation statistics are not trainable and not part of it. Values are f64: a
//! projection is exact only if `g·g_ref` is, and an f32 sum over 10⁵–10⁷ products is not.

use candle_core::{backprop::GradStore, DType, Tensor};

use sequel_core::data::{Batch, TaskStream};
use sequel_core::model::{Model, ParamSet};
use sequel_core::{loss, Error, Result};

/// `[∂L/∂θ₁ ; ∂L/∂θ₂ ; …]` in f64. A parameter the store has no gradient for (e.g. the head of a
/// task absent from a multi-head batch, which the trainer removes) contributes zeros.
pub fn flatten(params: &ParamSet, grads: &GradStore) -> Result<Tensor> {
    let mut parts = Vec::new();
    for (p, g) in params.grads(grads) {
        parts.push(match g {
            Some(g) => g.flatten_all()?.to_dtype(DType::F64)?,
            None => Tensor::zeros(p.var.elem_count(), DType::F64, p.var.device())?,
        });
    }
    if parts.is_empty() {
        return Err(Error::msg("the model has no trainable parameters"));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Write a flat vector back as the gradients of the trainable parameters. A parameter that had
/// no gradient in `grads` gets one only if its slice is non-zero, so the optimizer (weight
/// decay, momentum) still leaves parameters alone that neither the batch nor the edit touched.
pub fn write_back(params: &ParamSet, grads: &mut GradStore, flat: &Tensor) -> Result<()> {
    let total: usize = params.trainable().map(|p| p.var.elem_count()).sum();
    if flat.dims() != [total] {
        return Err(Error::msg(format!(
            "flat gradient has shape {:?}, the model has {total} trainable weights",
            flat.dims()
        )));
    }
    let mut offset = 0;
    for p in params.trainable() {
        let n = p.var.elem_count();
        let slice = flat.narrow(0, offset, n)?;
        offset += n;
        let had = grads.get(p.var.as_tensor()).is_some();
        if !had && slice.abs()?.max(0)?.to_scalar::<f64>()? == 0.0 {
            continue;
        }
        let g = slice.reshape(p.var.dims())?.to_dtype(p.var.dtype())?;
        grads.insert(p.var.as_tensor(), g);
    }
    Ok(())
}

/// The flat gradient of the training loss (the scenario's masked cross-entropy) of `batch` at the
/// current weights. The forward pass is in training mode, like the one that produced the
/// gradient it will be compared with.
pub fn loss_gradient(model: &dyn Model, stream: &TaskStream, batch: &Batch) -> Result<Tensor> {
    let out = model.forward(&batch.x, true)?;
    let l = loss::task_loss(&out.logits, batch, stream)?;
    flatten(model.params(), &l.backward()?)
}

/// `a·b` of two flat f64 vectors.
pub fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a * b)?.sum_all()?.to_scalar::<f64>()?)
}
