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
    /// With `benchmark.base_classes`: the pre-training task, measured as a control task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
    /// With an automatic consolidation coefficient (`gamma: auto`): the value chosen after each
    /// task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chosen: Vec<f64>,
    /// The metrics.csv column of `chosen` (`gamma_auto`, `beta_auto`); `None` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_key: Option<String>,
    /// `training.mode: independent`: metrics.csv and summary.json add the normalised accuracy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub independent: bool,
    /// `training.realtime`: one entry per finished task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub realtime: Vec<RealTimeTask>,
}

/// Latency-aware evaluation of one task's stream (`training.realtime`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RealTimeTask {
    /// Incoming samples, and those the weights current at their arrival predicted right.
    pub samples: usize,
    pub correct: usize,
    /// Incoming batches, and those trained on.
    pub batches: usize,
    pub trained: usize,
    /// Sum over the trained steps of their relative cost `C` (counted, or the fixed value).
    pub cost_sum: f64,
    /// Sum over the trained steps of their wall-clock seconds (not deterministic).
    pub step_s: f64,
}

impl RealTimeTask {
    /// Online accuracy: the fraction of incoming samples predicted right on arrival (`None`
    /// without samples).
    pub fn online_acc(&self) -> Option<f64> {
        (self.samples > 0).then(|| self.correct as f64 / self.samples as f64)
    }

    /// Mean relative cost of a trained step.
    pub fn mean_cost(&self) -> Option<f64> {
        (self.trained > 0).then(|| self.cost_sum / self.trained as f64)
    }

    /// Mean wall-clock milliseconds of a trained step.
    pub fn mean_step_ms(&self) -> Option<f64> {
        (self.trained > 0).then(|| 1e3 * self.step_s / self.trained as f64)
    }
}

impl Results {
    /// `training.realtime`: online accuracy over every incoming sample of the first `i` tasks.
    pub fn online_acc(&self, i: usize) -> Option<f64> {
        let tasks = self.realtime.get(..i)?;
        let (c, n) = tasks
            .iter()
            .fold((0, 0), |(c, n), t| (c + t.correct, n + t.samples));
        (n > 0).then(|| c as f64 / n as f64)
    }
}

impl Results {
    /// `training.mode: independent`: accuracy on each task j ≤ i after task i (1-based) divided
    /// by the individually fine-tuned weights' accuracy on it (the raw matrix's R[j][j]); a
    /// fine-tuned accuracy of 0 gives `None`.
    pub fn normalized_after(&self, i: usize) -> Option<Vec<Option<f64>>> {
        let raw = self.raw.as_ref().filter(|_| self.independent)?;
        let row = self.matrix.rows.get(i.checked_sub(1)?)?;
        Some(
            (0..i)
                .map(|j| {
                    let alone = raw.rows.get(j)?.get(j).copied()?;
                    (alone > 0.0).then(|| row[j] / alone)
                })
                .collect(),
        )
    }

    /// The mean of [`Results::normalized_after`] over the tasks where it is defined.
    pub fn normalized_acc(&self, i: usize) -> Option<f64> {
        let v: Vec<f64> = self.normalized_after(i)?.into_iter().flatten().collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// The pre-training (control) task of `benchmark.base_classes`: its accuracy before and after
/// pre-training and after every stream task. The stream's accuracy matrices leave it out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Control {
    /// Accuracy of the untrained model.
    pub init: f64,
    /// Accuracy right after pre-training (the weights θ₀ the stream starts from).
    pub pretrained: f64,
    /// After each stream task, of the evaluated weights.
    pub after: Vec<f64>,
    /// After each stream task, of the trained weights before consolidation (with a consolidator).
    pub after_raw: Vec<f64>,
    /// Evaluation samples of the control task.
    pub count: usize,
    /// Pre-training's wall-clock seconds and optimizer steps.
    pub train_s: f64,
    pub steps: usize,
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
