//! MAS — Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, "Memory Aware
//! Synapses: Learning what (not) to forget", ECCV 2018).
//!
//! Importance of a task, label-free (eq. 4 of the paper, with the squared ℓ2 norm of the output):
//!
//! `Ω^new_i = (1/N) Σₙ | ∂ ‖f(xₙ; θ)‖²₂ / ∂θᵢ |`   at the end of the task, on its training inputs
//!
//! Running combination across tasks (Avalanche's, α = 0.5): `Ωₜ = α·Ωₜ₋₁ + (1 − α)·Ω^new`, `Ω₀ = 0`;
//! the anchor `θ*` moves to the weights at each task end (and only then).
//!
//! `L(θ) = CE_t(θ) + λ Σᵢ Ωᵢ (θᵢ − θ*ᵢ)²`
//!
//! **½ convention:** none — `λ·Σ Ω(θ − θ*)²`, the paper's eq. 3.
//!
//! `f` is the logits the training loss sees (all units; in multi-head task-IL the task's own head).
//! `importance: {mode: per-sample}` (default) takes |·| per sample, as the definition (all samples
//! at once on dense backbones, a batch-1 loop on others: see [`crate::importance`]); `minibatch` takes |·| of the gradient of the minibatch mean of
//! `‖f(x)‖²` (a cheaper approximation whose scale depends on `importance.batch_size`). Forward
//! passes run in evaluation mode. With `lambda: 0` nothing is computed and training is
//! bit-identical to `naive`.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::algorithm::task_samples;
use sequel_core::data::{Batch, SampleRef};
use sequel_core::model::{Model, ModelOutput};
use sequel_core::{Algorithm, AlgorithmConfig, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::ewc::scalar;
use crate::importance::{
    mean_gradient_statistic, per_sample_statistic, subset, training_logits, Granularity,
    ImportanceSpec, Reduce,
};
use crate::penalty::{PerParam, QuadraticPenalty};

/// YAML keys of `algorithm: { name: mas, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MasConfig {
    /// Penalty strength λ in `λ·Σ Ω(θ − θ*)²` (no ½). Default 1.0 (Avalanche `lambda_reg`, SequeL
    /// `mas_lambda`).
    pub lambda: f64,
    /// Weight α of the previous importance in `Ω ← αΩ + (1 − α)Ω^new`, in [0, 1]. Default 0.5
    /// (Avalanche).
    pub alpha: f64,
    /// How `Ω^new` is estimated.
    pub importance: ImportanceSpec,
}

impl Default for MasConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            alpha: 0.5,
            importance: ImportanceSpec::default(),
        }
    }
}

impl AlgorithmConfig for MasConfig {
    const NAME: &'static str = "mas";
    const SUMMARY: &'static str =
        "Memory Aware Synapses: output-norm gradient importance (Aljundi et al. 2018)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Mas::new(self)?))
    }
}

pub struct Mas {
    cfg: MasConfig,
    importance: Option<PerParam>,
    penalty: QuadraticPenalty,
}

impl Mas {
    pub fn new(cfg: MasConfig) -> Result<Self> {
        check::non_negative("lambda", cfg.lambda)?;
        check::unit_interval("alpha", cfg.alpha)?;
        cfg.importance.check()?;
        Ok(Self {
            cfg,
            importance: None,
            penalty: QuadraticPenalty::default(),
        })
    }

    /// Ω after the most recent task.
    pub fn importance(&self) -> Option<&PerParam> {
        self.importance.as_ref()
    }

    /// `Σᵢ Ωᵢ(θᵢ − θ*ᵢ)²` at the current weights (without λ), if a task has ended.
    pub fn penalty(&self, model: &dyn Model) -> Result<Option<f64>> {
        scalar(self.penalty.value(model.params())?)
    }
}

/// `Ω^new` of `model` on `samples` (module docs).
pub fn mas_importance(
    ctx: &TaskCtx,
    samples: &[SampleRef],
    mode: Granularity,
    batch_size: usize,
) -> Result<PerParam> {
    let stream = ctx.stream;
    if mode == Granularity::PerSample {
        // All samples at once where the backbone allows it (the MLP); the loop below otherwise.
        let vectorised = per_sample_statistic(
            ctx.model,
            stream,
            ctx.device,
            samples,
            Reduce::Abs,
            |logits, batch| {
                let norm = training_logits(logits, batch, stream)?
                    .sqr()?
                    .sum(D::Minus1)?;
                Ok(vec![(norm.ones_like()?, norm)])
            },
        )?;
        if let Some(v) = vectorised {
            return Ok(v);
        }
    }
    let bs = match mode {
        Granularity::PerSample => 1,
        Granularity::Minibatch => batch_size,
    };
    mean_gradient_statistic(
        ctx.model,
        stream,
        ctx.device,
        samples,
        bs,
        Reduce::Abs,
        |out: &ModelOutput, batch: &Batch| {
            let f = training_logits(&out.logits, batch, stream)?;
            // Mean over the rows of ‖f(x)‖²; a single row in per-sample mode.
            Ok(vec![(1.0, f.sqr()?.sum(D::Minus1)?.mean_all()?)])
        },
    )
}

impl Algorithm for Mas {
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let ce = ctx.ce(batch)?;
        match self.penalty.value(ctx.model.params())? {
            Some(r) if self.cfg.lambda > 0.0 => Ok((ce + (r * self.cfg.lambda)?)?),
            _ => Ok(ce),
        }
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.scope("penalty", |io| self.penalty.state(io))?;
        io.field("accumulator", &mut self.importance)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.cfg.lambda == 0.0 {
            return Ok(());
        }
        let samples = subset(
            task_samples(ctx.stream, ctx.task),
            self.cfg.importance.samples,
            ctx.rng,
        );
        let start = std::time::Instant::now();
        let new = mas_importance(
            ctx,
            &samples,
            self.cfg.importance.mode,
            self.cfg.importance.batch_size,
        )?;
        tracing::info!(
            task = ctx.task + 1,
            samples = samples.len(),
            seconds = start.elapsed().as_secs_f64(),
            max = new.max()?,
            "MAS importance estimated"
        );
        let a = self.cfg.alpha;
        let combined = match &self.importance {
            Some(old) => old.axpby(a, &new, 1.0 - a)?,
            None => PerParam::zeros(ctx.model.params())?.axpby(a, &new, 1.0 - a)?,
        };
        self.penalty
            .replace(combined.clone(), PerParam::values(ctx.model.params())?);
        self.importance = Some(combined);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{finite_difference_statistic, tiny_mlp_task};
    use sequel_core::rng::{SeededRng, Stream};

    #[test]
    fn importance_matches_its_definition_on_a_tiny_model() {
        let (model, stream, samples) = tiny_mlp_task();
        let dev = candle_core::Device::Cpu;
        let mut rng = SeededRng::new(0, Stream::Algorithm);
        let ctx = TaskCtx {
            task: 0,
            stream: &stream,
            model: model.as_ref(),
            device: &dev,
            rng: &mut rng,
            interrupt: None,
        };
        let got = mas_importance(&ctx, &samples, Granularity::PerSample, 1)
            .unwrap()
            .flat()
            .unwrap();
        // (1/N) Σₙ |∂‖f(xₙ)‖²/∂θ| by finite differences of a host-side f64 forward.
        let want = finite_difference_statistic(
            model.as_ref(),
            &stream,
            &samples,
            |z, _| z.iter().map(|v| v * v).sum(),
            f64::abs,
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "element {i}: {g} vs {w}");
        }
        assert!(want.iter().sum::<f64>() > 0.0);
    }
}
