//! LiNeS, Layer-increasing Network Scaling (Wang, Dimitriadis, Favero, Ortiz-Jiménez, Fleuret,
//! Frossard, ICLR 2025, arXiv 2410.17146).
//!
//! The update of layer ℓ ∈ 1..=L is scaled by
//!
//! ```text
//! λ(ℓ) = α + β·(ℓ − 1)/(L − 1),        θ̄ = anchor + concat_ℓ λ(ℓ)·τ⁽ℓ⁾
//! ```
//!
//! so shallow layers are pulled toward the anchor and deep layers keep their update.
//! - Single-task form (paper §3): α = γ, β = 1 − γ, so λ(1) = γ and λ(L) = 1; γ = 1 is the identity.
//! - Multi-task form (paper §4), applied after a merge τ_M of T vectors: α from the norm rule
//!   α = (1/T)·‖Σ_t τ_t‖₁ / ‖τ_M‖₁ (`alpha: norm`), β tuned.
//!
//! Depths come from the model's [`ParamSet`] (input side 1). The paper's classification heads were
//! frozen, so it has no rule for a trainable head; [`HeadPolicy`] makes the choice explicit. With
//! one layer (L = 1) there is no depth to scale along and λ = α + β. Per-task heads of multi-head
//! task-IL and batch-norm statistics are never scaled (the trainer keeps them as trained).

use sequel_core::consolidation::{consolidates, ConsolidationCtx, TaskVector};
use sequel_core::model::{ParamSet, Role};
use sequel_core::Result;
use serde::{Deserialize, Serialize};

use super::{bad, Merge, Scaled};

/// What a shared classifier head gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadPolicy {
    /// λ = α + β, the deepest layer's coefficient; the body's depths span 1..=L_body (default).
    #[default]
    Deepest,
    /// λ = 1: the head keeps its (merged) fine-tuned update unscaled.
    Keep,
    /// The head is one more layer of the grid: λ(ℓ) over 1..=L with the head at depth L, so the
    /// last body layer gets α + β·(L − 2)/(L − 1).
    Body,
}

/// `alpha:` a number, or `norm` for the multi-task norm rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a number or `norm`")]
pub enum Alpha {
    Value(f32),
    Rule(AlphaRule),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlphaRule {
    /// α = (1/T)·‖Σ τ_t‖₁ / ‖τ_M‖₁.
    Norm,
}

/// `gamma:` / `beta:` a number, or `auto`: chosen on validation data after every task from the
/// grid {0, 0.1, …, 1} by the paper's rule (see [`sequel_core::consolidation::selection_score`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a number or `auto`")]
pub enum Coef {
    Value(f32),
    Rule(AutoRule),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoRule {
    Auto,
}

/// The grid of `auto`: {0, 0.1, …, 1} (LiNeS paper, single-task γ).
pub fn auto_grid() -> Vec<f32> {
    (0..=10).map(|i| i as f32 / 10.0).collect()
}

/// LiNeS parameters: `gamma` alone (single-task form), or `beta` with an optional `alpha`
/// (default `norm`). No default γ: the paper selects it on validation data (`auto`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinesConfig {
    /// Single-task form: α = γ, β = 1 − γ; `auto` chooses γ on validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<Coef>,
    /// A number, or `norm` (default when `beta` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<Alpha>,
    /// A number, or `auto` (chosen on validation data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<Coef>,
    /// `deepest` (default), `keep` or `body`.
    #[serde(default)]
    pub head: HeadPolicy,
}

/// Validated LiNeS scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lines {
    pub alpha: Alpha,
    pub beta: f32,
    pub head: HeadPolicy,
    /// Which coefficient `auto` chooses, if any (its value is set by [`Lines::set`]).
    pub auto: Option<Auto>,
}

/// The coefficient a LiNeS config leaves to validation data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auto {
    Gamma,
    Beta,
}

/// λ(ℓ) = α + β·(ℓ − 1)/(L − 1); α + β when L ≤ 1.
pub fn coefficient(alpha: f32, beta: f32, depth: usize, layers: usize) -> f32 {
    if layers <= 1 {
        return alpha + beta;
    }
    let l = depth.clamp(1, layers);
    alpha + beta * (l - 1) as f32 / (layers - 1) as f32
}

