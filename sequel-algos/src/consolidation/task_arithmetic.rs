//! Task Arithmetic (Ilharco et al., "Editing models with task arithmetic", ICLR 2023):
//!
//! ```text
//! θ̄_t = anchor + λ·Σ_{s} τ_s
//! ```
//!
//! With `anchor: initial` the sum runs over every task so far (τ_s = θ̂_s − θ₀); with
//! `anchor: previous` over the current task's update only, which makes it the interpolation
//! θ̄_{t−1} + λ·(θ̂_t − θ̄_{t−1}) (CoMA with weight λ on the new model). λ = 0.3 by default
//! (FusionBench's task arithmetic and its continual variant; the paper tunes λ on validation data
//! over 0.1..1.0).

use sequel_core::consolidation::{ConsolidationCtx, TaskVector};
use sequel_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{check_lambda, LinesConfig, Merge, Scaled};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskArithmeticConfig {
    /// Scaling of the summed task vectors. Default 0.3.
    #[serde(default = "default_lambda")]
    pub lambda: f32,
    /// LiNeS applied to λ·Σ τ (absent by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<LinesConfig>,
}

fn default_lambda() -> f32 {
    0.3
}

/// λ·Σ τ.
pub fn task_arithmetic(vectors: &[TaskVector], lambda: f32) -> Option<TaskVector> {
    let mut s = TaskVector::sum(vectors)?;
    s.scale(lambda);
    Some(s)
}

pub struct TaskArithmetic {
    pub lambda: f32,
}

impl Merge for TaskArithmetic {
    fn name(&self) -> &str {
        "task-arithmetic"
    }
    fn keeps_task_vectors(&self) -> bool {
        true
    }
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        task_arithmetic(ctx.task_vectors, self.lambda)
            .ok_or_else(|| Error::msg("no task vectors to merge"))
    }
}

pub fn strategy(c: TaskArithmeticConfig) -> Result<Scaled<TaskArithmetic>> {
    check_lambda("lambda", c.lambda)?;
    Scaled::new(TaskArithmetic { lambda: c.lambda }, c.lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consolidation::fixture::*;
    use sequel_core::consolidation::Wiring;

    #[test]
    fn one_task_with_lambda_one_returns_the_trained_model() {
        let theta0 = snap(&[[0.1, -0.3], [0.7, 0.2], [0.0, 0.9]]);
        let trained = snap(&[[1.3, 0.4], [-0.6, 2.2], [0.8, 0.1]]);
        let c = TaskArithmeticConfig {
            lambda: 1.0,
            lines: None,
        };
        for wiring in [Wiring::default(), initial_wiring()] {
            let out = run(
                &mut strategy(c.clone()).unwrap(),
                wiring,
                &theta0,
                std::slice::from_ref(&trained),
            );
            assert_eq!(values(&out[0]), values(&trained), "{wiring:?}");
        }
    }

    #[test]
    fn sums_every_task_vector_from_the_initial_weights() {
        let theta0 = snap(&[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]);
        let models = [
            snap(&[[1.0, 0.0], [2.0, 1.0], [0.0, 2.0]]),
            snap(&[[0.0, 1.0], [1.0, 3.0], [2.0, 0.0]]),
        ];
        let c = TaskArithmeticConfig {
            lambda: 0.5,
            lines: None,
        };
        let out = run(
            &mut strategy(c).unwrap(),
            initial_wiring(),
            &theta0,
            &models,
        );
        assert_eq!(values(&out[1]), vec![[0.5, 0.5], [1.5, 2.0], [1.0, 1.0]]);
    }
}
