//! Joint training, cumulative variant (upper bound): at task t train on the union of the training
//! sets of tasks 1..t, continuing from the current weights; `training.epochs` counts passes over
//! that union per task. After the last task the model has seen all data jointly, which is the
//! usual "joint" reference (Avalanche `Cumulative`, SequeL `Joint`).

use sequel_core::algorithm::task_samples;
use sequel_core::data::SampleRef;
use sequel_core::{Algorithm, AlgorithmConfig, Result, TaskCtx};
use serde::{Deserialize, Serialize};

/// `joint` has no parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JointConfig {}

impl AlgorithmConfig for JointConfig {
    const NAME: &'static str = "joint";
    const SUMMARY: &'static str = "cumulative training on all tasks seen so far (upper bound)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Joint))
    }
}

#[derive(Debug, Default)]
pub struct Joint;

impl Algorithm for Joint {
    fn trains_on_the_stream(&self) -> bool {
        false
    }

    fn training_samples(&mut self, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        Ok((0..=ctx.task)
            .flat_map(|t| task_samples(ctx.stream, t))
            .collect())
    }
}
