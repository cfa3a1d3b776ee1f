//! `training.mode: independent`: every task fine-tunes θ₀ on its own and the consolidation
//! strategy merges the task vectors; metrics add the accuracy normalised by the individually
//! fine-tuned weights.

use std::path::Path;

use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;
use sequel_core::trainer::Silent;

fn config(out: &Path, tasks: &str, mode: &str, consolidation: &str) -> String {
    format!(
        "name: ind\nseed: 2\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, {tasks}, scenario: class-il, train_subset: 60 }}\n\
         model: {{ kind: mlp, hidden: [16, 16] }}\n\
         optimizer: {{ kind: sgd, lr: 0.05, momentum: 0.9 }}\n\
         training: {{ epochs: 2, batch_size: 10{mode} }}\n\
         algorithm: naive\n\
         {consolidation}\
         output: {{ dir: {} }}\n",
        out.display()
    )
}

fn run(text: &str) -> std::path::PathBuf {
    let p = prepare(text, "t.yaml", &[], &Registry::builtin()).unwrap();
    execute(p, &mut Silent, None).unwrap().dir
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn one_task_with_lambda_one_is_plain_fine_tuning() {
    let tmp = tempfile::tempdir().unwrap();
    let one = "tasks: 1, classes_per_task: 4";
    let plain = run(&config(tmp.path(), one, "", ""));
    let merged = run(&config(
        &tmp.path().join("m"),
        one,
        ", mode: independent",
        "consolidation: { name: task-arithmetic, lambda: 1.0, anchor: initial }\n",
    ));
    for f in ["accuracy_matrix.csv", "checkpoints/task-1.safetensors"] {
        assert!(read(&plain, f) == read(&merged, f), "{f}");
    }
}

#[test]
fn a_task_trains_from_theta_0_whatever_came_before() {
    // The same second task (classes 2, 3) after two different first tasks: its trained weights
    // (`evaluate: trained` saves them) are the same bit for bit.
    let tmp = tempfile::tempdir().unwrap();
    let cons = "consolidation: { name: ties, anchor: initial, evaluate: trained }\n";
    let dirs: Vec<_> = ["[0, 1, 2, 3]", "[4, 5, 2, 3]"]
        .iter()
        .enumerate()
        .map(|(i, classes)| {
            let tasks = format!("tasks: 2, classes: {classes}");
            run(&config(
                &tmp.path().join(i.to_string()),
                &tasks,
                ", mode: independent",
                cons,
            ))
        })
        .collect();
    let f = "checkpoints/task-2.safetensors";
    assert!(read(&dirs[0], f) == read(&dirs[1], f));
    assert!(
        read(&dirs[0], "checkpoints/task-1.safetensors")
            != read(&dirs[1], "checkpoints/task-1.safetensors")
    );
    // Sequential fine-tuning does depend on the first task.
    let seq: Vec<_> = ["[0, 1, 2, 3]", "[4, 5, 2, 3]"]
        .iter()
        .enumerate()
        .map(|(i, classes)| {
            let tasks = format!("tasks: 2, classes: {classes}");
            run(&config(&tmp.path().join(format!("s{i}")), &tasks, "", cons))
        })
        .collect();
    assert!(read(&seq[0], f) != read(&seq[1], f));
}

fn matrix(dir: &Path, name: &str) -> Vec<Vec<f64>> {
    String::from_utf8(read(dir, name))
        .unwrap()
        .lines()
        .skip(2)
        .map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect())
        .collect()
}

#[test]
fn normalized_accuracy_is_merged_over_individually_fine_tuned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run(&config(
        tmp.path(),
        "tasks: 3, classes_per_task: 2",
        ", mode: independent",
        "consolidation: { name: task-arithmetic, lambda: 0.5, anchor: initial }\n",
    ));
    let r = matrix(&dir, "accuracy_matrix.csv");
    let raw = matrix(&dir, "accuracy_matrix_raw.csv");
    let metrics = String::from_utf8(read(&dir, "metrics.csv")).unwrap();
    assert!(metrics.lines().next().unwrap().ends_with(",normalized_acc"));
    for (i, line) in metrics.lines().skip(1).enumerate() {
        let got: f64 = line.rsplit(',').next().unwrap().parse().unwrap();
        let terms: Vec<f64> = (0..=i)
            .filter(|&j| raw[j][j] > 0.0)
            .map(|j| r[i][j] / raw[j][j])
            .collect();
        let hand = terms.iter().sum::<f64>() / terms.len() as f64;
        assert!((got - hand).abs() < 1e-4, "task {}: {got} vs {hand}", i + 1);
    }
}

#[test]
fn independent_mode_needs_naive_and_a_merge_from_theta_0() {
    let tmp = tempfile::tempdir().unwrap();
    for (algo, cons) in [
        ("naive", ""),
        ("er", "consolidation: { name: ties, anchor: initial }\n"),
        ("naive", "consolidation: { name: ties }\n"),
    ] {
        let text = config(
            tmp.path(),
            "tasks: 2, classes_per_task: 2",
            ", mode: independent",
            cons,
        )
        .replace("algorithm: naive", &format!("algorithm: {algo}"));
        let e = match prepare(&text, "t.yaml", &[], &Registry::builtin()) {
            Err(e) => e.to_string(),
            Ok(p) => execute(p, &mut Silent, None).err().unwrap().to_string(),
        };
        assert!(e.starts_with("t.yaml: training.mode"), "{algo} {cons}: {e}");
        assert!(!tmp.path().join("ind").exists(), "a run folder was created");
    }
}
