//! LwF.MC — Learning without Forgetting, multi-class (the baseline of Rebuffi, Kolesnikov, Sperl &
//! Lampert, "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017, §4).
//!
//! iCaRL's representation update without exemplars and with the network's own outputs as the
//! classifier. At the start of task t > 1 the model is forked into a frozen teacher `f_old`; every
//! step, with `σ` the sigmoid and `z = f_θ(x)`, each sample gets the targets
//!
//! `q_u = σ(f_old(x)_u)` for the units `u` of the previous tasks (distillation),
//! `q_u = [u = y]` for the units of the current task (classification),
//!
//! and the loss is the binary cross-entropy with logits, averaged over the covered (sample, unit)
//! cells:
//!
//! `L(θ) = (1/|C|) Σ_{(i,u) ∈ C} −[ q_iu log σ(z_iu) + (1 − q_iu) log(1 − σ(z_iu)) ]`.
//!
//! The loss is [`crate::icarl::BceDistillation`], the code iCaRL trains with; the data is the
//! task's own samples only (nothing is stored) and prediction is the argmax of the logits (no
//! nearest-mean classifier). On task 1 there is no teacher: the BCE is one-hot over task 1's units.
//!
//! **Covered units.** With a single head (class-IL, domain-IL, masked task-IL) every sample covers
//! the units seen so far (those of tasks `1..t`), like the paper's growing output layer. In
//! multi-head task-IL a sample covers its own task's head (one-hot) and every previous task's head
//! (distilled) — LwF's distillation of the old heads on the new data; iCaRL, whose old-task
//! samples are exemplars, covers only the sample's own head. In domain-IL every unit is also a
//! current one, so nothing is distilled and LwF.MC is fine-tuning with a sigmoid BCE.
//!
//! The paper has no hyperparameter for it (the distillation weight is implicitly 1 per unit);
//! neither has this implementation. The teacher is rebuilt by `before_task` from the restored
//! model, so there is no state to save.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::{Algorithm, AlgorithmConfig, Result, StepCtx, TaskCtx};

use crate::icarl::BceDistillation;

/// `lwf-mc` has no parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LwfMcConfig {}

impl AlgorithmConfig for LwfMcConfig {
    const NAME: &'static str = "lwf-mc";
    const SUMMARY: &'static str = "LwF.MC: iCaRL's sigmoid BCE with distillation from the task-start model, no exemplars (Rebuffi et al. 2017)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(LwfMc::default()))
    }
}

pub struct LwfMc {
    bce: BceDistillation,
}

impl Default for LwfMc {
    fn default() -> Self {
        Self {
            bce: BceDistillation::new(true),
        }
    }
}

impl Algorithm for LwfMc {
    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.bce.before_task(ctx)
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let f = ctx.forward(&[batch])?;
        let (loss, teacher_rows) =
            self.bce
                .loss_and_teacher_rows(&f.out.logits, batch, ctx.stream)?;
        ctx.charge(teacher_rows, 0);
        Ok(loss)
    }

    fn after_task(&mut self, _ctx: &mut TaskCtx) -> Result<()> {
        self.bce.release();
        Ok(())
    }
}
