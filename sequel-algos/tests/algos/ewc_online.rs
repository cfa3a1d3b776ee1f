//! Trainer-driven tests of `ewc_online` (sequel-algos/src/ewc_online.rs).

use sequel_algos::ewc_online::*;
use sequel_algos::testing::{probe_run, probed};

#[test]
fn running_fisher_is_decayed_before_the_new_one_is_added() {
    // γ enters only when the second Fisher is added, after the last step: the three runs
    // train identically, so F₁ and F₂ are the same in all of them and F̃ = γ·F₁ + F₂.
    let run = |gamma: f64| {
        let algo = OnlineEwc::new(OnlineEwcConfig {
            lambda: 1.0,
            gamma,
            ..Default::default()
        })
        .unwrap();
        let (t, _) = probe_run(algo, &["benchmark.tasks=2", "benchmark.train_subset=20"]);
        let f = probed::<OnlineEwc>(&t)
            .algo
            .running_fisher()
            .unwrap()
            .clone();
        (f, t)
    };
    // γ = 0 leaves F₂ alone, so F̃(0.5) − F₂ = 0.5·F₁ and F̃(1) − F₂ = F₁.
    let (f2, _) = run(0.0);
    let (mix, _) = run(0.5);
    let (sum, _) = run(1.0);
    let d_half = mix.axpby(1.0, &f2, -1.0).unwrap().sum().unwrap();
    let d_full = sum.axpby(1.0, &f2, -1.0).unwrap().sum().unwrap();
    assert!(d_full > 0.0, "F₁ must be non-zero");
    assert!(
        (d_half - 0.5 * d_full).abs() < 1e-3 * d_full,
        "{d_half} vs 0.5·{d_full}"
    );
}

#[test]
fn gamma_outside_unit_interval_is_rejected() {
    let e = OnlineEwc::new(OnlineEwcConfig {
        gamma: 1.5,
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("algorithm.gamma") && e.contains("[0, 1]"), "{e}");
}
