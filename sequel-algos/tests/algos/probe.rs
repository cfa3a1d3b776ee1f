//! The test probe itself: wrapping an algorithm in a [`Probe`] with an observer that overrides
//! nothing must leave the run unchanged, or every observed test would check another algorithm.

use sequel_algos::testing::{mini_run, observe_run, probe_run, Observer, SCENARIOS};
use sequel_algos::{bic, cls_er, der, gdumb, icarl, lucir};
use sequel_core::Algorithm;

/// Overrides no hook: the probe's forwarding alone.
struct Silent;
impl<A: Algorithm> Observer<A> for Silent {}

/// Every hook the built-in methods use between them: memory and replay (DER++), training
/// samples and evaluation-time prediction (iCaRL), re-fitting from the memory (GDumb), own
/// parameters (LUCIR, BiC), a second model and state (CLS-ER).
fn transparent<A: Algorithm>(make: impl Fn() -> A, overrides: &[&str]) {
    let plain = mini_run(Box::new(make()), overrides);
    let (t, out) = probe_run(make(), overrides);
    let probed = (
        out.matrix.rows.clone(),
        sequel_algos::testing::host_weights(t.model.as_ref()),
    );
    assert_eq!(plain.0, probed.0, "Probe: {overrides:?}");
    assert!(
        plain.1 == probed.1,
        "Probe: {overrides:?}: the weights differ"
    );
    let (t, out) = observe_run(make(), Silent, overrides);
    let observed = (
        out.matrix.rows.clone(),
        sequel_algos::testing::host_weights(t.model.as_ref()),
    );
    assert_eq!(plain.0, observed.0, "Observer: {overrides:?}");
    assert!(
        plain.1 == observed.1,
        "Observer: {overrides:?}: the weights differ"
    );
}

#[test]
fn a_probe_and_an_observer_that_overrides_nothing_change_nothing() {
    let over = [SCENARIOS[0], &["benchmark.tasks=3"]].concat();
    transparent(
        || der::Der::new(der::DerppConfig::default()).unwrap(),
        &over,
    );
    transparent(
        || icarl::Icarl::new(icarl::IcarlConfig::default()).unwrap(),
        &over,
    );
    transparent(
        || {
            gdumb::Gdumb::new(gdumb::GdumbConfig {
                fit_epochs: 2,
                ..Default::default()
            })
            .unwrap()
        },
        &over,
    );
    transparent(
        || lucir::Lucir::new(lucir::LucirConfig::default()).unwrap(),
        &over,
    );
    transparent(|| bic::Bic::new(bic::BicConfig::default()).unwrap(), &over);
    transparent(
        || cls_er::ClsEr::new(cls_er::ClsErConfig::default()).unwrap(),
        &over,
    );
}
