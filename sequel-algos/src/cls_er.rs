//! CLS-ER — Complementary Learning System-based Experience Replay (Arani, Sarfraz & Zonooz,
//! "Learning Fast, Learning Slow: A General Continual Learning Method based on Complementary
//! Learning System", ICLR 2022).
//!
//! A working model `θ_W` and two semantic memories, exponential moving averages of it: a plastic
//! one `θ_P` and a stable one `θ_S`. Every step, on the incoming batch `x` joined with a memory
//! batch `(x′, y′)` (reservoir, every step):
//!
//! `L = CE(f_W([x ; x′]), [y ; y′]) + λ · MSE(f_W(x′), Z′)`,
//! `Z′ = f_S(x′)` where `softmax(f_S(x′))_{y′} > softmax(f_P(x′))_{y′}`, else `f_P(x′)`
//!
//! — each replayed sample is pulled towards the semantic memory more confident in its true class
//! (detached; the MSE is the mean over every logit). After the optimizer step each memory is
//! updated with probability `r_P` (resp. `r_S`), each coin drawn from the algorithm's seeded
//! stream: `θ_P ← a θ_P + (1 − a) θ_W`, `a = min(1 − 1/(k + 1), α_P)` with `k` the number of steps
//! so far (the reference code's warm-up), and likewise for `θ_S` with `α_S`. Both memories start as
//! copies of the initial weights. **Evaluation uses the stable model** (the paper's choice): its
//! weights are loaded into the model for each evaluation pass ([`Algorithm::before_eval`]) and the
//! working weights restored after it ([`Algorithm::after_eval`]), so training, the saved weights
//! and checkpoints carry the working model. Both memories and `k` are in [`Algorithm::state`].
//!
//! The semantic memories are evaluated in evaluation mode (no dropout, batch-norm running
//! statistics); every parameter, batch-norm statistics included, is averaged. In multi-head
//! task-IL the confidence and the MSE use each sample's own head. With a consolidator, the stable
//! model is evaluated instead of the consolidated weights.
//!
//! **Defaults**: the authors' `best_args` for seq-mnist with a buffer of 200 (λ = 2, r_P = 1,
//! α_P = 0.99, r_S = 0.9, α_S = 0.99, 128 replayed samples per step).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::loss::unit_mask;
use sequel_core::model::{Model, ModelOutput, Snapshot};
use sequel_core::{
    Algorithm, AlgorithmConfig, EvalCtx, Memory, MemoryConfig, Result, StateIo, StepCtx, TaskCtx,
};

use crate::check;
use crate::der::logit_mse;

/// YAML keys of `algorithm: { name: cls-er, ... }`, besides the memory's (`buffer_size: 200`,
/// `buffer_policy: reservoir`, `insert: step`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClsErConfig {
    /// λ, weight of the consistency (MSE) term.
    pub lambda: f64,
    /// r_P, probability of updating the plastic model after a step.
    pub r_p: f64,
    /// α_P, decay of the plastic model.
    pub alpha_p: f64,
    /// r_S, probability of updating the stable model after a step.
    pub r_s: f64,
    /// α_S, decay of the stable model.
    pub alpha_s: f64,
    /// Samples drawn from the memory per step.
    pub replay_batch_size: usize,
    #[serde(skip)]
    pub memory: MemoryConfig,
}

impl Default for ClsErConfig {
    fn default() -> Self {
        Self {
            lambda: 2.0,
            r_p: 1.0,
            alpha_p: 0.99,
            r_s: 0.9,
            alpha_s: 0.99,
            replay_batch_size: 128,
            memory: MemoryConfig::default(),
        }
    }
}

impl AlgorithmConfig for ClsErConfig {
    const NAME: &'static str = "cls-er";
    const SUMMARY: &'static str = "CLS-ER: ER + consistency to plastic/stable EMA models, evaluated with the stable one (Arani et al. 2022)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(ClsEr::new(self)?))
    }
    fn memory(&mut self) -> Option<&mut MemoryConfig> {
        Some(&mut self.memory)
    }
}

pub struct ClsEr {
    cfg: ClsErConfig,
    memory: Memory,
    plastic: Option<Box<dyn Model>>,
    stable: Option<Box<dyn Model>>,
    /// Weights loaded from a checkpoint, written into the memories at the next `before_task`.
    loaded: Option<(Snapshot, Snapshot)>,
    /// Steps so far (the EMA warm-up's `k`).
    steps: u64,
    /// The working weights while the stable ones are evaluated.
    working: Option<Snapshot>,
}

impl ClsEr {
    pub fn new(cfg: ClsErConfig) -> Result<Self> {
        check::non_negative("lambda", cfg.lambda)?;
        check::unit_interval("r_p", cfg.r_p)?;
        check::unit_interval("alpha_p", cfg.alpha_p)?;
        check::unit_interval("r_s", cfg.r_s)?;
        check::unit_interval("alpha_s", cfg.alpha_s)?;
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        Ok(Self {
            memory: Memory::new(cfg.memory, false)?,
            cfg,
            plastic: None,
            stable: None,
            loaded: None,
            steps: 0,
            working: None,
        })
    }

