//! Trainer-driven tests of `gem` (sequel-algos/src/gem.rs).

use candle_core::backprop::GradStore;
use sequel_algos::gem::*;
use sequel_algos::qp;
use sequel_algos::testing::{
    host_dot, host_gradient, host_loss_gradient, host_weights, mini_run, observe_run, observed,
    probe_run, probed, Observer, SCENARIOS,
};
use sequel_core::data::GatherBuf;
use sequel_core::{Algorithm, Result, StepCtx};

/// Checks every step of GEM's real hook inside the trainer against per-task gradients computed
/// here from the memory's slots of each past task.
struct Check {
    /// The observed GEM's `memory_strength` γ.
    memory_strength: f64,
    projected: usize,
    unchanged: usize,
    constraints: Vec<usize>,
}

impl Observer<Gem> for Check {
    fn edit_gradients(
        &mut self,
        gem: &mut Gem,
        grads: &mut GradStore,
        ctx: &mut StepCtx,
    ) -> Result<()> {
        let mut rows = Vec::new();
        if let Some(b) = gem.memory().and_then(|m| m.buffer()) {
            for k in 0..ctx.task {
                let slots = b.slots_of_task(k as u32);
                let batch = b.gather(&slots, ctx.stream, &mut GatherBuf::default(), ctx.device)?;
                rows.push(host_loss_gradient(ctx.model, ctx.stream, &batch));
            }
        }
        let before = host_gradient(ctx.model, grads);
        gem.edit_gradients(grads, ctx)?;
        let after = host_gradient(ctx.model, grads);
        if rows.is_empty() {
            assert_eq!(before, after);
            return Ok(());
        }
        self.constraints.push(rows.len());
        let q: Vec<f64> = rows.iter().map(|r| host_dot(r, &before)).collect();
        if q.iter().all(|&x| x >= 0.0) {
            assert_eq!(before, after);
            self.unchanged += 1;
            return Ok(());
        }
        let k = rows.len();
        let mut p = vec![0.0; k * k];
        for i in 0..k {
            for j in 0..k {
                p[i * k + j] = host_dot(&rows[i], &rows[j]) + if i == j { EPSILON } else { 0.0 };
            }
        }
        let gamma = self.memory_strength;
        let v = qp::solve_lower_bounded(&p, &q, &vec![gamma; k])?.v;
        let norm = host_dot(&after, &after).sqrt();
        for (e, a) in after.iter().enumerate() {
            let want = before[e] + (0..k).map(|r| v[r] * rows[r][e]).sum::<f64>();
            assert!((a - want).abs() < 1e-5 * norm, "weight {e}: {a} vs {want}");
        }
        for (r, row) in rows.iter().enumerate() {
            let c = host_dot(row, &after);
            let tol = 1e-5 * norm * host_dot(row, row).sqrt();
            assert!(c >= -EPSILON * v[r] - tol, "constraint {r}: {c}");
        }
        // Heads of future tasks (neither in the batch nor in the memory) get no gradient.
        for p in ctx.model.params().iter() {
            if p.head.is_some_and(|h| h > ctx.task) {
                assert!(grads.get(p.var.as_tensor()).is_none(), "{}", p.name);
            }
        }
        self.projected += 1;
        Ok(())
    }
}

#[test]
fn the_hook_solves_the_dual_over_every_past_task() {
    for overrides in [SCENARIOS[0], SCENARIOS[2]] {
        let check = Check {
            memory_strength: GemConfig::default().memory_strength,
            projected: 0,
            unchanged: 0,
            constraints: Vec::new(),
        };
        let gem = Gem::new(GemConfig::default()).unwrap();
        let (tr, _) = observe_run(gem, check, overrides);
        let p = observed::<Gem, Check>(&tr);
        let c = &p.observer;
        // One constraint per past task: 5 steps each of tasks 2..5.
        let want: Vec<usize> = (1..5).flat_map(|k| [k; 5]).collect();
        assert_eq!(c.constraints, want, "{overrides:?}");
        assert!(c.projected > 0, "{overrides:?}");
        assert_eq!(p.algo.projection_counts(), (20, c.projected));
        assert_eq!(c.projected + c.unchanged, 20);
    }
}

#[test]
fn five_tasks_in_every_scenario_and_a_trajectory_unlike_naive() {
    for overrides in SCENARIOS {
        let (_, naive) = mini_run(Box::new(sequel_algos::naive::Naive), overrides);
        let (t, outcome) = probe_run(Gem::new(GemConfig::default()).unwrap(), overrides);
        assert_eq!(outcome.matrix.rows.len(), 5);
        assert_ne!(host_weights(t.model.as_ref()), naive, "{overrides:?}");
        assert!(
            probed::<Gem>(&t).algo.projection_counts().1 > 0,
            "{overrides:?}"
        );
    }
}

#[test]
fn a_cap_below_the_quota_subsamples_and_one_at_the_quota_does_not() {
    let run = |cap: Option<usize>| {
        let gem = Gem::new(GemConfig {
            replay_batch_size: cap,
            ..GemConfig::default()
        })
        .unwrap();
        mini_run(Box::new(gem), &["benchmark.tasks=3"]).1
    };
    // 3 tasks: ⌊200 / 3⌋ = 66 slots per task, but only 50 samples per task exist.
    let all = run(None);
    assert_eq!(run(Some(50)), all);
    assert_ne!(run(Some(7)), all);
}

