//! Micro-benchmark of the training step (forward, cross-entropy over all units, backward,
//! optimizer step at the base learning rate) on synthetic data, used by `sequel bench` and docs/PERFORMANCE.md.

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::config::OptimizerConfig;
use crate::error::Result;
use crate::model::Model;
use crate::optim::build_optimizer;
use crate::rng::{SeededRng, Stream};

/// Result of [`time_train_steps`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTiming {
    pub batch_size: usize,
    pub steps: usize,
    pub seconds: f64,
}

impl StepTiming {
    pub fn steps_per_s(&self) -> f64 {
        self.steps as f64 / self.seconds
    }

    pub fn samples_per_s(&self) -> f64 {
        self.steps_per_s() * self.batch_size as f64
    }
}

/// Time `steps` training steps of `model` (inputs `input` = `[C, H, W]`, one head of `outputs`
/// units) at `batch_size` after `warmup` untimed steps. Inputs are 8 pre-generated batches
/// cycled, so data loading is excluded.
pub fn time_train_steps(
    model: &dyn Model,
    opt_cfg: &OptimizerConfig,
    input: [usize; 3],
    outputs: usize,
    batch_size: usize,
    warmup: usize,
    steps: usize,
) -> Result<StepTiming> {
    // The batches go where the model's weights are.
    let device = match model.params().iter().next() {
        Some(p) => p.var.device().clone(),
        None => Device::Cpu,
    };
    let device = &device;
    let mut opt = build_optimizer(opt_cfg);
    let mut rng = SeededRng::new(0, Stream::DataOrder);
    let d: usize = input.iter().product();
    let batches: Vec<(Tensor, Tensor)> = (0..8)
        .map(|_| {
            let x: Vec<f32> = (0..batch_size * d).map(|_| rng.uniform_f32()).collect();
            let y: Vec<u32> = (0..batch_size)
                .map(|_| rng.below(outputs as u64) as u32)
                .collect();
            Ok((
                Tensor::from_vec(x, (batch_size, input[0], input[1], input[2]), device)?,
                Tensor::from_vec(y, batch_size, device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut step = |i: usize| -> Result<()> {
        let (x, y) = &batches[i % batches.len()];
        let out = model.forward(x, true)?;
        let loss = candle_nn::loss::cross_entropy(&out.logits, y)?;
        let _ = loss.to_scalar::<f32>()?;
        let grads = loss.backward()?;
        opt.step(model.params(), &grads)
    };
    for i in 0..warmup {
        step(i)?;
    }
    let start = Instant::now();
    for i in 0..steps {
        step(i)?;
    }
    Ok(StepTiming {
        batch_size,
        steps,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Time the trainer's full step ([`crate::Trainer::step`]: the algorithm's loss with its forward
/// passes and memory draws, backward, gradient edits, optimizer step, `after_step`, memory
/// insertion) on the second task, after the first has been trained with its task boundary, so
/// penalties, teachers and memories are active. `steps` timed steps after `warmup` untimed ones,
/// on the second task's batches of `batch_size` gathered beforehand (data loading excluded).
///
/// # Errors
/// A stream of fewer than two tasks, a second task without one full batch, or a failing step.
pub fn time_algorithm_steps(
    trainer: &mut crate::Trainer,
    batch_size: usize,
    warmup: usize,
    steps: usize,
) -> Result<StepTiming> {
    use crate::data::{GatherBuf, Split};
    use crate::error::Error;
    if trainer.stream.len() < 2 {
        return Err(Error::msg(
            "timing an algorithm's step needs a stream of at least two tasks",
        ));
    }
    let device = trainer.device().clone();
    let mut buf = GatherBuf::default();
    let mut batches_of = |trainer: &mut crate::Trainer, task: usize| -> Result<Vec<_>> {
        let refs = trainer.begin_task(task)?;
        refs.chunks(batch_size)
            .filter(|c| c.len() == batch_size)
            .map(|c| trainer.stream.gather(c, Split::Train, &mut buf, &device))
            .collect()
    };
    for (i, b) in batches_of(trainer, 0)?.iter().enumerate() {
        trainer.step(0, 0, i, b)?;
    }
    trainer.end_task(0)?;
    let batches = batches_of(trainer, 1)?;
    if batches.is_empty() {
        return Err(Error::msg(format!(
            "task 2 has no full batch of {batch_size} samples to time (an algorithm that trains \
             no stream steps, such as gdumb, has no step to time)"
        )));
    }
    for i in 0..warmup {
        trainer.step(1, 0, i, &batches[i % batches.len()])?;
    }
    let start = Instant::now();
    for i in 0..steps {
        trainer.step(1, 0, i, &batches[i % batches.len()])?;
    }
    Ok(StepTiming {
        batch_size,
        steps,
        seconds: start.elapsed().as_secs_f64(),
    })
}
