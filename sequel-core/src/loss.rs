//! Losses with the scenario's masking.

use candle_core::{Tensor, D};

use std::ops::Range;

use crate::data::{Batch, TaskStream};
use crate::error::Result;

/// Mean cross-entropy of `logits` against the batch targets.
///
/// In multi-head task-IL each sample's logits are restricted to its task's units: a batch from one
/// task is narrowed to that slice (cheap); a mixed batch (replay) gets an additive −∞-like mask.
/// In every other scenario the softmax runs over all units.
pub fn task_loss(logits: &Tensor, batch: &Batch, stream: &TaskStream) -> Result<Tensor> {
    if !stream.mask_in_training() {
        return Ok(candle_nn::loss::cross_entropy(logits, &batch.y)?);
    }
    if let Some(t) = batch.single_task() {
        let r = &stream.tasks[t as usize].units;
        let narrowed = logits.narrow(1, r.start, r.len())?;
        let shifted: Vec<u32> = batch.units.iter().map(|&u| u - r.start as u32).collect();
        let y = Tensor::from_vec(shifted, batch.len(), logits.device())?;
        return Ok(candle_nn::loss::cross_entropy(&narrowed, &y)?);
    }
    let masked = logits.broadcast_add(&unit_mask(batch, stream, logits.dim(D::Minus1)?)?)?;
    Ok(candle_nn::loss::cross_entropy(&masked, &batch.y)?)
}

/// `B × U` additive mask: 0 on each sample's task units, −1e9 elsewhere.
pub fn unit_mask(batch: &Batch, stream: &TaskStream, units: usize) -> Result<Tensor> {
    let mut m = vec![-1e9f32; batch.len() * units];
    for (row, &t) in batch.tasks.iter().enumerate() {
        let r = &stream.tasks[t as usize].units;
        m[row * units + r.start..row * units + r.end].fill(0.0);
    }
    Ok(Tensor::from_vec(m, (batch.len(), units), batch.x.device())?)
}

/// Predicted output unit per row: the argmax over `units` when given (task-IL), else over all.
pub fn predict_units(scores: &Tensor, units: Option<&Range<usize>>) -> Result<Vec<u32>> {
    Ok(match units {
        Some(r) => scores
            .narrow(D::Minus1, r.start, r.len())?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|u| u + r.start as u32)
            .collect(),
        None => scores.argmax(D::Minus1)?.to_vec1()?,
    })
}
