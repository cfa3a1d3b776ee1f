//! Checkpoint and resume: a run stopped after task 2 and resumed must write exactly the files an
//! uninterrupted run writes, for every algorithm, with a consolidator, and with state that only a
//! full checkpoint carries (Adam moments kept across tasks, dropout masks).

use std::path::Path;

use sequel_algos::run::{execute_with, prepare};
use sequel_algos::Registry;
use sequel_core::experiment::{ResumeFrom, RunOptions};
use sequel_core::trainer::Silent;
use sequel_core::Error;

fn config(out: &Path, algorithm: &str, extra: &str) -> String {
    format!(
        "name: resume\nseed: 3\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 4, classes_per_task: 2, scenario: class-il, train_subset: 40 }}\n\
         model: {{ kind: mlp, hidden: [16] }}\n\
         optimizer: {{ kind: sgd, lr: 0.05, momentum: 0.9, reset_each_task: false }}\n\
         training: {{ epochs: 1, batch_size: 10, log_every: 1 }}\n\
         algorithm: {algorithm}\n\
         output: {{ dir: {} }}\n{extra}",
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

fn stopped_after(text: &str, name: &str, task: usize) -> String {
    let stop = RunOptions {
        stop_after_task: Some(task),
        ..RunOptions::default()
    };
    match run(text, name, &stop) {
        Err(Error::Stopped(m)) => m,
        other => panic!("expected a stop, got {:?}", other.map(|_| ())),
    }
}

fn resume(
    out: &Path,
    name: &str,
    text: &str,
    task: Option<usize>,
) -> sequel_core::Result<std::path::PathBuf> {
    let opts = RunOptions {
        resume: Some(ResumeFrom {
            dir: out.join(name).join(".seed-3.partial"),
            task,
        }),
        ..RunOptions::default()
    };
    run(text, name, &opts)
}

/// The files that must match byte for byte (timings differ, so metrics.csv and summary.json are
/// compared on their accuracy columns only through the matrix).
fn results(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec!["accuracy_matrix.csv".to_string(), "config.yaml".to_string()];
    if dir.join("accuracy_matrix_raw.csv").exists() {
        names.push("accuracy_matrix_raw.csv".into());
    }
    names.extend((1..=4).map(|t| format!("checkpoints/task-{t}.safetensors")));
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap_or_else(|e| panic!("{n}: {e}"));
            (n, bytes)
        })
        .collect()
}

/// The train log without its timing-free columns changing: loss, accuracy and lr per step.
fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("train_log.csv")).unwrap()
}

fn check_resume_is_identical(algorithm: &str, extra: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), algorithm, extra);
    let full = run(&text, "full", &RunOptions::default()).unwrap();
    let msg = stopped_after(&text, "part", 2);
    assert!(msg.contains("--resume"), "{msg}");
    let resumed = resume(tmp.path(), "part", &text, None).unwrap();
    assert_eq!(resumed, tmp.path().join("part/seed-3"));
    let (a, b) = (results(&full), results(&resumed));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        if name == "config.yaml" {
            continue; // differs in `name` only
        }
        assert!(x == y, "{algorithm} {extra}: {name} differs after resume");
    }
    assert_eq!(log(&full), log(&resumed), "{algorithm}: train_log.csv");
}

/// `{ name: NAME, ... }` for every registered algorithm, at its defaults except that memories and
/// re-fits are small enough for a unit test (a 40-sample memory overflows on these 4 tasks).
pub fn every_registered_algorithm(reg: &Registry) -> Vec<String> {
    reg.algorithms()
        .into_iter()
        .map(|(name, _)| {
            let defaults = reg.algorithm_defaults(name).expect("registered");
            let mut spec = format!("{{ name: {name}");
            for (key, small) in [
                ("buffer_size", "40"),
                ("fit_epochs", "2"),
                ("replay_batch_size", "10"),
            ] {
                if defaults.get(key).is_some() {
                    spec += &format!(", {key}: {small}");
                }
            }
            spec + " }"
        })
        .collect()
}

#[test]
fn every_registered_algorithm_resumes_bit_identically() {
    let all = every_registered_algorithm(&Registry::builtin());
    assert!(all.len() >= 15, "{all:?}");
    for algo in all {
        check_resume_is_identical(&algo, "");
    }
}

