//! Weight averaging of the task models: the uniform average (model soup, Wortsman et al., ICML
//! 2022) and an exponential moving average (CoMA, Marouf et al., ECCV 2024; EMA of weights,
//! Soutif-Cormerais et al., CoLLAs 2023).
//!
//! ```text
//! average:  θ̄_t = (1/t)·Σ_{s≤t} θ̂_s                 (running form: θ̄_{t−1} + (θ̂_t − θ̄_{t−1})/t)
//! ema:      θ̄_1 = θ̂_1,  θ̄_t = μ·θ̄_{t−1} + (1 − μ)·θ̂_t
//! ```
//!
//! Both are averages of models, so the anchor does not change them (without `lines`): with
//! `anchor: initial` the average is formed from the kept task vectors, θ₀ + (1/t)·Σ τ_s; with
//! `anchor: previous` from the running form. An optional `lines:` block scales the result's vector
//! relative to the anchor.

use sequel_core::consolidation::{Anchor, ConsolidationCtx, TaskVector};
use sequel_core::Result;
use serde::{Deserialize, Serialize};

use super::{bad, LinesConfig, Merge, Scaled};

/// `average` takes only an optional `lines:` block.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AverageConfig {
    /// LiNeS applied to the averaged vector (absent by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<LinesConfig>,
}

/// The uniform average of vectors (or of models, given as vectors from a common origin).
pub fn uniform_average(vectors: &[TaskVector]) -> Option<TaskVector> {
    let mut s = TaskVector::sum(vectors)?;
    s.scale(1.0 / vectors.len() as f32);
    Some(s)
}

pub struct Average;

impl Merge for Average {
    fn name(&self) -> &str {
        "average"
    }
    fn keeps_task_vectors(&self) -> bool {
        true
    }
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        match ctx.anchor {
            Anchor::Initial => uniform_average(ctx.task_vectors)
                .ok_or_else(|| sequel_core::Error::msg("no task vectors to average")),
            Anchor::Previous => {
                // The anchor is θ̄_{t−1}: the update toward the running mean.
                let mut tau = ctx.current()?.clone();
                tau.scale(1.0 / (ctx.task + 1) as f32);
                Ok(tau)
            }
        }
    }
}

pub fn strategy(c: AverageConfig) -> Result<Scaled<Average>> {
    Scaled::new(Average, c.lines)
}

/// `ema` parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmaConfig {
    /// Weight of the previous model, in [0, 1). Default 0.6 (CoMA's weight 0.4 on the new model).
    #[serde(default = "default_mu")]
    pub mu: f32,
    /// LiNeS applied to the result's vector (absent by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<LinesConfig>,
}

fn default_mu() -> f32 {
    0.6
}

pub struct Ema {
    pub mu: f32,
}

impl Merge for Ema {
    fn name(&self) -> &str {
        "ema"
    }
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        if ctx.task == 0 {
            // The average starts at the first trained model.
            return Ok(ctx.current()?.clone());
        }
        // (θ̄_{t−1} − anchor) + (1 − μ)(θ̂_t − θ̄_{t−1})
        let mut tau = ctx.between(ctx.anchor_weights(), ctx.previous)?;
        let step = ctx.between(ctx.previous, ctx.trained)?;
        tau.add_scaled(&step, 1.0 - self.mu);
        Ok(tau)
    }
}

pub fn ema_strategy(c: EmaConfig) -> Result<Scaled<Ema>> {
    if !(0.0..1.0).contains(&c.mu) {
        return Err(bad(
            "consolidation.mu",
            format!("must be in [0, 1), found {}", c.mu),
        ));
    }
    Scaled::new(Ema { mu: c.mu }, c.lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consolidation::fixture::*;
    use sequel_core::consolidation::Wiring;

    #[test]
    fn averaging_identical_models_returns_the_model() {
        let v = vector(&[[1.5, -2.0], [0.3, 0.7], [4.0, 0.0]]);
        let avg = uniform_average(&[v.clone(), v.clone(), v.clone()]).unwrap();
        assert_eq!(avg, v);
        let theta0 = snap(&[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]);
        let m = snap(&[[1.0, -2.0], [0.5, 0.25], [4.0, 8.0]]);
        let models = [m.clone(), m.clone(), m.clone()];
        for wiring in [Wiring::default(), initial_wiring()] {
            let out = run(
                &mut strategy(AverageConfig::default()).unwrap(),
                wiring,
                &theta0,
                &models,
            );
            assert_eq!(values(&out[2]), values(&m), "{wiring:?}");
            let out = run(
                &mut ema_strategy(EmaConfig {
                    mu: 0.6,
                    lines: None,
                })
                .unwrap(),
                wiring,
                &theta0,
                &models,
            );
            assert_eq!(values(&out[2]), values(&m), "{wiring:?}");
        }
    }

    #[test]
    fn average_is_the_mean_of_the_trained_models_for_either_anchor() {
        let theta0 = snap(&[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]);
        let models = [
            snap(&[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
            snap(&[[3.0, 0.0], [1.0, 0.0], [-1.0, 2.0]]),
            snap(&[[2.0, 1.0], [2.0, -1.0], [2.0, 1.0]]),
        ];
        let want = [[2.0, 1.0], [2.0, 1.0], [2.0, 3.0]];
        for wiring in [Wiring::default(), initial_wiring()] {
            let out = run(
                &mut strategy(AverageConfig::default()).unwrap(),
                wiring,
                &theta0,
                &models,
            );
            for (got, w) in values(&out[2]).iter().zip(want) {
                assert!(
                    (got[0] - w[0]).abs() < 1e-6 && (got[1] - w[1]).abs() < 1e-6,
                    "{got:?}"
                );
            }
        }
    }

    #[test]
    fn ema_weights_the_previous_model_by_mu() {
        let theta0 = snap(&[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]);
        let models = [
            snap(&[[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]),
            snap(&[[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]),
        ];
        let out = run(
            &mut ema_strategy(EmaConfig {
                mu: 0.75,
                lines: None,
            })
            .unwrap(),
            Wiring::default(),
            &theta0,
            &models,
        );
        assert_eq!(values(&out[0]), values(&models[0]));
        assert_eq!(values(&out[1])[0], [1.25, 1.25]);
        assert!(ema_strategy(EmaConfig {
            mu: 1.0,
            lines: None
        })
        .is_err());
    }
}
