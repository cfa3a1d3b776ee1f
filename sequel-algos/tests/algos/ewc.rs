//! Trainer-driven tests of `ewc` (sequel-algos/src/ewc.rs).

use sequel_algos::ewc::*;
use sequel_algos::testing::{probe_run, probed};

#[test]
fn fisher_respects_the_multi_head_mask() {
    // In multi-head task-IL a task's Fisher lives on its own head rows and the shared body.
    let (t, _) = probe_run(
        Ewc::new(EwcConfig::default()).unwrap(),
        &[
            "benchmark.scenario=task-il",
            "benchmark.task_il_head=multi",
            "benchmark.tasks=2",
            "benchmark.train_subset=20",
        ],
    );
    let ewc = &probed::<Ewc>(&t).algo;
    let f = ewc.last_fisher().unwrap();
    // Multi-head: the trainable tensors end with head.0.{weight,bias} (task 1) and
    // head.1.{weight,bias} (task 2). Task 2's Fisher lives on its own head only.
    let n = f.0.len();
    let mass = |i: usize| f.0[i].sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(mass(n - 4), 0.0, "task 1's head weight gets no Fisher");
    assert_eq!(mass(n - 3), 0.0, "task 1's head bias gets no Fisher");
    assert!(
        mass(n - 2) > 0.0 && mass(n - 1) > 0.0,
        "task 2's head has Fisher mass"
    );
    assert_eq!(f.0[n - 2].dims()[0], 2, "per-task head of 2 units");
}
