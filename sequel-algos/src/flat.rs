//! Gradients as one vector over every trainable parameter, for methods that take dot products and
//! projections of the whole gradient (A-GEM, GEM).
//!
//! The concatenation follows the `ParamSet`'s fixed construction order — never candle's
//! hash-ordered `VarMap` — so the vector, and every dot product summed over it, is the same in
//! every run. Normalisation statistics are not trainable and not part of it. Values are f64: a
//! projection is exact only if `g·g_ref` is, and an f32 sum over 10⁵–10⁷ products is not.
//!
//! The vectors live on the host (the gradients are copied there on another device) and are
//! filled, summed and written back in one pass each: the same values, in the same order, as
//! candle's tensor ops (one rounding per product, a sequential sum), without their intermediate
//! f64 tensors, which cost an A-GEM step with a 10-sample reference about 40 % of its time in
//! allocation and conversion (perf profile, docs/PERFORMANCE.md).

use candle_core::{backprop::GradStore, DType, Device, Storage, Tensor};

use sequel_core::data::{Batch, TaskStream};
use sequel_core::model::{Model, ParamSet};
use sequel_core::{loss, Error, Result};

/// `f` applied to the values of a contiguous CPU tensor of element type `T`, without a copy;
/// `None` on another device, dtype or layout (the caller then uses tensor ops).
fn on_host<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let values = cpu.as_slice::<T>().ok()?;
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&values[start..end]))
}

/// `[∂L/∂θ₁ ; ∂L/∂θ₂ ; …]` in f64, on the host whatever the model's device. A parameter the
/// store has no gradient for (e.g. the head of a task absent from a multi-head batch, which the
/// trainer removes) contributes zeros.
pub fn flatten(params: &ParamSet, grads: &GradStore) -> Result<Tensor> {
    let total: usize = params.trainable().map(|p| p.var.elem_count()).sum();
    if total == 0 {
        return Err(Error::msg("the model has no trainable parameters"));
    }
    let mut host = Vec::with_capacity(total);
    for (p, g) in params.grads(grads) {
        let Some(g) = g else {
            host.resize(host.len() + p.var.elem_count(), 0.0);
            continue;
        };
        let direct = on_host::<f32, _>(g, |v| host.extend(v.iter().map(|&x| f64::from(x))));
        if direct.is_none() {
            host.extend(g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
    }
    Ok(Tensor::from_vec(host, total, &Device::Cpu)?)
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
        let had = grads.get(p.var.as_tensor()).is_some();
        let host = on_host::<f64, _>(flat, |v| {
            let slice = &v[offset..offset + n];
            (had || slice.iter().any(|&x| x != 0.0))
                .then(|| slice.iter().map(|&x| x as f32).collect::<Vec<f32>>())
        });
        let g = match host {
            Some(Some(values)) if p.var.dtype() == DType::F32 => Some(
                Tensor::from_vec(values, p.var.dims(), &Device::Cpu)?.to_device(p.var.device())?,
            ),
            Some(None) => None,
            _ => {
                let slice = flat.narrow(0, offset, n)?;
                (had || slice.abs()?.max(0)?.to_scalar::<f64>()? != 0.0)
                    .then(|| slice.reshape(p.var.dims())?.to_dtype(p.var.dtype()))
                    .transpose()?
            }
        };
        offset += n;
        if let Some(g) = g {
            grads.insert(p.var.as_tensor(), g);
        }
    }
    Ok(())
}

/// The flat gradient of the training loss (the scenario's masked cross-entropy) of `batch` at the
/// current weights. The forward pass is in training mode, like the one that produced the
/// gradient it will be compared with.
pub fn loss_gradient(model: &dyn Model, stream: &TaskStream, batch: &Batch) -> Result<Tensor> {
    let out = sequel_core::model::forward_batch(model, batch, true)?;
    let l = loss::task_loss(&out.logits, batch, stream)?;
    flatten(model.params(), &l.backward()?)
}

/// `a·b` of two flat f64 vectors.
pub fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    let host = on_host::<f64, _>(a, |x| {
        on_host::<f64, _>(b, |y| x.iter().zip(y).fold(0.0, |s, (p, q)| s + p * q))
    });
    match host.flatten() {
        Some(d) if a.dims() == b.dims() => Ok(d),
        _ => Ok((a * b)?.sum_all()?.to_scalar::<f64>()?),
    }
}

/// `g + c·r` of two flat f64 vectors.
pub fn add_scaled(g: &Tensor, c: f64, r: &Tensor) -> Result<Tensor> {
    let host = on_host::<f64, _>(g, |x| {
        on_host::<f64, _>(r, |y| {
            x.iter()
                .zip(y)
                .map(|(a, b)| a + b * c)
                .collect::<Vec<f64>>()
        })
    });
    match host.flatten() {
        Some(v) if g.dims() == r.dims() => Ok(Tensor::from_vec(v, g.dims(), &Device::Cpu)?),
        _ => Ok((g + (r * c)?)?),
    }
}
