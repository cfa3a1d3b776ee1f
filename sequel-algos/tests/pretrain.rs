//! `benchmark.base_classes`: a pre-training task trained with the plain step before the stream,
//! evaluated after every stream task as a control task, and θ₀ of a consolidator.

use std::path::Path;

use sequel_algos::run::{execute, execute_with, prepare};
use sequel_algos::Registry;
use sequel_core::experiment::{ResumeFrom, RunOptions};
use sequel_core::trainer::{Silent, Trainer};
use sequel_core::Error;

/// fmnist-mini: 4 base classes, then 3 stream tasks of 2 classes.
fn config(out: &Path, algorithm: &str, extra: &str) -> String {
    format!(
        "name: base\nseed: 3\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 3, scenario: class-il, train_subset: 60, base_classes: 4, base_epochs: 2 }}\n\
         model: {{ kind: mlp, hidden: [16] }}\n\
         optimizer: {{ kind: sgd, lr: 0.05, momentum: 0.9, reset_each_task: false }}\n\
         training: {{ epochs: 1, batch_size: 10, log_every: 1 }}\n\
         algorithm: {algorithm}\n\
         output: {{ dir: {} }}\n{extra}",
        out.display()
    )
}

fn trainer(text: &str) -> Trainer {
    prepare(text, "t.yaml", &[], &Registry::builtin())
        .unwrap()
        .trainer()
        .unwrap()
}

/// Every tensor of the model by name, on the host.
type Weights = Vec<(String, Vec<f32>)>;

fn weights(t: &Trainer) -> Weights {
    t.model
        .params()
        .iter()
        .map(|p| {
            let v = p
                .var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (p.name.clone(), v)
        })
        .collect()
}

/// The weights right after pre-training: a trainer stopped before the first stream task.
fn pretrained(text: &str) -> (Weights, Weights) {
    let mut t = trainer(text);
    let init = weights(&t);
    t.stop_after_task = Some(0);
    let out = t.run(&mut Silent).unwrap();
    assert!(matches!(out.failure, Some(Error::Stopped(_))));
    assert!(out.matrix.rows.is_empty());
    (init, weights(&t))
}

#[test]
fn the_base_task_is_a_control_task_outside_the_stream_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "naive", "");
    let p = prepare(&text, "t.yaml", &[], &Registry::builtin()).unwrap();
    let dir = execute(p, &mut Silent, None).unwrap().dir;
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    let matrix = read("accuracy_matrix.csv");
    let lines: Vec<&str> = matrix.lines().collect();
    assert_eq!(lines[0], "after_task,task_1,task_2,task_3");
    assert_eq!(lines.len(), 5, "{matrix}");
    let control = read("control.csv");
    let rows: Vec<&str> = control.lines().collect();
    assert_eq!(rows[0], "after_task,control_acc");
    let names: Vec<&str> = rows[1..]
        .iter()
        .map(|r| r.split(',').next().unwrap())
        .collect();
    assert_eq!(names, ["init", "pretrain", "1", "2", "3"]);
    let acc = |r: &str| r.split(',').nth(1).unwrap().parse::<f64>().unwrap();
    // Pre-training learns the 4 base classes; naive fine-tuning on the stream then forgets them.
    assert!(acc(rows[2]) > acc(rows[1]) + 20.0, "{control}");
    assert!(acc(rows[5]) < acc(rows[2]), "{control}");
    let metrics = read("metrics.csv");
    assert!(metrics.lines().next().unwrap().ends_with(",control_acc"));
    assert_eq!(metrics.lines().count(), 4);
    // JSON is YAML.
    let summary: serde_yaml::Value = serde_yaml::from_str(&read("summary.json")).unwrap();
    assert_eq!(summary["tasks_total"].as_u64(), Some(3));
    assert!(
        summary["control"]["pretrained"].as_f64().unwrap() > 0.3,
        "{control}"
    );
    assert_eq!(
        summary["control"]["final"].as_f64().unwrap(),
        acc(rows[5]) / 100.0
    );
    // The train log numbers the pre-training task 0 and the stream tasks from 1.
    let log = read("train_log.csv");
    assert!(log.lines().nth(1).unwrap().starts_with("0,1,1,"), "{log}");
    assert!(log.lines().any(|l| l.starts_with("3,")));
}

#[test]
fn pre_training_uses_the_plain_step_whatever_the_algorithm() {
    // GDumb trains only on its memory and iCaRL distils; neither runs during pre-training.
    let tmp = tempfile::tempdir().unwrap();
    let (init, naive) = pretrained(&config(tmp.path(), "naive", ""));
    for algo in [
        "{ name: gdumb, buffer_size: 20, fit_epochs: 1 }",
        "{ name: icarl, buffer_size: 20 }",
    ] {
        let (_, other) = pretrained(&config(tmp.path(), algo, ""));
        assert_eq!(naive, other, "{algo}");
    }
    assert_ne!(init, naive);
}

