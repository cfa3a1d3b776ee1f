//! Naive fine-tuning: minimise the cross-entropy of the current task only,
//! `L(θ) = CE(f_θ(x), y)`, with no protection against forgetting. The lower bound every method is
//! compared to; in class-IL it collapses to roughly one task's worth of accuracy.

use sequel_core::checkpoint::StateDict;
use sequel_core::Algorithm;
use sequel_core::Result;
use serde::{Deserialize, Serialize};

/// `naive` has no parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NaiveConfig {}

#[derive(Debug, Default)]
pub struct Naive;

impl Naive {
    pub fn new(_cfg: NaiveConfig) -> Self {
        Self
    }
}

impl Algorithm for Naive {
    fn name(&self) -> &str {
        "naive"
    }

    fn save_state(&self) -> Result<Option<StateDict>> {
        Ok(Some(StateDict::new()))
    }

    fn load_state(&mut self, _state: &StateDict) -> Result<()> {
        Ok(())
    }
}
