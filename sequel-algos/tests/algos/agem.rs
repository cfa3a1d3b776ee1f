//! Trainer-driven tests of `agem` (sequel-algos/src/agem.rs).

use candle_core::backprop::GradStore;
use sequel_algos::agem::*;
use sequel_algos::testing::{
    host_dot, host_gradient, host_loss_gradient, host_weights, mini_run, observe_run, observed,
    probe_run, probed_mut, Observer, SCENARIOS,
};
use sequel_core::data::GatherBuf;
use sequel_core::{Algorithm, Result, StepCtx};

/// Checks every step of A-GEM's real hook inside the trainer against a reference gradient
/// computed here, from a copy of the memory that draws the same samples.
struct Check {
    /// The observed A-GEM's `replay_batch_size`.
    replay_batch_size: usize,
    projected: usize,
    unchanged: usize,
}

impl Observer<Agem> for Check {
    fn edit_gradients(
        &mut self,
        agem: &mut Agem,
        grads: &mut GradStore,
        ctx: &mut StepCtx,
    ) -> Result<()> {
        let k = self.replay_batch_size;
        let reference = match agem.memory().and_then(|m| m.buffer()) {
            Some(b) if !b.is_empty() => {
                let mut copy = b.clone();
                let mut slots = Vec::new();
                copy.draw(k, &mut slots);
                let batch =
                    copy.gather(&slots, ctx.stream, &mut GatherBuf::default(), ctx.device)?;
                Some(host_loss_gradient(ctx.model, ctx.stream, &batch))
            }
            _ => None,
        };
        let before = host_gradient(ctx.model, grads);
        agem.edit_gradients(grads, ctx)?;
        let after = host_gradient(ctx.model, grads);
        let Some(r) = reference else {
            assert_eq!(before, after);
            return Ok(());
        };
        let d = host_dot(&before, &r);
        if d >= 0.0 {
            assert_eq!(before, after, "task {} step {}", ctx.task, ctx.step);
            self.unchanged += 1;
        } else {
            let c = d / host_dot(&r, &r);
            let norm = host_dot(&before, &before).sqrt();
            for (i, ((a, g), r)) in after.iter().zip(&before).zip(&r).enumerate() {
                let want = g - c * r;
                assert!((a - want).abs() < 1e-5 * norm, "weight {i}: {a} vs {want}");
            }
            let scale = norm * host_dot(&r, &r).sqrt();
            assert!(host_dot(&after, &r) >= -1e-6 * scale.max(1.0));
            self.projected += 1;
        }
        // Heads of tasks neither in the batch nor in the memory stay without a gradient.
        for p in ctx.model.params().iter() {
            if p.head.is_some_and(|h| h > ctx.task) {
                assert!(grads.get(p.var.as_tensor()).is_none(), "{}", p.name);
            }
        }
        Ok(())
    }
}

#[test]
fn the_hook_projects_exactly_when_the_memory_gradient_conflicts() {
    for overrides in [SCENARIOS[0], SCENARIOS[2]] {
        let agem = Agem::new(AgemConfig {
            replay_batch_size: 30,
            ..AgemConfig::default()
        })
        .unwrap();
        let check = Check {
            replay_batch_size: 30,
            projected: 0,
            unchanged: 0,
        };
        let (tr, _) = observe_run(agem, check, overrides);
        let p = observed::<Agem, Check>(&tr);
        let c = &p.observer;
        // 4 tasks × 5 steps have a memory; both branches are exercised.
        assert_eq!(c.projected + c.unchanged, 20, "{overrides:?}");
        assert!(
            c.projected > 0 && c.unchanged > 0,
            "{overrides:?}: {}",
            c.projected
        );
        assert_eq!(p.algo.projection_counts(), (20, c.projected));
    }
}

#[test]
fn five_tasks_in_every_scenario_and_a_trajectory_unlike_naive() {
    for overrides in SCENARIOS {
        let (_, naive) = mini_run(Box::new(sequel_algos::naive::Naive), overrides);
        let (mut t, outcome) = probe_run(Agem::new(AgemConfig::default()).unwrap(), overrides);
        assert_eq!(outcome.matrix.rows.len(), 5);
        assert_ne!(host_weights(t.model.as_ref()), naive, "{overrides:?}");
        let a = &mut probed_mut::<Agem>(&mut t).algo;
        assert!(a.projection_counts().1 > 0, "{overrides:?}");
        // Task quota at task end: 200 / 5 = 40 slots for each finished task.
        let b = a.memory().unwrap().buffer().unwrap();
        assert_eq!(b.len(), 200);
        for k in 0..5 {
            assert_eq!(b.slots_of_task(k).len(), 40);
        }
    }
}

#[test]
fn registry_builds_agem_with_the_documented_defaults() {
    let reg = sequel_algos::Registry::builtin();
    let (a, resolved) = reg
        .build_algorithm(&serde_yaml::from_str("{ name: agem }").unwrap(), "x.yaml")
        .unwrap();
    drop(a);
    let want: serde_yaml::Value = serde_yaml::from_str(
        "{ name: agem, buffer_size: 200, replay_batch_size: 256, buffer_policy: task_quota, insert: task_end }",
    )
    .unwrap();
    assert_eq!(resolved, want);
    for bad in [
        "{ name: agem, replay_batch_size: 0 }",
        "{ name: agem, ref_batch: 3 }",
    ] {
        let e = reg
            .build_algorithm(&serde_yaml::from_str(bad).unwrap(), "x.yaml")
            .err()
            .unwrap();
        assert!(e.to_string().contains("algorithm"), "{e}");
    }
}
