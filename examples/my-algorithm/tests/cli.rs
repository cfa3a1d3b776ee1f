//! The example crate's binary is the full `sequel` CLI with `l2-anchor` registered: a run, a run
//! stopped after task 2 and resumed (identical to the uninterrupted one), and a 2-point sweep.

use std::path::Path;
use std::process::Command;

fn cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_my-algorithm"))
        .args(args)
        .output()
        .expect("the example binary starts");
    out
}

fn ok(args: &[&str]) {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn matrix(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("accuracy_matrix.csv")).unwrap()
}

#[test]
fn run_resume_and_sweep_know_the_user_algorithm() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("l2.yaml");
    std::fs::write(
        &cfg,
        "name: l2\n\
         benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: task-il, train_subset: 60 }\n\
         model: { kind: mlp, hidden: [16] }\n\
         algorithm: { name: l2-anchor, lambda: 0.01 }\n",
    )
    .unwrap();
    let (cfg, out) = (cfg.to_str().unwrap(), tmp.path().to_str().unwrap());
    ok(&["validate", cfg]);
    ok(&["run", cfg, "--quiet", "--out", out]);
    let full = matrix(&tmp.path().join("l2/seed-0"));

    let stopped = cli(&[
        "run",
        cfg,
        "--quiet",
        "--out",
        out,
        "--set",
        "name=part",
        "--stop-after-task",
        "2",
    ]);
    assert!(!stopped.status.success());
    let partial = tmp.path().join("part/.seed-0.partial");
    ok(&["run", "--resume", partial.to_str().unwrap(), "--quiet"]);
    assert_eq!(matrix(&tmp.path().join("part/seed-0")), full);

    let sweep = tmp.path().join("sweep");
    ok(&[
        "sweep",
        cfg,
        "--grid",
        "algorithm.lambda=0,0.01",
        "--out",
        sweep.to_str().unwrap(),
    ]);
    let runs: Vec<_> = std::fs::read_dir(&sweep)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("seed-0/accuracy_matrix.csv").exists())
        .collect();
    assert_eq!(runs.len(), 2, "both sweep points finished");
}
