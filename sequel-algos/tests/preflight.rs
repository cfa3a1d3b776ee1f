//! `validate` catches everything `run` rejects before training: for every registered algorithm and
//! a set of memory sizes and policies chosen around the stream's numbers of tasks and classes, the
//! checks `validate` runs ([`preflight`], through `build_trainer`) fail exactly when training the
//! same config without them fails. A new check that only a training hook makes (and so only
//! after the run folder exists) breaks this test.

use std::sync::Arc;

use candle_core::Device;
use sequel_algos::run::prepare;
use sequel_algos::Registry;
use sequel_core::data::load_dataset;
use sequel_core::experiment::{build_stream, build_trainer};
use sequel_core::model::build_model;
use sequel_core::trainer::Silent;
use sequel_core::Trainer;

/// 5 tasks of 2 classes (10 output units), tiny, so that every combination trains in moments.
const CONFIG: &str = "name: preflight\nseed: 0\n\
    benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, classes_per_task: 2, scenario: class-il, train_subset: 20 }\n\
    model: { kind: mlp, hidden: [8] }\n\
    optimizer: { kind: sgd, lr: 0.03 }\n\
    training: { epochs: 1, batch_size: 10, log_every: 0 }\n";

/// What `validate` says (the checks run before any run folder exists).
fn validate(overrides: &[String], registry: &Registry) -> Result<(), String> {
    let p = prepare(CONFIG, "p.yaml", overrides, registry).map_err(|e| e.to_string())?;
    build_trainer(&p.config, "p.yaml", p.algorithm, p.consolidator)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What training the config says when nothing is checked first: the trainer is assembled by
/// hand, without the preflight checks, and run to the end.
fn train_unchecked(overrides: &[String], registry: &Registry) -> Result<(), String> {
    let p = prepare(CONFIG, "p.yaml", overrides, registry).map_err(|e| e.to_string())?;
    let c = &p.config;
    let dataset = load_dataset(&c.benchmark.dataset, None).map_err(|e| e.to_string())?;
    let stream = build_stream(c, "p.yaml", Arc::new(dataset)).map_err(|e| e.to_string())?;
    let model = build_model(
        &c.model,
        stream.input_shape(),
        &stream.head_sizes(),
        c.seed,
        &Device::Cpu,
    )
    .map_err(|e| e.to_string())?;
    let mut t = Trainer::new(
        c.clone(),
        stream,
        model,
        p.algorithm,
        p.consolidator,
        Device::Cpu,
    );
    t.run(&mut Silent).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn validate_rejects_exactly_what_training_would_reject() {
    let registry = Registry::builtin();
    let mut rejected = 0;
    let mut checked = 0;
    for (name, _) in registry.algorithms() {
        let has_memory = registry
            .algorithm_defaults(name)
            .and_then(|d| d.get("buffer_size"))
            .is_some();
        let mut specs = vec![format!("{{name: {name}}}")];
        if has_memory {
            // Below the number of tasks (5), below the number of classes (10), and at it.
            for size in [4, 9, 10] {
                specs.push(format!("{{name: {name}, buffer_size: {size}}}"));
                for policy in ["reservoir", "task_quota", "class_balanced", "task_balanced"] {
                    specs.push(format!(
                        "{{name: {name}, buffer_size: {size}, buffer_policy: {policy}}}"
                    ));
                }
            }
        }
        for spec in specs {
            let o = vec![format!("algorithm={spec}")];
            if prepare(CONFIG, "p.yaml", &o, &registry).is_err() {
                continue; // a parameter error: caught by `validate --no-data` already
            }
            let v = validate(&o, &registry);
            let r = train_unchecked(&o, &registry);
            assert_eq!(
                v.is_err(),
                r.is_err(),
                "algorithm={spec}: validate says {v:?}, training says {r:?}"
            );
            if let Err(e) = &v {
                assert!(
                    e.starts_with("p.yaml: algorithm."),
                    "{spec}: one line naming the file and the key: {e}"
                );
                rejected += 1;
            }
            checked += 1;
        }
    }
    // The set must exercise the checks, not only configs that pass.
    assert!(rejected >= 4, "{rejected} of {checked} rejected");
}

#[test]
fn model_sizes_beyond_memory_are_refused_in_one_line_before_allocating() {
    let registry = Registry::builtin();
    for hidden in ["[100000000]", "[1000000000000]", "[10000000000000000000]"] {
        let e = validate(&[format!("model.hidden={hidden}")], &registry).unwrap_err();
        assert!(e.starts_with("p.yaml: model.hidden: "), "{e}");
        assert!(e.contains("lower model.hidden"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
    // A model that fits is untouched.
    assert!(validate(&["model.hidden=[1000]".into()], &registry).is_ok());
}