#[test]
fn registry_builds_gem_with_the_documented_defaults() {
    let reg = sequel_algos::Registry::builtin();
    let (a, resolved) = reg
        .build_algorithm(&serde_yaml::from_str("{ name: gem }").unwrap(), "x.yaml")
        .unwrap();
    drop(a);
    let want: serde_yaml::Value = serde_yaml::from_str(
        "{ name: gem, buffer_size: 200, memory_strength: 0.5, replay_batch_size: null, buffer_policy: task_quota, insert: task_end }",
    )
    .unwrap();
    assert_eq!(resolved, want);
    for bad in [
        "{ name: gem, memory_strength: -1 }",
        "{ name: gem, replay_batch_size: 0 }",
        "{ name: gem, margin: 0.5 }",
    ] {
        let e = reg
            .build_algorithm(&serde_yaml::from_str(bad).unwrap(), "x.yaml")
            .err()
            .unwrap();
        assert!(e.to_string().contains("algorithm"), "{bad}: {e}");
    }
}

/// GEM's episodic memory through the real trainer: how much of the budget each past task's
/// constraint sees while a task trains.
mod memory_split {
    use candle_core::backprop::GradStore;
    use sequel_algos::gem::{Gem, GemConfig};
    use sequel_algos::testing::{observe_run, observed, Observer};
    use sequel_core::buffer::{BufferPolicy, InsertAt, MemoryConfig};
    use sequel_core::{Algorithm, Result, StepCtx};

    /// For the first step of every task, the number of stored samples of each past task
    /// (the samples behind each constraint `g_k`).
    struct Watch {
        per_task: Vec<Vec<usize>>,
    }

    impl Observer<Gem> for Watch {
        fn edit_gradients(
            &mut self,
            gem: &mut Gem,
            grads: &mut GradStore,
            ctx: &mut StepCtx,
        ) -> Result<()> {
            if self.per_task.len() == ctx.task {
                let counts = match gem.memory().and_then(|m| m.buffer()) {
                    Some(b) => (0..ctx.task)
                        .map(|k| b.slots_of_task(k as u32).len())
                        .collect(),
                    None => Vec::new(),
                };
                self.per_task.push(counts);
            }
            gem.edit_gradients(grads, ctx)
        }
    }

    fn per_task(policy: BufferPolicy, overrides: &[&str]) -> Vec<Vec<usize>> {
        let gem = Gem::new(GemConfig {
            memory: MemoryConfig {
                buffer_size: 40,
                buffer_policy: policy,
                insert: InsertAt::TaskEnd,
            },
            ..GemConfig::default()
        })
        .unwrap();
        let watch = Watch {
            per_task: Vec::new(),
        };
        let (t, _) = observe_run(gem, watch, overrides);
        observed::<Gem, Watch>(&t).observer.per_task.clone()
    }

    /// With `task_balanced` the constraints see the whole budget from task 2 on, split evenly over the
    /// past tasks — in split class-IL and in permuted domain-IL, where every task has the same classes
    /// (a class-balanced memory would keep task 1 only there). With `task_quota` (T known) a fifth of
    /// the budget is never used and task 2 trains against M/T samples of task 1.
    #[test]
    fn task_balanced_memory_uses_the_whole_budget_for_every_past_task() {
        for overrides in [
            &[][..],
            &[
                "benchmark.kind=permuted",
                "benchmark.scenario=domain-il",
                "benchmark.tasks=4",
                "benchmark.classes_per_task=null",
            ][..],
        ] {
            let counts = per_task(BufferPolicy::TaskBalanced, overrides);
            assert!(counts[0].is_empty());
            for (t, c) in counts.iter().enumerate().skip(1) {
                assert_eq!(c.len(), t, "{overrides:?}");
                assert_eq!(c.iter().sum::<usize>(), 40, "task {t}: {c:?} {overrides:?}");
                let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
                assert!(hi - lo <= 1, "task {t}: {c:?} {overrides:?}");
            }
        }
        // The fixed quota of the known-T recipe: ⌊40 / 5⌋ = 8 per task, 32 of 40 slots at most.
        let quota = per_task(BufferPolicy::TaskQuota, &[]);
        for (t, c) in quota.iter().enumerate() {
            assert_eq!(c, &vec![8; t], "task {t}");
        }
    }

    #[test]
    fn the_registry_takes_task_balanced() {
        let reg = sequel_algos::Registry::builtin();
        let (_, resolved) = reg
            .build_algorithm(
                &serde_yaml::from_str("{ name: gem, buffer_policy: task_balanced }").unwrap(),
                "x.yaml",
            )
            .unwrap();
        assert_eq!(
            resolved.get("buffer_policy"),
            Some(&serde_yaml::Value::from("task_balanced"))
        );
        let e = reg
            .build_algorithm(
                &serde_yaml::from_str("{ name: gem, buffer_policy: task_balance }").unwrap(),
                "x.yaml",
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("buffer_policy"), "{e}");
    }
}
