//! The example algorithm plugs into the trainer: λ = 0 reproduces naive bit for bit, λ > 0 changes
//! the trajectory, and an unknown parameter is rejected.

#[test]
fn l2_anchor_is_naive_at_zero_and_differs_above_zero() {
    let naive = my_algorithm::run_example("{ name: naive }").unwrap();
    let zero = my_algorithm::run_example("{ name: l2-anchor, lambda: 0.0 }").unwrap();
    let some = my_algorithm::run_example("{ name: l2-anchor, lambda: 0.01 }").unwrap();
    assert_eq!(zero.rows, naive.rows);
    assert_ne!(some.rows, naive.rows);
    let e = my_algorithm::run_example("{ name: l2-anchor, lamda: 1 }")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `lambda`"), "{e}");
}

/// `sequel_algos::testing` (feature `testing`) runs an algorithm on small fmnist-mini tasks under a
/// probe that records each step and the weights around each task: the penalty must keep task 2's
/// final weights closer to where task 2 started, the more so the larger λ.
#[test]
fn the_anchor_holds_the_weights_near_the_task_start() {
    use my_algorithm::L2Anchor;
    use sequel_algos::testing::{probe_run, probed};

    let drift = |lambda: f64| {
        let algo = L2Anchor {
            lambda,
            anchor: None,
        };
        let (t, _) = probe_run(algo, &["benchmark.tasks=2"]);
        let p = probed::<L2Anchor>(&t);
        assert_eq!(p.steps.len(), 10, "2 tasks × 50 samples at batch 10");
        let (start, end) = (&p.weights_before[1], &p.weights_after[1]);
        start
            .iter()
            .flatten()
            .zip(end.iter().flatten())
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
    };
    let (free, held, firm) = (drift(0.0), drift(1.0), drift(10.0));
    assert!(free > held && held > firm, "{free} {held} {firm}");
}
