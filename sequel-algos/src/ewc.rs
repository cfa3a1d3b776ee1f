//! EWC — Elastic Weight Consolidation, separate mode (Kirkpatrick et al., "Overcoming catastrophic
//! forgetting in neural networks", PNAS 2017):
//!
//! `L(θ) = CE_t(θ) + Σ_{k<t} (λ/2) Σᵢ F_{k,i} (θᵢ − θ*_{k,i})²`
//!
//! **½ convention:** the penalty is `(λ/2)·Σ F(θ − θ*)²`, as in the paper and SequeL; Avalanche
//! uses `λ·Σ F(θ − θ*)²`, so its λ is half of ours for the same run.
//!
//! One Fisher `F_k` and one anchor `θ*_k` per past task, both taken when task `k` ends. The past
//! pairs are kept in the exactly merged form of [`QuadraticPenalty`] (same value, same gradient,
//! `O(|θ|)` memory and per-step cost however many tasks have passed).
//!
//! **Fisher** (diagonal, at `θ*_k`, on task `k`'s training samples; `fisher: {kind, mode, ...}`):
//! see [`crate::fisher`]. With `lambda: 0` nothing is computed and training is bit-identical to `naive`.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::model::Model;
use sequel_core::{Algorithm, AlgorithmConfig, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::fisher::task_fisher;
pub use crate::fisher::{fisher_diagonal, FisherKind, FisherSpec};
use crate::penalty::{PerParam, QuadraticPenalty};

/// YAML keys of `algorithm: { name: ewc, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EwcConfig {
    /// Penalty strength λ in `(λ/2)·Σ F(θ − θ*)²`. Default 1.0 (SequeL's `ewc_lambda`;
    /// continual-learning-baselines' permuted MNIST).
    pub lambda: f64,
    /// How each task's Fisher is estimated.
    pub fisher: FisherSpec,
}

impl Default for EwcConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            fisher: FisherSpec::default(),
        }
    }
}

impl AlgorithmConfig for EwcConfig {
    const NAME: &'static str = "ewc";
    const SUMMARY: &'static str =
        "Elastic Weight Consolidation, one Fisher + anchor per past task (Kirkpatrick et al. 2017)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Ewc::new(self)?))
    }
}

/// Separate-mode EWC.
pub struct Ewc {
    lambda: f64,
    fisher: FisherSpec,
    penalty: QuadraticPenalty,
    /// The Fisher of the most recent task (for inspection).
    last_fisher: Option<PerParam>,
}

impl Ewc {
    pub fn new(cfg: EwcConfig) -> Result<Self> {
        check::non_negative("lambda", cfg.lambda)?;
        cfg.fisher.check()?;
        Ok(Self {
            lambda: cfg.lambda,
            fisher: cfg.fisher,
            penalty: QuadraticPenalty::default(),
            last_fisher: None,
        })
    }

    /// The Fisher estimated at the end of the most recent task.
    pub fn last_fisher(&self) -> Option<&PerParam> {
        self.last_fisher.as_ref()
    }

    /// `Σ_k Σᵢ F_{k,i}(θᵢ − θ*_{k,i})²` at the current weights (without λ/2), if a task has ended.
    pub fn penalty(&self, model: &dyn Model) -> Result<Option<f64>> {
        scalar(self.penalty.value(model.params())?)
    }
}

pub(crate) fn scalar(t: Option<Tensor>) -> Result<Option<f64>> {
    t.map(|t| Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?))
        .transpose()
}

impl Algorithm for Ewc {
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let ce = ctx.ce(batch)?;
        match self.penalty.value(ctx.model.params())? {
            Some(r) if self.lambda > 0.0 => Ok((ce + (r * (self.lambda / 2.0))?)?),
            _ => Ok(ce),
        }
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.lambda == 0.0 {
            return Ok(());
        }
        let fisher = task_fisher(ctx, &self.fisher)?;
        let anchor = PerParam::values(ctx.model.params())?;
        self.penalty.add(fisher.clone(), anchor)?;
        self.last_fisher = Some(fisher);
        Ok(())
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.scope("penalty", |io| self.penalty.state(io))
    }
}
