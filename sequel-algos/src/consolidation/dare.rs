//! DARE, Drop And REscale (Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing
//! Abilities from Homologous Models as a Free Lunch", ICML 2024):
//!
//! ```text
//! τ̃_s = (1 − m_s) ⊙ τ_s / (1 − p),   m_s ~ Bernoulli(p) per entry
//! then task arithmetic (θ̄ = anchor + λ·Σ τ̃_s) or TIES on the τ̃_s
//! ```
//!
//! Masks come from the seeded consolidation stream, so a run is reproducible. Every merge draws
//! fresh masks for every kept vector. Defaults: p = 0.1 and rescaling by 1/(1 − p) (MergeLM's
//! `weight_mask_rate` and rescale flag), then task arithmetic with λ = 0.3 (as `task-arithmetic`);
//! `merge: ties` uses TIES with `k` (default 20 %), global trimming and the disjoint mean.

use sequel_core::consolidation::{ConsolidationCtx, TaskVector};
use sequel_core::rng::SeededRng;
use sequel_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::task_arithmetic::task_arithmetic;
use super::ties::{check_k, ties, Aggregate, TiesParams, TrimScope};
use super::{bad, check_lambda, LinesConfig, Merge, Scaled};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DareMerge {
    #[default]
    TaskArithmetic,
    Ties,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DareConfig {
    /// Drop rate, in [0, 1). Default 0.1.
    #[serde(default = "default_p")]
    pub p: f32,
    /// Divide the kept entries by 1 − p. Default true.
    #[serde(default = "yes")]
    pub rescale: bool,
    /// `task-arithmetic` (default) or `ties`.
    #[serde(default)]
    pub merge: DareMerge,
    /// Scaling of the merged vector. Default 0.3.
    #[serde(default = "default_lambda")]
    pub lambda: f32,
    /// With `merge: ties`: percentage kept by TIES's trim. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<f32>,
    /// LiNeS applied to the merged vector (absent by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<LinesConfig>,
}

fn default_p() -> f32 {
    0.1
}
fn yes() -> bool {
    true
}
fn default_lambda() -> f32 {
    0.3
}

/// Drop each entry of `v` with probability `p`; rescale the rest by 1/(1 − p) if asked.
pub fn dare(v: &TaskVector, p: f32, rescale: bool, rng: &mut SeededRng) -> TaskVector {
    let mut out = v.clone();
    let keep_scale = if rescale { 1.0 / (1.0 - p) } else { 1.0 };
    for x in out.values.iter_mut().flatten().flatten() {
        if rng.uniform_f32() < p {
            *x = 0.0;
        } else if keep_scale != 1.0 {
            *x *= keep_scale;
        }
    }
    out
}

pub struct Dare {
    pub p: f32,
    pub rescale: bool,
    pub merge: DareMerge,
    pub lambda: f32,
    pub k: f32,
}

impl Merge for Dare {
    fn name(&self) -> &str {
        "dare"
    }
    fn keeps_task_vectors(&self) -> bool {
        true
    }
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        let dropped: Vec<TaskVector> = ctx
            .task_vectors
            .iter()
            .map(|v| dare(v, self.p, self.rescale, ctx.rng))
            .collect();
        match self.merge {
            DareMerge::TaskArithmetic => task_arithmetic(&dropped, self.lambda),
            DareMerge::Ties => ties(
                &dropped,
                TiesParams {
                    k: self.k,
                    trim_scope: TrimScope::Global,
                    aggregate: Aggregate::Mean,
                },
                self.lambda,
            ),
        }
        .ok_or_else(|| Error::msg("no task vectors to merge"))
    }
}

pub fn strategy(c: DareConfig) -> Result<Scaled<Dare>> {
    if !(0.0..1.0).contains(&c.p) {
        return Err(bad(
            "consolidation.p",
            format!("must be in [0, 1), found {}", c.p),
        ));
    }
    check_lambda("lambda", c.lambda)?;
    let k = match (c.merge, c.k) {
        (DareMerge::Ties, k) => {
            let k = k.unwrap_or(20.0);
            check_k("consolidation.k", k)?;
            k
        }
        (DareMerge::TaskArithmetic, None) => 100.0,
        (DareMerge::TaskArithmetic, Some(_)) => {
            return Err(bad(
                "consolidation.k",
                "applies to `merge: ties` only; remove it".into(),
            ))
        }
    };
    Scaled::new(
        Dare {
            p: c.p,
            rescale: c.rescale,
            merge: c.merge,
            lambda: c.lambda,
            k,
        },
        c.lines,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consolidation::fixture::vector;
    use sequel_core::rng::Stream;

    fn big() -> TaskVector {
        TaskVector {
            values: vec![
                Some((0..1000).map(|i| i as f32 * 0.01 - 3.0).collect()),
                None,
            ],
        }
    }

    #[test]
    fn p_zero_is_the_identity() {
        let v = vector(&[[1.5, -2.0], [0.3, 0.7], [4.0, 0.0]]);
        let mut rng = SeededRng::new(0, Stream::Consolidation);
        assert_eq!(dare(&v, 0.0, true, &mut rng), v);
        assert_eq!(dare(&big(), 0.0, false, &mut rng), big());
    }

    #[test]
    fn same_seed_same_mask_other_seed_other_mask_and_rescaled() {
        let v = big();
        let a = dare(&v, 0.5, true, &mut SeededRng::new(7, Stream::Consolidation));
        let b = dare(&v, 0.5, true, &mut SeededRng::new(7, Stream::Consolidation));
        let c = dare(&v, 0.5, true, &mut SeededRng::new(8, Stream::Consolidation));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let (orig, kept) = (v.values[0].as_ref().unwrap(), a.values[0].as_ref().unwrap());
        let dropped = kept.iter().filter(|x| **x == 0.0).count();
        assert!((400..600).contains(&dropped), "{dropped}");
        for (o, k) in orig.iter().zip(kept) {
            assert!(*k == 0.0 || (k - 2.0 * o).abs() < 1e-6);
        }
        assert_eq!(a.values[1], None);
    }

    #[test]
    fn bad_values_are_config_errors() {
        let c = |p, merge, k| DareConfig {
            p,
            rescale: true,
            merge,
            lambda: 0.3,
            k,
            lines: None,
        };
        assert!(strategy(c(1.0, DareMerge::TaskArithmetic, None)).is_err());
        assert!(strategy(c(0.1, DareMerge::TaskArithmetic, Some(20.0))).is_err());
        assert!(strategy(c(0.1, DareMerge::Ties, Some(0.0))).is_err());
        assert!(strategy(c(0.1, DareMerge::Ties, None)).is_ok());
    }
}
