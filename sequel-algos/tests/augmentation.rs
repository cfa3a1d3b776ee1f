//! Training-time data augmentation through the trainer: incoming and replayed samples are
//! augmented, evaluation never is, and a run stopped after task 2 and resumed equals the
//! uninterrupted run byte for byte (the augmentation stream's position is checkpointed).

use std::path::Path;

use candle_core::Device;
use sequel_algos::run::{execute_with, prepare};
use sequel_algos::Registry;
use sequel_core::data::{Batch, GatherBuf, Split};
use sequel_core::experiment::{ResumeFrom, RunOptions};
use sequel_core::trainer::Silent;
use sequel_core::Error;

const CROP_FLIP: [&str; 2] = [
    "augmentation.random_crop.padding=4",
    "augmentation.horizontal_flip=0.5",
];

fn pixels(b: &Batch) -> Vec<f32> {
    b.x.flatten_all().unwrap().to_vec1().unwrap()
}

/// A trainer for ER (memory of 40) on 5 small fmnist-mini tasks, with `overrides`.
fn er_trainer(overrides: &[&str]) -> sequel_core::trainer::Trainer {
    let text = "name: unit\nseed: 0\n\
        benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, classes_per_task: 2, scenario: class-il, train_subset: 50 }\n\
        model: { kind: mlp, hidden: [32] }\n\
        optimizer: { kind: sgd, lr: 0.03 }\n\
        training: { epochs: 1, batch_size: 10, log_every: 0 }\n\
        algorithm: { name: er, buffer_size: 40 }\n";
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    prepare(text, "unit.yaml", &o, &Registry::builtin())
        .unwrap()
        .trainer()
        .unwrap()
}

#[test]
fn replayed_samples_are_augmented_at_each_draw_and_evaluation_never() {
    for on in [false, true] {
        let overrides: &[&str] = if on { &CROP_FLIP } else { &[] };
        let mut t = er_trainer(overrides);
        let outcome = t.run(&mut Silent).unwrap();
        assert!(outcome.failure.is_none());
        assert_eq!(t.stream.augment_state().is_some(), on);
        // Evaluation: the same numbers twice, and no augmentation draw.
        let before = t.stream.augment_state();
        let (a, b) = (t.evaluate_all().unwrap(), t.evaluate_all().unwrap());
        assert_eq!(a, b);
        assert_eq!(
            t.stream.augment_state(),
            before,
            "evaluation drew augmentation"
        );
        // A memory draw against the stored (non-augmented) samples it names.
        let stream = t.stream.clone();
        let memory = t.algorithm.memory().expect("ER has a memory");
        let drawn = memory.draw(20, &stream, &Device::Cpu).unwrap();
        assert_eq!(drawn.batch.len(), 20);
        let stored = stream
            .gather(
                &drawn.batch.refs,
                Split::Train,
                &mut GatherBuf::default(),
                &Device::Cpu,
            )
            .unwrap();
        let (x, raw) = (pixels(&drawn.batch), pixels(&stored));
        if on {
            assert_ne!(x, raw, "replayed samples were not augmented");
            assert_ne!(
                stream.augment_state(),
                before,
                "the draw used no augmentation"
            );
            // Drawing the same slots again augments afresh.
            let again = memory.batch_of(drawn.slots.clone(), &stream, &Device::Cpu);
            assert_ne!(pixels(&again.unwrap().batch), x);
        } else {
            assert_eq!(x, raw);
        }
    }
}

#[test]
fn augmentation_changes_training_and_nothing_else_shifts_without_it() {
    let run = |o: &[&str]| {
        let mut t = er_trainer(o);
        let out = t.run(&mut Silent).unwrap();
        out.matrix.rows.clone()
    };
    let plain = run(&[]);
    assert_eq!(plain, run(&[]));
    // Normalisation alone draws nothing but changes the inputs.
    assert_ne!(
        plain,
        run(&["augmentation.normalize={mean: [0.3], std: [0.3]}"])
    );
    let aug = run(&CROP_FLIP);
    assert_ne!(plain, aug);
    assert_eq!(aug, run(&CROP_FLIP), "augmentation is seeded");
    let other_seed: Vec<&str> = CROP_FLIP.iter().copied().chain(["seed=1"]).collect();
    assert_ne!(aug, run(&other_seed));
}

fn config(out: &Path, algorithm: &str) -> String {
    format!(
        "name: aug\nseed: 3\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 4, classes_per_task: 2, scenario: class-il, train_subset: 40 }}\n\
         model: {{ kind: mlp, hidden: [16] }}\n\
         optimizer: {{ kind: sgd, lr: 0.05, momentum: 0.9, reset_each_task: false }}\n\
         training: {{ epochs: 2, batch_size: 10, log_every: 1 }}\n\
         augmentation: {{ random_crop: {{ padding: 4 }}, horizontal_flip: 0.5, normalize: {{ mean: [0.29], std: [0.35] }} }}\n\
         algorithm: {algorithm}\n\
         output: {{ dir: {} }}\n",
        out.display()
    )
}

fn run(text: &str, name: &str, opts: &RunOptions) -> sequel_core::Result<std::path::PathBuf> {
    let p = prepare(
        text,
        "test.yaml",
        &[format!("name={name}")],
        &Registry::builtin(),
    )?;
    Ok(execute_with(p, &mut Silent, None, opts)?.dir)
}

#[test]
fn a_resumed_augmented_run_equals_the_uninterrupted_one() {
    for algorithm in [
        "naive",
        "{ name: er, buffer_size: 30 }",
        "{ name: derpp, buffer_size: 30 }",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let text = config(tmp.path(), algorithm);
        let full = run(&text, "full", &RunOptions::default()).unwrap();
        let stop = RunOptions {
            stop_after_task: Some(2),
            ..RunOptions::default()
        };
        assert!(matches!(run(&text, "part", &stop), Err(Error::Stopped(_))));
        let resume = RunOptions {
            resume: Some(ResumeFrom {
                dir: tmp.path().join("part/.seed-3.partial"),
                task: None,
            }),
            ..RunOptions::default()
        };
        let resumed = run(&text, "part", &resume).unwrap();
        let mut files = vec!["accuracy_matrix.csv".to_string(), "train_log.csv".into()];
        files.extend((1..=4).map(|t| format!("checkpoints/task-{t}.safetensors")));
        for f in files {
            let (a, b) = (
                std::fs::read(full.join(&f)).unwrap(),
                std::fs::read(resumed.join(&f)).unwrap(),
            );
            assert!(a == b, "{algorithm}: {f} differs after resume");
        }
        let meta = std::fs::read_to_string(resumed.join("config.yaml")).unwrap();
        assert!(meta.contains("random_crop"), "{meta}");
        let summary = std::fs::read_to_string(resumed.join("summary.json")).unwrap();
        // JSON is YAML; the value keeps its short spelling.
        let v: serde_yaml::Value = serde_yaml::from_str(&summary).unwrap();
        let mean = &v["protocol"]["augmentation"]["normalize"]["mean"][0];
        assert_eq!(mean.as_f64(), Some(0.29), "{summary}");
        assert!(summary.contains("0.29"), "{summary}");
    }
}