impl Lines {
    /// Validate a config; `path` names it in errors (`consolidation` or `consolidation.lines`).
    pub fn new(c: LinesConfig, path: &str) -> Result<Self> {
        let finite = |key: &str, v: f32| {
            if v.is_finite() {
                Ok(v)
            } else {
                Err(bad(
                    &format!("{path}.{key}"),
                    format!("must be a finite number, found {v}"),
                ))
            }
        };
        let mut auto = None;
        // `auto` starts at 1 (γ: the identity); the trainer sets the chosen value before use.
        let mut value = |key: &str, c: Coef, which: Auto| match c {
            Coef::Value(v) => finite(key, v),
            Coef::Rule(AutoRule::Auto) => {
                auto = Some(which);
                Ok(1.0)
            }
        };
        let (alpha, beta) =
            match (c.gamma, c.alpha, c.beta) {
                (Some(g), None, None) => {
                    let g = value("gamma", g, Auto::Gamma)?;
                    (Alpha::Value(g), 1.0 - g)
                }
                (Some(_), _, _) => {
                    return Err(bad(
                        path,
                        "give either `gamma` (α = γ, β = 1 − γ) or `alpha`/`beta`, not both".into(),
                    ))
                }
                (None, alpha, Some(b)) => {
                    let alpha = alpha.unwrap_or(Alpha::Rule(AlphaRule::Norm));
                    if let Alpha::Value(a) = alpha {
                        finite("alpha", a)?;
                    }
                    (alpha, value("beta", b, Auto::Beta)?)
                }
                (None, _, None) => return Err(bad(
                    path,
                    "LiNeS needs `gamma` (single-task form), or `beta` with an optional `alpha` \
                     (a number or `norm`, the default)"
                        .into(),
                )),
            };
        Ok(Self {
            alpha,
            beta,
            head: c.head,
            auto,
        })
    }

    /// Set the coefficient `auto` chooses: γ (α = γ, β = 1 − γ) or β.
    pub fn set(&mut self, value: f32) {
        match self.auto {
            Some(Auto::Gamma) => {
                self.alpha = Alpha::Value(value);
                self.beta = 1.0 - value;
            }
            Some(Auto::Beta) => self.beta = value,
            None => {}
        }
    }

    /// α for a merged vector `merged` of the task vectors `vectors`.
    pub fn alpha_for(&self, merged: &TaskVector, vectors: &[TaskVector]) -> f32 {
        match self.alpha {
            Alpha::Value(a) => a,
            Alpha::Rule(AlphaRule::Norm) => {
                let t = vectors.len().max(1) as f64;
                let sum = TaskVector::sum(vectors).map(|s| s.l1()).unwrap_or(0.0);
                let m = merged.l1();
                if m > 0.0 {
                    (sum / m / t) as f32
                } else {
                    (1.0 / t) as f32
                }
            }
        }
    }

    /// The coefficient of every tensor in `params` order (`None` for tensors never scaled).
    pub fn coefficients(&self, params: &ParamSet, alpha: f32) -> Vec<Option<f32>> {
        let depth_of = |pred: &dyn Fn(Role) -> bool| {
            params
                .iter()
                .filter(|p| consolidates(p) && pred(p.role))
                .map(|p| p.depth)
                .max()
                .unwrap_or(1)
        };
        let body_layers = depth_of(&|r| r == Role::Body);
        let all_layers = depth_of(&|_| true);
        params
            .iter()
            .map(|p| {
                if !consolidates(p) {
                    return None;
                }
                Some(match (p.role, self.head) {
                    (Role::Head, HeadPolicy::Deepest) => alpha + self.beta,
                    (Role::Head, HeadPolicy::Keep) => 1.0,
                    (_, HeadPolicy::Body) => coefficient(alpha, self.beta, p.depth, all_layers),
                    _ => coefficient(alpha, self.beta, p.depth, body_layers),
                })
            })
            .collect()
    }

    /// Scale `tau` (merged from `vectors`) layer by layer, in place.
    pub fn scale(&self, params: &ParamSet, tau: &mut TaskVector, vectors: &[TaskVector]) {
        let alpha = self.alpha_for(tau, vectors);
        let coefs = self.coefficients(params, alpha);
        for (v, c) in tau.values.iter_mut().zip(coefs) {
            if let (Some(v), Some(c)) = (v, c) {
                for x in v.iter_mut() {
                    *x *= c;
                }
            }
        }
    }
}

/// The `lines` strategy's merge: the current task vector as it is (LiNeS does the rest).
pub struct Current;

impl Merge for Current {
    fn name(&self) -> &str {
        "lines"
    }
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        Ok(ctx.current()?.clone())
    }
}