#[test]
fn optimizer_moments_dropout_and_consolidation_survive_a_resume() {
    // Every consolidation strategy: θ₀, θ̄ₜ, the kept task vectors and DARE's seeded drops.
    for c in [
        "{ name: lines, gamma: 0.5 }",
        "{ name: average }",
        "{ name: ema }",
        "{ name: task-arithmetic }",
        "{ name: ties, k: 0.5, lambda: 0.8 }",
        "{ name: ties, anchor: initial }",
        "{ name: dare }",
        "{ name: magmax }",
    ] {
        check_resume_is_identical(
            "{ name: er, buffer_size: 30 }",
            &format!("consolidation: {c}\n"),
        );
    }
    // Adam kept across tasks and dropout masks.
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "{ name: der, buffer_size: 30 }", "")
        .replace(
            "{ kind: sgd, lr: 0.05, momentum: 0.9, reset_each_task: false }",
            "{ kind: adam, lr: 0.003, reset_each_task: false }",
        )
        .replace("hidden: [16] }", "hidden: [16], dropout: 0.3 }");
    let full = run(&text, "full", &RunOptions::default()).unwrap();
    stopped_after(&text, "part", 1);
    let resumed = resume(tmp.path(), "part", &text, None).unwrap();
    assert_eq!(
        std::fs::read(full.join("accuracy_matrix.csv")).unwrap(),
        std::fs::read(resumed.join("accuracy_matrix.csv")).unwrap()
    );
    assert_eq!(log(&full), log(&resumed));
}

/// Lookahead's slow weights and its step count live in the optimizer state: kept across tasks
/// (`reset_each_task: false`) with k = 3 not dividing the 4 steps of a task, a sync falls
/// mid-task after the resume, so a lost φ or count would change every later file. With
/// `evaluate_with: slow` the fast weights are put back after evaluation, before the checkpoint.
#[test]
fn lookahead_slow_weights_survive_a_resume() {
    for (optimizer, algorithm, evaluate, mode) in [
        (
            "kind: sgd, lr: 0.05, momentum: 0.9",
            "naive",
            "fast",
            "lookahead",
        ),
        (
            "kind: adam, lr: 0.003",
            "{ name: er, buffer_size: 30 }",
            "slow",
            "lookahead",
        ),
        ("kind: sgd, lr: 0.05", "naive", "slow", "ema"),
        (
            "kind: sgd, lr: 0.05, momentum: 0.9",
            "{ name: er, buffer_size: 30 }",
            "slow",
            "ema-reset",
        ),
    ] {
        for reset in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let text = config(tmp.path(), algorithm, "").replace(
                "{ kind: sgd, lr: 0.05, momentum: 0.9, reset_each_task: false }",
                &format!(
                    "{{ {optimizer}, reset_each_task: {reset}, \
                     lookahead: {{ mode: {mode}, k: 3, alpha: 0.5, evaluate_with: {evaluate} }} }}"
                ),
            );
            assert!(text.contains("lookahead"));
            let full = run(&text, "full", &RunOptions::default()).unwrap();
            stopped_after(&text, "part", 2);
            let resumed = resume(tmp.path(), "part", &text, None).unwrap();
            for ((name, x), (_, y)) in results(&full).iter().zip(&results(&resumed)) {
                if name != "config.yaml" {
                    assert!(
                        x == y,
                        "{optimizer} reset {reset}: {name} differs after resume"
                    );
                }
            }
            assert_eq!(log(&full), log(&resumed), "{optimizer} reset {reset}");
        }
    }
}

/// The backbones' extension parameters (the MLP's learned softplus β and PaLoRA adapters, also
/// with the backbone frozen after task 1; the MLP's and the ResNet-18's DWA weights) are model
/// tensors: a run stopped after task 2 and resumed writes the same files as an uninterrupted one.
#[test]
fn model_extension_parameters_survive_a_resume() {
    for model in [
        "{ kind: mlp, hidden: [16, 16, 16], activation: centered-softplus, learn_beta: true }",
        "{ kind: mlp, hidden: [16, 16, 16], dwa: { dilation: 1, period: 1 } }",
        "{ kind: resnet18, width: 2, dwa: {} }",
        "{ kind: mlp, hidden: [16, 16], lora: { rank: 2 } }",
        "{ kind: mlp, hidden: [16, 16], lora: { freeze_backbone_after: 1 } }",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let text = config(tmp.path(), "{ name: er, buffer_size: 30 }", "")
            .replace("{ kind: mlp, hidden: [16] }", model);
        assert!(text.contains(model));
        let full = run(&text, "full", &RunOptions::default()).unwrap();
        stopped_after(&text, "part", 2);
        let resumed = resume(tmp.path(), "part", &text, None).unwrap();
        for ((name, x), (_, y)) in results(&full).iter().zip(&results(&resumed)) {
            if name != "config.yaml" {
                assert!(x == y, "{model}: {name} differs after resume");
            }
        }
        assert_eq!(log(&full), log(&resumed), "{model}");
    }
}

/// PaLoRA's per-row selection in task-IL (replayed rows through their own adapters, ER and
/// DER++): a run stopped after task 2 and resumed writes the same files as an uninterrupted one.
#[test]
fn per_row_adapters_in_task_il_survive_a_resume() {
    for algorithm in [
        "{ name: er, buffer_size: 30 }",
        "{ name: derpp, buffer_size: 30 }",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let text = config(tmp.path(), algorithm, "")
            .replace("scenario: class-il", "scenario: task-il")
            .replace(
                "{ kind: mlp, hidden: [16] }",
                "{ kind: mlp, hidden: [16], lora: { rank: 2 } }",
            );
        assert!(text.contains("task-il") && text.contains("lora"));
        let full = run(&text, "full", &RunOptions::default()).unwrap();
        stopped_after(&text, "part", 2);
        let resumed = resume(tmp.path(), "part", &text, None).unwrap();
        for ((name, x), (_, y)) in results(&full).iter().zip(&results(&resumed)) {
            if name != "config.yaml" {
                assert!(x == y, "{algorithm}: {name} differs after resume");
            }
        }
        assert_eq!(log(&full), log(&resumed), "{algorithm}");
    }
}

