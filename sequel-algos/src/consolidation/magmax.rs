//! MagMax (Marczak, Twardowski, Trzciński, Cygert, "MagMax: Leveraging Model Merging for Seamless
//! Continual Learning", ECCV 2024):
//!
//! ```text
//! τ_max[j] = τ_{s*}[j],  s* = argmax_s |τ_s[j]|   (ties go to the later task)
//! θ̄_t = θ₀ + λ·τ_max,   λ = 0.5
//! ```
//!
//! Its published wiring is the default here: sequential fine-tuning (`continue_from: trained`)
//! with task vectors relative to θ₀ (`anchor: initial`), the merge only deployed. With
//! `anchor: previous` only the current update is merged, which reduces to task arithmetic.

use sequel_core::consolidation::{
    Anchor, ConsolidationCtx, ContinueFrom, Evaluate, TaskVector, Wiring,
};
use sequel_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{check_lambda, LinesConfig, Merge, Scaled};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MagMaxConfig {
    /// Scaling of the max-magnitude vector. Default 0.5 (the paper's).
    #[serde(default = "default_lambda")]
    pub lambda: f32,
    /// LiNeS applied to λ·τ_max (absent by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<LinesConfig>,
}

fn default_lambda() -> f32 {
    0.5
}

/// Per entry, the value of largest magnitude across `vectors` (the later one on a tie), times λ.
pub fn magmax(vectors: &[TaskVector], lambda: f32) -> Option<TaskVector> {
    let (first, rest) = vectors.split_first()?;
    let mut out = first.clone();
    for v in rest {
        for (o, x) in out.values.iter_mut().zip(&v.values) {
            if let (Some(o), Some(x)) = (o, x) {
                for (a, b) in o.iter_mut().zip(x) {
                    if b.abs() >= a.abs() {
                        *a = *b;
                    }
                }
            }
        }
    }
    out.scale(lambda);
    Some(out)
}

pub struct MagMax {
    pub lambda: f32,
}

impl Merge for MagMax {
    fn name(&self) -> &str {
        "magmax"
    }
    fn default_wiring(&self) -> Wiring {
        Wiring {
            anchor: Anchor::Initial,
            continue_from: ContinueFrom::Trained,
            evaluate: Evaluate::Consolidated,
        }
    }
    fn keeps_task_vectors(&self) -> bool {
        true
    }
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        magmax(ctx.task_vectors, self.lambda).ok_or_else(|| Error::msg("no task vectors to merge"))
    }
}

pub fn strategy(c: MagMaxConfig) -> Result<Scaled<MagMax>> {
    check_lambda("lambda", c.lambda)?;
    Scaled::new(MagMax { lambda: c.lambda }, c.lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consolidation::fixture::vector;

    #[test]
    fn picks_the_larger_magnitude_entry_with_its_sign() {
        let vs = [
            vector(&[[1.0, -3.0], [0.5, 2.0]]),
            vector(&[[-2.0, 1.0], [0.5, -2.0]]),
            vector(&[[0.5, 2.5], [-0.1, 1.0]]),
        ];
        // Ties (0.5 vs 0.5, 2 vs −2) go to the later task.
        assert_eq!(
            magmax(&vs, 1.0).unwrap(),
            vector(&[[-2.0, -3.0], [0.5, -2.0]])
        );
        assert_eq!(
            magmax(&vs, 0.5).unwrap(),
            vector(&[[-1.0, -1.5], [0.25, -1.0]])
        );
    }
}
