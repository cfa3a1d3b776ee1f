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