/// The registered `lines` strategy: single-task LiNeS on θ̂_t − anchor.
pub fn strategy(c: LinesConfig) -> Result<Scaled<Current>> {
    Ok(Scaled {
        merge: Current,
        lines: Some(Lines::new(c, "consolidation")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consolidation::fixture::*;
    use sequel_core::consolidation::Wiring;

    fn cfg(gamma: f32) -> LinesConfig {
        LinesConfig {
            gamma: Some(Coef::Value(gamma)),
            ..Default::default()
        }
    }

    #[test]
    fn gamma_one_is_the_identity() {
        let mut s = strategy(cfg(1.0)).unwrap();
        let theta0 = snap(&[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]);
        let trained = [
            snap(&[[1.1, -0.2], [0.7, 2.4], [-0.5, 0.9]]),
            snap(&[[2.3, 0.2], [0.1, 1.4], [0.5, -0.9]]),
        ];
        for wiring in [Wiring::default(), initial_wiring()] {
            let out = run(&mut s, wiring, &theta0, &trained);
            for (o, t) in out.iter().zip(&trained) {
                assert_eq!(values(o), values(t), "{wiring:?}");
            }
        }
    }

    #[test]
    fn coefficients_grow_with_depth_from_alpha_to_alpha_plus_beta() {
        for (a, b, layers) in [(0.2f32, 0.5f32, 12usize), (0.0, 1.0, 3), (1.0, -0.5, 4)] {
            assert_eq!(coefficient(a, b, 1, layers), a);
            assert!((coefficient(a, b, layers, layers) - (a + b)).abs() < 1e-6);
            let cs: Vec<f32> = (1..=layers).map(|l| coefficient(a, b, l, layers)).collect();
            let monotone = cs
                .windows(2)
                .all(|w| if b >= 0.0 { w[1] >= w[0] } else { w[1] <= w[0] });
            assert!(monotone, "{cs:?}");
        }
        assert_eq!(coefficient(0.3, 0.7, 1, 1), 1.0);
    }

    #[test]
    fn head_policies_and_single_task_form_on_a_model() {
        let p = params(); // l1 depth 1, l2 depth 2, head depth 3
        let at = |head, gamma: f32| {
            let l = Lines::new(
                LinesConfig {
                    gamma: Some(Coef::Value(gamma)),
                    head,
                    ..Default::default()
                },
                "c",
            )
            .unwrap();
            let Alpha::Value(a) = l.alpha else {
                unreachable!()
            };
            l.coefficients(&p, a)
        };
        assert_eq!(
            at(HeadPolicy::Deepest, 0.2),
            vec![Some(0.2), Some(1.0), Some(1.0)]
        );
        assert_eq!(
            at(HeadPolicy::Body, 0.2),
            vec![Some(0.2), Some(0.6), Some(1.0)]
        );
        let l = Lines::new(
            LinesConfig {
                alpha: Some(Alpha::Value(0.1)),
                beta: Some(Coef::Value(0.5)),
                head: HeadPolicy::Keep,
                ..Default::default()
            },
            "c",
        )
        .unwrap();
        assert_eq!(
            l.coefficients(&p, 0.1),
            vec![Some(0.1), Some(0.6), Some(1.0)]
        );
        // The update of the deepest layer survives, the shallowest is pulled to γ of itself.
        let mut s = strategy(cfg(0.5)).unwrap();
        let theta0 = snap(&[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]);
        let out = run(
            &mut s,
            initial_wiring(),
            &theta0,
            &[snap(&[[2.0, -4.0], [2.0, 2.0], [1.0, 3.0]])],
        );
        assert_eq!(values(&out[0]), vec![[1.0, -2.0], [2.0, 2.0], [1.0, 3.0]]);
    }

    #[test]
    fn norm_rule_gives_one_over_t_for_a_plain_sum() {
        let l = Lines::new(
            LinesConfig {
                beta: Some(Coef::Value(0.5)),
                ..Default::default()
            },
            "c",
        )
        .unwrap();
        let vs = [
            vector(&[[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]]),
            vector(&[[1.0, -1.0], [2.0, 1.0], [0.0, 0.0]]),
        ];
        let sum = TaskVector::sum(&vs).unwrap();
        assert!((l.alpha_for(&sum, &vs) - 0.5).abs() < 1e-6);
        let mut avg = sum.clone();
        avg.scale(0.5);
        assert!((l.alpha_for(&avg, &vs) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn config_needs_gamma_or_beta_and_not_both() {
        assert!(Lines::new(LinesConfig::default(), "c").is_err());
        let both = LinesConfig {
            gamma: Some(Coef::Value(0.5)),
            beta: Some(Coef::Value(0.5)),
            ..Default::default()
        };
        assert!(Lines::new(both, "c").is_err());
        assert!(Lines::new(cfg(f32::NAN), "c").is_err());
        let c: LinesConfig = serde_yaml::from_str("{alpha: norm, beta: 0.3}").unwrap();
        assert_eq!(c.alpha, Some(Alpha::Rule(AlphaRule::Norm)));
        let c: LinesConfig = serde_yaml::from_str("{alpha: 0.25, beta: 0.3}").unwrap();
        assert_eq!(c.alpha, Some(Alpha::Value(0.25)));
        assert!(serde_yaml::from_str::<LinesConfig>("{alpha: big, beta: 0.3}").is_err());
    }
}