#[test]
fn a_changed_config_is_refused_naming_the_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "{ name: er, buffer_size: 30 }", "");
    stopped_after(&text, "part", 1);
    let changed = text
        .replace("lr: 0.05", "lr: 0.1")
        .replace("buffer_size: 30", "buffer_size: 31");
    let e = resume(tmp.path(), "part", &changed, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("algorithm.buffer_size, optimizer.lr"), "{e}");
    // Where the run is written is not part of what it computes.
    let moved = text.replace(&format!("dir: {}", tmp.path().display()), "dir: elsewhere");
    resume(tmp.path(), "part", &moved, None).unwrap();
}

#[test]
fn a_damaged_checkpoint_is_detected_and_an_earlier_one_can_be_used() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "{ name: si, c: 1 }", "");
    let full = run(&text, "full", &RunOptions::default()).unwrap();
    stopped_after(&text, "part", 3);
    let ckpt = tmp.path().join("part/.seed-3.partial/checkpoints");
    // Only the two newest states are kept.
    assert_eq!(sequel_core::checkpoint::available(&ckpt), vec![2, 3]);
    // Truncate the newest tensors file.
    let f = ckpt.join("state-3.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = resume(tmp.path(), "part", &text, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("damaged") && e.contains("--resume-from-task 2 (others: [2])"),
        "the damaged checkpoint is not offered as a way out: {e}"
    );
    // A flipped byte in the JSON record is caught too.
    let j = ckpt.join("state-2.json");
    let mut text2 = std::fs::read(&j).unwrap();
    let n = text2.len();
    text2[n - 5] ^= 1;
    std::fs::write(ckpt.join("state-2.json.bak"), std::fs::read(&j).unwrap()).unwrap();
    std::fs::write(&j, &text2).unwrap();
    let e = resume(tmp.path(), "part", &text, Some(2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("damaged"), "{e}");
    // Restore the intact task-2 record and fall back to it explicitly.
    std::fs::rename(ckpt.join("state-2.json.bak"), &j).unwrap();
    let resumed = resume(tmp.path(), "part", &text, Some(2)).unwrap();
    assert_eq!(
        std::fs::read(full.join("accuracy_matrix.csv")).unwrap(),
        std::fs::read(resumed.join("accuracy_matrix.csv")).unwrap()
    );
}

#[test]
fn resuming_a_finished_or_unknown_run_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "naive", "");
    run(&text, "done", &RunOptions::default()).unwrap();
    let opts = |dir: &str| RunOptions {
        resume: Some(ResumeFrom {
            dir: tmp.path().join(dir),
            task: None,
        }),
        ..RunOptions::default()
    };
    let e = run(&text, "done", &opts("done/seed-3"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nothing to resume"), "{e}");
    let e = run(&text, "done", &opts("nope/seed-3"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no unfinished run"), "{e}");
    // The staging folder's name, once the run has finished, says so too (it is what
    // `--stop-after-task` printed), and the CLI asks before it reads the config there.
    let e = sequel_core::run::RunDir::check_resumable(&tmp.path().join("done/.seed-3.partial"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has finished: there is nothing to resume"),
        "{e}"
    );
}

/// `training.realtime`'s per-task records live in the checkpointed results: a resumed run writes
/// the same online accuracy, batch counts and counted costs as an uninterrupted one.
#[test]
fn realtime_evaluation_survives_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "{ name: er, buffer_size: 30 }", "").replace(
        "log_every: 1 }",
        "log_every: 1, realtime: { label_delay: 1 } }",
    );
    assert!(text.contains("realtime"), "{text}");
    let full = run(&text, "full", &RunOptions::default()).unwrap();
    stopped_after(&text, "part", 2);
    let resumed = resume(tmp.path(), "part", &text, None).unwrap();
    for ((name, x), (_, y)) in results(&full).iter().zip(&results(&resumed)) {
        assert!(
            name == "config.yaml" || x == y,
            "{name} differs after resume"
        );
    }
    assert_eq!(log(&full), log(&resumed), "train_log.csv");
    let online = |dir: &Path| -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let mut lines = text.lines().map(|l| l.split(',').collect::<Vec<_>>());
        let header = lines.next().unwrap();
        let keep: Vec<usize> = ["online_acc", "batches", "trained", "step_cost"]
            .iter()
            .map(|k| header.iter().position(|h| h == k).expect(k))
            .collect();
        lines
            .map(|row| keep.iter().map(|&i| row[i].to_string()).collect())
            .collect()
    };
    let rows = online(&full);
    assert_eq!(rows.len(), 4);
    assert_eq!(rows, online(&resumed));
}
