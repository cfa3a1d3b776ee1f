//! Trainer-driven tests of `lwf_mc` (sequel-algos/src/lwf_mc.rs).

use candle_core::Tensor;
use sequel_algos::icarl::BceDistillation;
use sequel_algos::lwf_mc::*;
use sequel_algos::testing::{
    mini_run, observe_run, observed, probe_run, probed, Observer, SCENARIOS,
};
use sequel_core::data::Batch;
use sequel_core::model::Model;
use sequel_core::{Algorithm, Result, StepCtx, TaskCtx};

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

/// Keeps an independent copy of the task-start model, to check every loss of task 2 against
/// the formula.
struct Check {
    start: Option<Box<dyn Model>>,
    /// Per step of task 2: (loss, formula with the task-start teacher, formula with the
    /// current model as teacher).
    seen: Vec<(f64, f64, f64)>,
}

impl Observer<LwfMc> for Check {
    fn before_task(&mut self, alg: &mut LwfMc, ctx: &mut TaskCtx) -> Result<()> {
        self.start = Some(ctx.model.fork()?);
        alg.before_task(ctx)
    }
    fn loss(&mut self, alg: &mut LwfMc, b: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let l = alg.loss(b, ctx)?;
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
}

#[test]
fn old_units_are_distilled_towards_the_task_start_model_in_every_scenario() {
    for over in SCENARIOS {
        let check = Check {
            start: None,
            seen: Vec::new(),
        };
        let over3 = [over, &["benchmark.tasks=3"]].concat();
        let (t, _) = observe_run(LwfMc::default(), check, &over3);
        let c = &observed::<LwfMc, Check>(&t).observer;
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
    // (LwF.MC's own parts, with the teacher released as soon as it is taken.)
    struct NoTeacher(BceDistillation);
    impl Algorithm for NoTeacher {
        fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
            self.0.before_task(ctx)?;
            self.0.release();
            Ok(())
        }
        fn loss(&mut self, b: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
            let f = ctx.forward(&[b])?;
            self.0.loss(&f.out.logits, b, ctx.stream)
        }
    }
    let over = ["benchmark.train_subset=100"];
    let (with, _) = mini_run(Box::new(LwfMc::default()), &over);
    let (without, _) = mini_run(Box::new(NoTeacher(BceDistillation::new(true))), &over);
    assert_ne!(with, without);
    let old = |rows: &[Vec<f64>]| rows[4][..4].iter().sum::<f64>();
    assert!(
        old(&with) > old(&without),
        "with {:?} without {:?}",
        with[4],
        without[4]
    );
}
