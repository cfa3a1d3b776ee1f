//! What a run produces: per-task times, the sampled training log, and the accuracy matrices.
//! A leaf module: the trainer fills these, checkpoints and the run directory write them.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::metrics::AccuracyMatrix;

/// Wall-clock seconds spent on one task.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskTimes {
    pub train_s: f64,
    pub eval_s: f64,
    pub steps: usize,
    /// Peak RSS of the process so far, MiB.
    pub peak_rss_mb: Option<f64>,
}

/// One sampled training step of train_log.csv.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub task: usize,
    pub epoch: usize,
    pub step: usize,
    pub loss: f32,
    pub batch_acc: f64,
    pub lr: f32,
}

/// The results so far (what a checkpoint records).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    /// The evaluated weights' matrix (the consolidated ones, unless `evaluate: trained`).
    pub matrix: AccuracyMatrix,
    /// With a consolidator: the matrix of the trained weights before consolidation.
    pub raw: Option<AccuracyMatrix>,
    pub times: Vec<TaskTimes>,
    pub init_eval_s: f64,
    pub log: Vec<LogRow>,
}

/// Everything a run produced. `failure` is set when training stopped early (e.g. a non-finite
/// loss); the rows of the tasks finished before it are kept.
pub struct RunOutcome {
    pub results: Results,
    pub failure: Option<Error>,
}

impl std::ops::Deref for RunOutcome {
    type Target = Results;
    fn deref(&self) -> &Results {
        &self.results
    }
}

impl std::ops::DerefMut for RunOutcome {
    fn deref_mut(&mut self) -> &mut Results {
        &mut self.results
    }
}
