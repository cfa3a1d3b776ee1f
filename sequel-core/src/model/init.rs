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
