//! Seeded parameter initialisation (candle's CPU RNG cannot be seeded).
//!
//! Defaults follow PyTorch's `nn.Linear`/`nn.Conv2d`: weights and biases uniform in
//! ±1/√fan_in (kaiming-uniform with a = √5), which is what the reference CL results used.

use candle_core::{Device, Shape, Tensor, Var};

use crate::error::Result;
use crate::rng::SeededRng;

pub fn uniform(
    shape: impl Into<Shape>,
    bound: f32,
    rng: &mut SeededRng,
    device: &Device,
) -> Result<Var> {
    let shape = shape.into();
    let data: Vec<f32> = (0..shape.elem_count())
        .map(|_| (rng.uniform_f32() * 2.0 - 1.0) * bound)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?)
}

pub fn constant(shape: impl Into<Shape>, value: f32, device: &Device) -> Result<Var> {
    Ok(Var::from_tensor(&Tensor::full(value, shape, device)?)?)
}

/// Redraw a built model's weights by `model.init` (nothing to do for the default, which the
/// layers drew already). `xavier`: every weight tensor of rank ≥ 2 (linear `[out, in]`, conv
/// `[out, in, k, k]`) from U(±√(6/(fan_in + fan_out))) with fan = channels × receptive field
/// (Glorot & Bengio 2010, eq. 16), in parameter order from `rng`; the bias of the same layer set
/// to 0. Batch-norm scales, shifts and statistics keep their values, and so do the PaLoRA
/// adapters.
pub fn redraw(
    params: &crate::model::ParamSet,
    init: crate::config::WeightInit,
    rng: &mut SeededRng,
) -> Result<()> {
    if init == crate::config::WeightInit::Pytorch {
        return Ok(());
    }
    // PaLoRA adapters keep their own initialisation (A Kaiming-uniform, B = 0).
    for p in params
        .iter()
        .filter(|p| p.var.rank() >= 2 && p.adapter.is_none())
    {
        let dims = p.var.dims();
        let field: usize = dims[2..].iter().product();
        let (fan_in, fan_out) = (dims[1] * field, dims[0] * field);
        let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
        p.var
            .set(uniform(dims, bound, rng, p.var.device())?.as_tensor())?;
        let bias = p.name.strip_suffix("weight").map(|l| format!("{l}bias"));
        if let Some(b) = params.iter().find(|b| Some(&b.name) == bias.as_ref()) {
            b.var.set(&b.var.zeros_like()?)?;
        }
    }
    Ok(())
}
