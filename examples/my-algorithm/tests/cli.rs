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

#[test]
fn a_registered_dataset_and_backbone_are_configs_like_the_built_in_ones() {
    let list = cli(&["list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("blobs") && text.contains("two-layer"),
        "{text}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("blobs.yaml");
    let write = |model: &str| {
        std::fs::write(
            &cfg,
            format!(
                "name: blobs\n\
                 benchmark: {{ dataset: blobs, kind: split, tasks: 2, scenario: class-il }}\n\
                 model: {model}\n\
                 training: {{ epochs: 5 }}\n\
                 algorithm: {{ name: er, buffer_size: 40 }}\n"
            ),
        )
        .unwrap()
    };
    let (c, out) = (cfg.to_str().unwrap(), tmp.path().to_str().unwrap());

    // A key the backbone does not have is caught by validate, naming it.
    write("{ kind: two-layer, options: { widht: 16 } }");
    let bad = cli(&["validate", c]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("model.options") && err.contains("widht"));
    write("{ kind: two-layr }");
    let err = String::from_utf8_lossy(&cli(&["validate", c]).stderr).to_string();
    assert!(err.contains("did you mean `two-layer`"), "{err}");

    // A built-in backbone's key is not silently dropped for a registered one.
    write("{ kind: two-layer, hidden: [500] }");
    let err = String::from_utf8_lossy(&cli(&["validate", c]).stderr).to_string();
    assert!(
        err.contains("model.hidden") && err.contains("model.options"),
        "{err}"
    );

    write("{ kind: two-layer, options: { width: 16 } }");
    ok(&["validate", c]);
    // Sweeps check every point against the same registry (the dataset included).
    let sweep = tmp.path().join("sweep");
    ok(&[
        "sweep",
        c,
        "--seeds",
        "0..1",
        "--out",
        sweep.to_str().unwrap(),
    ]);
    assert!(sweep.join("blobs/seed-0/accuracy_matrix.csv").exists());
    ok(&["run", c, "--quiet", "--out", out]);
    let run = tmp.path().join("blobs/seed-0");
    let resolved = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    assert!(resolved.contains("width: 16"), "{resolved}");
    // The quadrants are easy: after 5 epochs per task both tasks are above chance (25 %), the
    // first one kept by replay.
    let m = String::from_utf8(matrix(&run)).unwrap();
    let last: Vec<f64> = m
        .lines()
        .last()
        .unwrap()
        .split(',')
        .skip(1)
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    assert!(last.len() == 2 && last.iter().all(|&a| a > 50.0), "{m}");
}
