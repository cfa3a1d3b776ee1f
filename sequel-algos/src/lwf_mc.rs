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
        self.bce.loss(&f.out.logits, batch, ctx.stream)
    }

    fn after_task(&mut self, _ctx: &mut TaskCtx) -> Result<()> {
        self.bce.release();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mini_run, probe_run, probed, SCENARIOS};
    use sequel_core::model::Model;

    fn sig(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    /// The BCE of rows `z` over units `0..4` of task 2 (0-based 1): targets `σ(zo)` on the old
    /// units 0–1, one-hot on the current units 2–3.
    fn host_bce(z: &[Vec<f32>], zo: &[Vec<f32>], units: &[u32]) -> f64 {
        let mut total = 0.0;
        for (i, (z, zo)) in z.iter().zip(zo).enumerate() {
            for u in 0..4 {
                let q = if u < 2 {
                    sig(zo[u] as f64)
                } else {
                    f64::from(units[i] as usize == u)
                };
                let p = sig(z[u] as f64);
                total -= q * p.ln() + (1.0 - q) * (1.0 - p).ln();
            }
        }
        total / (4 * z.len()) as f64
    }

    /// LwF.MC plus an independent copy of the task-start model, to check every loss of task 2
    /// against the formula.
    struct Check {
        alg: LwfMc,
        start: Option<Box<dyn Model>>,
        /// Per step of task 2: (loss, formula with the task-start teacher, formula with the
        /// current model as teacher).
        seen: Vec<(f64, f64, f64)>,
    }

    impl Algorithm for Check {
        fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
            self.start = Some(ctx.model.fork()?);
            self.alg.before_task(ctx)
        }
        fn loss(&mut self, b: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
            let l = self.alg.loss(b, ctx)?;
            if ctx.task == 1 {
                let z: Vec<Vec<f32>> = ctx.incoming_output().unwrap().logits.to_vec2()?;
                let start = self.start.as_ref().unwrap();
                let zo: Vec<Vec<f32>> = start.forward(&b.x, false)?.logits.to_vec2()?;
                let now: Vec<Vec<f32>> = ctx.model.forward(&b.x, false)?.logits.to_vec2()?;
                self.seen.push((
                    l.to_scalar::<f32>()? as f64,
                    host_bce(&z, &zo, &b.units),
                    host_bce(&z, &now, &b.units),
                ));
            }
            Ok(l)
        }
        fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
            self.alg.after_task(ctx)
        }
    }

    #[test]
    fn old_units_are_distilled_towards_the_task_start_model_in_every_scenario() {
        for over in SCENARIOS {
            let check = Check {
                alg: LwfMc::default(),
                start: None,
                seen: Vec::new(),
            };
            let (t, _) = probe_run(check, &[over, &["benchmark.tasks=3"]].concat());
            let c = &probed::<Check>(&t).algo;
            assert_eq!(c.seen.len(), 5, "{over:?}");
            for (step, &(loss, want, current)) in c.seen.iter().enumerate() {
                assert!(
                    (loss - want).abs() < 1e-5,
                    "{over:?} {step}: {loss} vs {want}"
                );
                // After the first step the student has moved: distilling the current model
                // instead of the task-start one would give another loss.
                if step > 0 {
                    assert!((loss - current).abs() > 1e-5, "{over:?} {step}: {loss}");
                }
            }
        }
    }

    #[test]
    fn stores_nothing_and_trains_on_the_task_alone() {
        let (t, _) = probe_run(LwfMc::default(), &[]);
        let p = probed::<LwfMc>(&t);
        assert_eq!(p.steps.len(), 25);
        for s in &p.steps {
            assert_eq!(s.parts.len(), 1);
            assert_eq!(s.parts[0].len(), 10);
            assert!(s.parts[0].iter().all(|r| r.task as usize == s.task));
        }
        let mut alg = LwfMc::default();
        assert!(alg.memory().is_none());
    }

    #[test]
    fn distillation_changes_the_trajectory_and_keeps_more_of_the_old_tasks() {
        // Without a teacher the same loss is one-hot BCE over the seen units: the old units are
        // pushed to 0 by the new data.
        struct NoTeacher(LwfMc);
        impl Algorithm for NoTeacher {
            fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
                self.0.before_task(ctx)?;
                self.0.bce.release();
                Ok(())
            }
            fn loss(&mut self, b: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
                self.0.loss(b, ctx)
            }
        }
        let over = ["benchmark.train_subset=100"];
        let (with, _) = mini_run(Box::new(LwfMc::default()), &over);
        let (without, _) = mini_run(Box::new(NoTeacher(LwfMc::default())), &over);
        assert_ne!(with, without);
        let old = |rows: &[Vec<f64>]| rows[4][..4].iter().sum::<f64>();
        assert!(
            old(&with) > old(&without),
            "with {:?} without {:?}",
            with[4],
            without[4]
        );
    }
}