#[test]
fn consolidation_anchors_on_the_pre_trained_weights() {
    // LiNeS γ = 0 keeps the shallowest layer of θ₀: with `anchor: initial` that layer of the
    // consolidated model after task 1 is the pre-trained one, bit for bit.
    let tmp = tempfile::tempdir().unwrap();
    let cons = "consolidation: { name: lines, gamma: 0.0, anchor: initial }\n";
    // Two body layers: with one, λ(1) = α + β = 1.
    let text = config(tmp.path(), "naive", cons).replace("hidden: [16]", "hidden: [16, 16]");
    let (random, pre) = pretrained(&text);
    let mut t = trainer(&text);
    let first = t.model.params().iter().position(|p| p.depth == 1).unwrap();
    t.stop_after_task = Some(1);
    let out = t.run(&mut Silent).unwrap();
    assert_eq!(out.matrix.rows.len(), 1);
    let after = weights(&t);
    assert!(after[first] == pre[first]);
    assert!(after[first] != random[first]);
    // A deeper layer keeps its update.
    assert!(after.last() != pre.last());
    let c = out.control.as_ref().unwrap();
    assert_eq!((c.after.len(), c.after_raw.len()), (1, 1));
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
fn a_run_with_a_base_task_resumes_bit_identically() {
    for (algo, extra) in [
        ("naive", ""),
        (
            "{ name: er, buffer_size: 20 }",
            "consolidation: { name: ties, anchor: initial }\n",
        ),
        (
            "{ name: lwf }",
            "consolidation: { name: lines, gamma: 0.3 }\n",
        ),
        (
            "{ name: er, buffer_size: 20 }",
            "consolidation: { name: lines, gamma: auto }\n",
        ),
        (
            "naive",
            "consolidation: { name: ties, anchor: initial, lines: { beta: 0.5 } }\n",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let text = config(tmp.path(), algo, extra).replace(
            "base_epochs: 2",
            if extra.contains("auto") {
                "base_epochs: 2, validation_fraction: 0.2"
            } else {
                "base_epochs: 2"
            },
        );
        // The multi-task protocol from the pre-trained θ₀.
        let text = if extra.contains("lines: {") {
            text.replace("log_every: 1 }", "log_every: 1, mode: independent }")
        } else {
            text
        };
        let full = run(&text, "full", &RunOptions::default()).unwrap();
        let stop = RunOptions {
            stop_after_task: Some(2),
            ..RunOptions::default()
        };
        assert!(matches!(run(&text, "part", &stop), Err(Error::Stopped(_))));
        let opts = RunOptions {
            resume: Some(ResumeFrom {
                dir: tmp.path().join("part").join(".seed-3.partial"),
                task: None,
            }),
            ..RunOptions::default()
        };
        let resumed = run(&text, "part", &opts).unwrap();
        let mut names = vec![
            "accuracy_matrix.csv".to_string(),
            "control.csv".into(),
            "train_log.csv".into(),
        ];
        if !extra.is_empty() {
            names.push("accuracy_matrix_raw.csv".into());
        }
        names.extend((1..=3).map(|t| format!("checkpoints/task-{t}.safetensors")));
        for n in names {
            let a = std::fs::read(full.join(&n)).unwrap_or_else(|e| panic!("{n}: {e}"));
            let b = std::fs::read(resumed.join(&n)).unwrap();
            assert!(a == b, "{algo} {extra}: {n} differs after resume");
        }
        // metrics.csv has timings; its last column (γ chosen, or control accuracy) must match.
        let last = |d: &Path| {
            std::fs::read_to_string(d.join("metrics.csv"))
                .unwrap()
                .lines()
                .map(|l| l.rsplit(',').next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(last(&full), last(&resumed), "{algo} {extra}");
        assert_eq!(last(&full).len(), 4);
    }
}

#[test]
fn bad_base_classes_are_one_line_errors_before_a_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    for (bad, key) in [
        ("base_classes: 10", "benchmark.base_classes"),
        ("base_classes: 0", "benchmark.base_classes"),
        ("base_classes: 5", "benchmark.tasks"),
        ("base_epochs: 0", "benchmark.base_epochs"),
    ] {
        let text = config(tmp.path(), "naive", "").replace("base_classes: 4, base_epochs: 2", bad);
        let e = match prepare(&text, "t.yaml", &[], &Registry::builtin()) {
            Err(e) => e.to_string(),
            Ok(p) => execute(p, &mut Silent, None).err().unwrap().to_string(),
        };
        assert!(e.contains(key), "{bad}: {e}");
        assert!(e.starts_with("t.yaml"), "{bad}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(
            !tmp.path().join("base").exists(),
            "{bad}: a run folder was created"
        );
    }
    let text = config(tmp.path(), "naive", "")
        .replace("base_epochs: 2", "base_epochs: 2, task_il_head: multi")
        .replace("class-il", "domain-il");
    let e = prepare(&text, "t.yaml", &[], &Registry::builtin())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("benchmark.base_classes"), "{e}");
    let text = config(tmp.path(), "naive", "").replace(", base_classes: 4", "");
    let e = prepare(&text, "t.yaml", &[], &Registry::builtin())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("benchmark.base_epochs"), "{e}");
}

/// Every registered algorithm starts its first task after pre-training (its first task is stream
/// task 1, with the base classes already in the model) and finishes the stream.
#[test]
fn every_registered_algorithm_runs_after_a_pre_training_task() {
    let reg = Registry::builtin();
    for (name, _) in reg.algorithms() {
        let defaults = reg.algorithm_defaults(name).expect("registered");
        let mut spec = format!("{{ name: {name}");
        for (key, small) in [
            ("buffer_size", "40"),
            ("fit_epochs", "1"),
            ("replay_batch_size", "10"),
        ] {
            if defaults.get(key).is_some() {
                spec += &format!(", {key}: {small}");
            }
        }
        spec += " }";
        let tmp = tempfile::tempdir().unwrap();
        // A gentle step: the point is the task bookkeeping, not any method's stability.
        let text = config(tmp.path(), &spec, "").replace("lr: 0.05, momentum: 0.9", "lr: 0.01");
        let mut t = trainer(&text);
        let out = t.run(&mut Silent).unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert!(out.failure.is_none(), "{spec}: {:?}", out.failure);
        assert_eq!(out.matrix.rows.len(), 3, "{spec}");
        assert_eq!(out.control.as_ref().unwrap().after.len(), 3, "{spec}");
    }
}
