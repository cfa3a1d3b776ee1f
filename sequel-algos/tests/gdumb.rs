//! GDumb's `fit_after` through the real trainer.

use sequel_algos::gdumb::{FitAfter, Gdumb, GdumbConfig};
use sequel_algos::testing::{probe_run, probed};

fn gdumb(fit_after: FitAfter) -> Gdumb {
    Gdumb::new(GdumbConfig {
        buffer_size: 40,
        fit_epochs: 4,
        fit_after,
        ..GdumbConfig::default()
    })
    .unwrap()
}

/// `last_task` fits once: the model stays at its initial weights until the last task ends, then
/// is trained; `every_task` trains it after every task.
#[test]
fn last_task_fits_once_at_the_end_and_every_task_after_each_task() {
    let (t, out) = probe_run(gdumb(FitAfter::LastTask), &[]);
    let p = probed::<Gdumb>(&t);
    let initial = &p.weights_before[0];
    for k in 0..4 {
        assert_eq!(&p.weights_after[k], initial, "after task {}", k + 1);
    }
    assert_ne!(&p.weights_after[4], initial);
    // The final model learned the memory's ten classes: above the 10 % of chance in class-IL.
    let last = out.matrix.rows.last().unwrap();
    let mean = last.iter().sum::<f64>() / last.len() as f64;
    assert!(mean > 0.1, "{last:?}");

    let (t, _) = probe_run(gdumb(FitAfter::EveryTask), &[]);
    let p = probed::<Gdumb>(&t);
    for k in 0..5 {
        assert_ne!(
            &p.weights_after[k],
            &p.weights_before[0],
            "after task {}",
            k + 1
        );
    }
}

#[test]
fn the_registry_takes_fit_after_and_names_a_bad_value() {
    let reg = sequel_algos::Registry::builtin();
    let (_, resolved) = reg
        .build_algorithm(
            &serde_yaml::from_str("{ name: gdumb, fit_after: last_task }").unwrap(),
            "x.yaml",
        )
        .unwrap();
    assert_eq!(
        resolved.get("fit_after"),
        Some(&serde_yaml::Value::from("last_task"))
    );
    let e = reg
        .build_algorithm(
            &serde_yaml::from_str("{ name: gdumb, fit_after: end }").unwrap(),
            "x.yaml",
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fit_after") && !e.contains('\n'), "{e}");
}
