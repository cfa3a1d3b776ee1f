//! The post-task consolidation hook: a strategy may edit the weights after each task, before
//! evaluation (LiNeS, model merging). The strategies themselves live in sequel-algos.

use crate::data::TaskStream;
use crate::error::Result;
use crate::model::{ParamSet, Snapshot};
use crate::rng::SeededRng;

/// What a consolidator sees after task `task`.
pub struct ConsolidationCtx<'a> {
    /// 0-based index of the task just trained.
    pub task: usize,
    /// The live parameters: they hold θ_t (just trained) on entry; what the consolidator leaves
    /// in them is what gets evaluated and what training continues from.
    pub params: &'a ParamSet,
    /// θ₀, the weights before the first task.
    pub initial: &'a Snapshot,
    /// θ_{t−1}, the weights training started from for this task.
    pub before_task: &'a Snapshot,
    pub stream: &'a TaskStream,
    pub rng: &'a mut SeededRng,
}

pub trait Consolidator: Send {
    fn name(&self) -> &str;
    fn after_task(&mut self, ctx: &mut ConsolidationCtx) -> Result<()>;
}