    /// The stable model (once the first task has started).
    pub fn stable(&self) -> Option<&dyn Model> {
        self.stable.as_deref()
    }

    /// The plastic model (once the first task has started).
    pub fn plastic(&self) -> Option<&dyn Model> {
        self.plastic.as_deref()
    }
}

/// `θ_E ← a θ_E + (1 − a) θ_W` over every parameter.
fn ema(memory: &dyn Model, working: &dyn Model, a: f64) -> Result<()> {
    for (e, w) in memory.params().iter().zip(working.params().iter()) {
        let v = ((e.var.as_tensor() * a)? + (w.var.as_tensor() * (1.0 - a))?)?;
        e.var.set(&v.detach())?;
    }
    Ok(())
}

/// Per row, the logits of the semantic memory with the larger softmax probability of the row's
/// true unit (the stable one on ties goes to the plastic one, as the reference code's `>`).
pub fn select(
    stable: &Tensor,
    plastic: &Tensor,
    y: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let prob = |z: &Tensor| -> Result<Tensor> {
        let z = match mask {
            Some(m) => z.broadcast_add(m)?,
            None => z.clone(),
        };
        let p = candle_nn::ops::softmax(&z, D::Minus1)?;
        Ok(p.gather(&y.unsqueeze(1)?, 1)?)
    };
    let pick = prob(stable)?.gt(&prob(plastic)?)?;
    Ok(pick
        .broadcast_as(stable.shape())?
        .where_cond(stable, plastic)?)
}

impl Algorithm for ClsEr {
    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.stable.is_none() {
            self.plastic = Some(ctx.model.fork()?);
            self.stable = Some(ctx.model.fork()?);
        }
        if let (Some((p, s)), Some(pm), Some(sm)) =
            (self.loaded.take(), &self.plastic, &self.stable)
        {
            pm.params().restore(&p)?;
            sm.params().restore(&s)?;
        }
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let s = ctx.stream;
        let replay = self
            .memory
            .draw(self.cfg.replay_batch_size, s, ctx.device)?;
        let f = ctx.forward(&[batch, &replay.batch])?;
        let ce = ctx.task_loss(&f.out.logits, &f.batch)?;
        let (Some(pm), Some(sm)) = (&self.plastic, &self.stable) else {
            return Ok(ce);
        };
        if !f.has(1) || self.cfg.lambda == 0.0 {
            return Ok(ce);
        }
        let x = &replay.batch.x;
        let zs = sm.forward(x, false)?.logits.detach();
        let zp = pm.forward(x, false)?.logits.detach();
        ctx.charge(2 * replay.batch.len(), 0);
        let mask = if s.mask_in_training() {
            Some(unit_mask(&replay.batch, s, s.num_units)?)
        } else {
            None
        };
        let target = select(&zs, &zp, &replay.batch.y, mask.as_ref())?;
        let cons = logit_mse(&f.logits(1)?, &replay.batch, &target, s)?;
        Ok((ce + (cons * self.cfg.lambda)?)?)
    }

    fn after_step(&mut self, _: &Batch, _: &ModelOutput, ctx: &mut StepCtx) -> Result<()> {
        self.steps += 1;
        let warm = 1.0 - 1.0 / (self.steps + 1) as f64;
        let (Some(pm), Some(sm)) = (&self.plastic, &self.stable) else {
            return Ok(());
        };
        if ctx.rng.uniform_f64() < self.cfg.r_p {
            ema(pm.as_ref(), ctx.model, warm.min(self.cfg.alpha_p))?;
        }
        if ctx.rng.uniform_f64() < self.cfg.r_s {
            ema(sm.as_ref(), ctx.model, warm.min(self.cfg.alpha_s))?;
        }
        Ok(())
    }

    fn before_eval(&mut self, ctx: &EvalCtx) -> Result<()> {
        if let Some(sm) = &self.stable {
            self.working = Some(ctx.model.params().snapshot()?);
            ctx.model.params().restore(&sm.params().snapshot()?)?;
        }
        Ok(())
    }

    fn after_eval(&mut self, ctx: &EvalCtx) -> Result<()> {
        if let Some(w) = self.working.take() {
            ctx.model.params().restore(&w)?;
        }
        Ok(())
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        let snap =
            |m: &Option<Box<dyn Model>>| m.as_ref().map(|m| m.params().snapshot()).transpose();
        let (mut p, mut s) = (snap(&self.plastic)?, snap(&self.stable)?);
        io.field("plastic", &mut p)?;
        io.field("stable", &mut s)?;
        io.field("steps", &mut self.steps)?;
        if io.is_loading() {
            self.loaded = p.zip(s);
        }
        Ok(())
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_takes_the_memory_more_confident_in_the_true_class() {
        let dev = candle_core::Device::Cpu;
        let s = Tensor::new(&[[2f32, 0.0, 0.0], [0.0, 0.0, 1.0]], &dev).unwrap();
        let p = Tensor::new(&[[0f32, 3.0, 0.0], [0.0, 0.0, 3.0]], &dev).unwrap();
        let y = Tensor::new(&[0u32, 2], &dev).unwrap();
        let z = select(&s, &p, &y, None).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(z, vec![vec![2.0, 0.0, 0.0], vec![0.0, 0.0, 3.0]]);
    }
}
