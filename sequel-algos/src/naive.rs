//! Naive fine-tuning: minimise the cross-entropy of the current task only,
//! `L(θ) = CE(f_θ(x), y)`, with no protection against forgetting. The lower bound every method is
//! compared to; in class-IL it collapses to roughly one task's worth of accuracy.

use sequel_core::{Algorithm, AlgorithmConfig, Result};
use serde::{Deserialize, Serialize};

/// `naive` has no parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NaiveConfig {}

impl AlgorithmConfig for NaiveConfig {
    const NAME: &'static str = "naive";
    const SUMMARY: &'static str = "fine-tuning on the current task only (lower bound)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Naive))
    }
}

/// Every hook at its default: the trainer's plain step.
#[derive(Debug, Default)]
pub struct Naive;

impl Algorithm for Naive {}
