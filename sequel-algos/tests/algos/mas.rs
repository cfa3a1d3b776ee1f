//! Trainer-driven tests of `mas` (sequel-algos/src/mas.rs).

use sequel_algos::mas::*;

#[test]
fn running_combination_and_anchor_move_only_at_task_end() {
    use sequel_algos::testing::{probe_run, probed};
    let mas = |alpha| {
        let cfg = MasConfig {
            alpha,
            ..Default::default()
        };
        probe_run(Mas::new(cfg).unwrap(), &["benchmark.tasks=2"]).0
    };
    // α = 1 keeps Ω at 0 forever (Ω₀ = 0); α = 0 keeps only the newest task's importance.
    let t = mas(1.0);
    let m = &probed::<Mas>(&t).algo;
    assert_eq!(m.importance().unwrap().sum().unwrap(), 0.0);
    let t = mas(0.0);
    let mas = &probed::<Mas>(&t).algo;
    assert!(mas.importance().unwrap().sum().unwrap() > 0.0);
    // The anchor is the final weights: the penalty is 0 there.
    assert_eq!(mas.penalty(t.model.as_ref()).unwrap(), Some(0.0));
}
