//! GEM's episodic memory through the real trainer: how much of the budget each past task's
//! constraint sees while a task trains.

use candle_core::backprop::GradStore;
use sequel_algos::gem::{Gem, GemConfig};
use sequel_algos::testing::{probe_run, probed};
use sequel_core::buffer::{BufferPolicy, InsertAt, MemoryConfig};
use sequel_core::{Algorithm, Memory, Result, StepCtx};

/// GEM plus, for the first step of every task, the number of stored samples of each past task
/// (the samples behind each constraint `g_k`).
struct Watch {
    gem: Gem,
    per_task: Vec<Vec<usize>>,
}

impl Algorithm for Watch {
    fn memory(&mut self) -> Option<&mut Memory> {
        self.gem.memory()
    }
    fn edit_gradients(&mut self, grads: &mut GradStore, ctx: &mut StepCtx) -> Result<()> {
        if self.per_task.len() == ctx.task {
            let counts = match self.gem.memory().and_then(|m| m.buffer()) {
                Some(b) => (0..ctx.task)
                    .map(|k| b.slots_of_task(k as u32).len())
                    .collect(),
                None => Vec::new(),
            };
            self.per_task.push(counts);
        }
        self.gem.edit_gradients(grads, ctx)
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
        gem,
        per_task: Vec::new(),
    };
    let (t, _) = probe_run(watch, overrides);
    probed::<Watch>(&t).algo.per_task.clone()
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
