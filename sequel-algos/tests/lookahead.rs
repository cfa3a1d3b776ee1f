//! Lookahead (`optimizer.lookahead`) in whole training runs: α = 1 is the inner optimizer bit for
//! bit, and α < 1 changes the run (so the comparison above is not vacuous).

use std::path::{Path, PathBuf};

use sequel_algos::run::{execute_with, prepare};
use sequel_algos::Registry;
use sequel_core::experiment::RunOptions;
use sequel_core::trainer::Silent;

fn run(out: &Path, name: &str, optimizer: &str, algorithm: &str) -> PathBuf {
    let text = format!(
        "name: {name}\nseed: 5\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 3, classes_per_task: 2, scenario: class-il, train_subset: 60 }}\n\
         model: {{ kind: mlp, hidden: [16] }}\n\
         optimizer: {optimizer}\n\
         training: {{ epochs: 2, batch_size: 10, log_every: 1 }}\n\
         algorithm: {algorithm}\n\
         output: {{ dir: {} }}\n",
        out.display()
    );
    let p = prepare(&text, "test.yaml", &[], &Registry::builtin()).unwrap();
    execute_with(p, &mut Silent, None, &RunOptions::default())
        .unwrap()
        .dir
}

/// The accuracy matrix and every task's evaluated weights, as bytes.
fn outputs(dir: &Path) -> Vec<Vec<u8>> {
    let mut names = vec!["accuracy_matrix.csv".to_string()];
    names.extend((1..=3).map(|t| format!("checkpoints/task-{t}.safetensors")));
    names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}")))
        .collect()
}

#[test]
fn alpha_one_equals_the_inner_optimizer_and_alpha_half_does_not() {
    for (inner, algorithm) in [
        ("kind: sgd, lr: 0.05, momentum: 0.9", "naive"),
        (
            "kind: adam, lr: 0.003, reset_each_task: false",
            "{ name: er, buffer_size: 30 }",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let plain = outputs(&run(
            tmp.path(),
            "plain",
            &format!("{{ {inner} }}"),
            algorithm,
        ));
        let one = outputs(&run(
            tmp.path(),
            "one",
            &format!("{{ {inner}, lookahead: {{ k: 3, alpha: 1.0 }} }}"),
            algorithm,
        ));
        let half = outputs(&run(
            tmp.path(),
            "half",
            &format!("{{ {inner}, lookahead: {{ k: 3, alpha: 0.5 }} }}"),
            algorithm,
        ));
        assert!(plain == one, "{inner}: lookahead with alpha = 1 differs");
        // Weights of every task differ once the slow weights pull the fast ones back.
        for (t, (p, h)) in plain.iter().zip(&half).enumerate().skip(1) {
            assert!(
                p != h,
                "{inner}: alpha = 0.5 left task {t}'s weights unchanged"
            );
        }
    }
}

/// `evaluate_with: slow` evaluates and saves φ of the last sync but trains exactly as `fast`:
/// the train logs match; with k dividing a task's 12 steps (φ = θ at the end) every output
/// matches, and with k = 5 the evaluated weights differ.
#[test]
fn evaluating_the_slow_weights_leaves_training_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let opt = |k: usize, with: &str| {
        format!(
            "{{ kind: sgd, lr: 0.05, momentum: 0.9, \
             lookahead: {{ k: {k}, alpha: 0.5, evaluate_with: {with} }} }}"
        )
    };
    let log = |d: &Path| std::fs::read_to_string(d.join("train_log.csv")).unwrap();
    for k in [3, 5] {
        let fast = run(tmp.path(), &format!("fast{k}"), &opt(k, "fast"), "naive");
        let slow = run(tmp.path(), &format!("slow{k}"), &opt(k, "slow"), "naive");
        assert_eq!(log(&fast), log(&slow), "k = {k}: training changed");
        let (f, s) = (outputs(&fast), outputs(&slow));
        if k == 3 {
            assert!(f == s, "k = 3 ends every task on a sync");
        } else {
            for t in 1..=3 {
                assert!(f[t] != s[t], "k = 5: task {t} evaluated the fast weights");
            }
        }
    }
}

/// `mode: ema` never touches the fast weights: the train log is the plain optimizer's, and the
/// evaluated weights of every task are the average instead. Its average spans the stream: with
/// plain SGD (no inner state) `reset_each_task` true and false give the same run, which a φ reset
/// at each task would not. `mode: ema-reset` resets the fast weights, so training changes.
#[test]
fn ema_trains_as_the_plain_optimizer_and_ema_reset_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let log = |d: &Path| std::fs::read_to_string(d.join("train_log.csv")).unwrap();
    let sgd = "kind: sgd, lr: 0.05";
    let plain = run(tmp.path(), "plain", &format!("{{ {sgd} }}"), "naive");
    let ema = |name: &str, mode: &str, reset: bool| {
        run(
            tmp.path(),
            name,
            &format!(
                "{{ {sgd}, reset_each_task: {reset}, \
                 lookahead: {{ mode: {mode}, k: 4, alpha: 0.1, evaluate_with: slow }} }}"
            ),
            "naive",
        )
    };
    let slow = ema("ema", "ema", true);
    assert_eq!(log(&plain), log(&slow));
    let (p, s) = (outputs(&plain), outputs(&slow));
    for t in 1..=3 {
        assert!(p[t] != s[t], "task {t} evaluated the fast weights");
    }
    assert!(
        outputs(&ema("ema-kept", "ema", false)) == s,
        "the average restarted at a task boundary"
    );
    let reset = ema("ema-reset", "ema-reset", true);
    assert_ne!(
        log(&plain),
        log(&reset),
        "ema-reset left training unchanged"
    );
    assert!(
        outputs(&ema("ema-reset-kept", "ema-reset", false)) == outputs(&reset),
        "the tortoise restarted at a task boundary"
    );
}
