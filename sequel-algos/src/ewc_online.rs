//! Online EWC (Schwarz et al., "Progress & Compress: A scalable framework for continual learning",
//! ICML 2018): one running Fisher and one anchor instead of one pair per task.
//!
//! At the end of task t:  `F̃ₜ = γ·F̃ₜ₋₁ + Fₜ`,  `θ* = θ*ₜ`  (F̃₀ = 0)
//!
//! `L(θ) = CE_t(θ) + λ Σᵢ F̃ᵢ (θᵢ − θ*ᵢ)²`
//!
//! **½ convention:** no ½ — `λ·Σ F̃(θ − θ*)²`, as Mammoth's `ewc_on`, whose best values the presets
//! use. (Our separate-mode `ewc` has the paper's `λ/2`: with γ = 1, `ewc-online` at λ behaves like
//! `ewc` at 2λ with the anchors collapsed into the newest.)
//!
//! The old Fisher is decayed *before* the new one is added and the anchor moves every task; γ = 0
//! would replace F̃ by Fₜ (what SequeL's EWC effectively does), γ = 1 sums the Fishers. The Fisher
//! `Fₜ` is estimated exactly as in [`crate::ewc`] (the same `fisher: {kind, mode, batch_size,
//! samples}`). With `lambda: 0` nothing is computed and training is
//! bit-identical to `naive`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::model::Model;
use sequel_core::{Algorithm, AlgorithmConfig, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::ewc::scalar;
use crate::fisher::{task_fisher, FisherSpec};
use crate::penalty::{PerParam, QuadraticPenalty};

/// YAML keys of `algorithm: { name: ewc-online, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnlineEwcConfig {
    /// Penalty strength λ in `λ·Σ F̃(θ − θ*)²` (no ½). Default 1.0.
    pub lambda: f64,
    /// Decay γ of the running Fisher, in [0, 1]. Default 1.0 (Mammoth's best on every benchmark).
    pub gamma: f64,
    /// How each task's Fisher `Fₜ` is estimated; see `ewc`.
    pub fisher: FisherSpec,
}

impl Default for OnlineEwcConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            gamma: 1.0,
            fisher: FisherSpec::default(),
        }
    }
}

impl AlgorithmConfig for OnlineEwcConfig {
    const NAME: &'static str = "ewc-online";
    const SUMMARY: &'static str =
        "online EWC: one running Fisher with decay gamma, one anchor (Schwarz et al. 2018)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(OnlineEwc::new(self)?))
    }
}

pub struct OnlineEwc {
    lambda: f64,
    gamma: f64,
    fisher: FisherSpec,
    /// F̃, the decayed sum of the task Fishers.
    running: Option<PerParam>,
    penalty: QuadraticPenalty,
}

impl OnlineEwc {
    pub fn new(cfg: OnlineEwcConfig) -> Result<Self> {
        check::non_negative("lambda", cfg.lambda)?;
        check::unit_interval("gamma", cfg.gamma)?;
        cfg.fisher.check()?;
        Ok(Self {
            lambda: cfg.lambda,
            gamma: cfg.gamma,
            fisher: cfg.fisher,
            running: None,
            penalty: QuadraticPenalty::default(),
        })
    }

    /// The running Fisher F̃ after the most recent task.
    pub fn running_fisher(&self) -> Option<&PerParam> {
        self.running.as_ref()
    }

    /// `Σᵢ F̃ᵢ(θᵢ − θ*ᵢ)²` at the current weights (without λ), if a task has ended.
    pub fn penalty(&self, model: &dyn Model) -> Result<Option<f64>> {
        scalar(self.penalty.value(model.params())?)
    }
}

impl Algorithm for OnlineEwc {
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let ce = ctx.ce(batch)?;
        match self.penalty.value(ctx.model.params())? {
            Some(r) if self.lambda > 0.0 => Ok((ce + (r * self.lambda)?)?),
            _ => Ok(ce),
        }
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.scope("penalty", |io| self.penalty.state(io))?;
        io.field("accumulator", &mut self.running)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.lambda == 0.0 {
            return Ok(());
        }
        let f = task_fisher(ctx, &self.fisher)?;
        let running = match &self.running {
            Some(old) => old.axpby(self.gamma, &f, 1.0)?,
            None => f,
        };
        self.penalty
            .replace(running.clone(), PerParam::values(ctx.model.params())?);
        self.running = Some(running);
        Ok(())
    }
}
