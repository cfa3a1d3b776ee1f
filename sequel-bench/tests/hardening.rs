//! Inputs a new user tries that must be refused before a run starts, and results that must never
//! be replaced or pooled silently (issue 13, sections 2–5).

use std::path::Path;
use std::process::{Command, Output};

fn sequel(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sequel"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Files and folders directly under `dir` (hidden ones included), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A small quickstart: 5 tasks of 2 classes, 20 samples each.
const Q: &str = "name: q\nseed: 0\n\
    benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 20 }\n\
    model: { kind: mlp, hidden: [16] }\n\
    training: { epochs: 1, batch_size: 10 }\n\
    algorithm: { name: naive }\n";

fn one_line_error(o: &Output, file: &str, needles: &[&str]) {
    assert!(!o.status.success());
    let e = stderr(o);
    assert_eq!(e.trim_end().lines().count(), 1, "one line expected:\n{e}");
    assert!(e.starts_with(&format!("error: {file}")), "file prefix: {e}");
    for n in needles {
        assert!(e.contains(n), "`{n}` missing in: {e}");
    }
}

#[test]
fn stream_dependent_algorithm_checks_fail_validate_and_leave_no_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "q.yaml", Q);
    for spec in [
        "algorithm={name: icarl, buffer_size: 5}",
        "algorithm={name: agem, buffer_size: 3}",
        "algorithm={name: gem, buffer_size: 3}",
        "algorithm={name: er, buffer_policy: task_quota, buffer_size: 4}",
    ] {
        let o = sequel(&["validate", &f, "--set", spec], tmp.path());
        one_line_error(&o, &f, &["algorithm.buffer_size"]);
        let o = sequel(&["run", &f, "--set", spec, "--out", "runs"], tmp.path());
        one_line_error(&o, &f, &["algorithm.buffer_size"]);
        assert!(
            entries(&tmp.path().join("runs/q")).is_empty(),
            "{spec}: nothing written: {:?}",
            entries(&tmp.path().join("runs/q"))
        );
        // A sweep refuses the point before running anything, --dry-run included.
        let o = sequel(
            &["sweep", &f, "--set", spec, "--out", "sw", "--dry-run"],
            tmp.path(),
        );
        assert!(!o.status.success(), "{spec}");
        assert!(
            stderr(&o).contains("algorithm.buffer_size"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn model_sizes_are_bounded_and_zero_widths_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "q.yaml", Q);
    for hidden in ["[100000000]", "[1000000000000]", "[10000000000000000000]"] {
        let start = std::time::Instant::now();
        let o = sequel(
            &["validate", &f, "--set", &format!("model.hidden={hidden}")],
            tmp.path(),
        );
        one_line_error(&o, &f, &["model.hidden", "lower model.hidden"]);
        assert!(start.elapsed().as_secs() < 30, "refused before allocating");
    }
    let o = sequel(&["validate", &f, "--set", "model.hidden=[0]"], tmp.path());
    one_line_error(&o, &f, &["model.hidden", "at least 1"]);
}

#[test]
fn a_config_that_is_not_a_mapping_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, text) in [("list.yaml", "- a\n- b\n"), ("scalar.yaml", "42\n")] {
        let f = write(tmp.path(), name, text);
        let o = sequel(&["run", &f, "--out", "x"], tmp.path());
        one_line_error(&o, &f, &["top level must be a mapping"]);
        assert!(!tmp.path().join("x").exists());
    }
}

#[test]
fn unreadable_configs_and_run_dirs_fail_in_one_line_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin.yaml");
    std::fs::write(&bin, [0xffu8, 0xfe, 0x00, 0x81]).unwrap();
    let nul = tmp.path().join("nul.yaml");
    std::fs::write(&nul, b"name: a\0b\n").unwrap();
    std::fs::create_dir(tmp.path().join("adir")).unwrap();
    for (args, needle) in [
        (vec!["validate", "bin.yaml"], "not a text file"),
        (vec!["validate", "nul.yaml"], "binary file"),
        (vec!["run", "adir"], "is a directory"),
        (vec!["validate", "missing.yaml"], "no such file"),
    ] {
        let o = sequel(&args, tmp.path());
        one_line_error(&o, &format!("cannot read config {}", args[1]), &[needle]);
    }
    let o = sequel(&["run", "--resume", "adir"], tmp.path());
    assert!(!o.status.success());
    let e = stderr(&o);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("adir is not a run directory"), "{e}");
}

#[test]
fn finished_runs_are_kept_apart_and_never_replaced_by_another_config() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "q.yaml", Q);
    let run = |extra: &[&str]| {
        let mut args = vec!["run", f.as_str(), "--quiet", "--out", "r"];
        args.extend_from_slice(extra);
        sequel(&args, tmp.path())
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let matrix = tmp.path().join("r/q/seed-0/accuracy_matrix.csv");
    let first = std::fs::read(&matrix).unwrap();
    // Resuming the finished run from its staging name says it has finished.
    let o = sequel(&["run", "--resume", "r/q/.seed-0.partial"], tmp.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("has finished: there is nothing to resume"),
        "{}",
        stderr(&o)
    );
    // The same config reruns in place.
    let o = run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A different config is refused, naming the keys, and the results stay.
    let o = run(&["--set", "algorithm=joint"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("differs in: algorithm.name") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(&matrix).unwrap(), first);
    assert_eq!(entries(&tmp.path().join("r/q")), vec!["seed-0"]);
    // Asked for, it replaces them.
    let o = run(&["--set", "algorithm=joint", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = std::fs::read_to_string(tmp.path().join("r/q/seed-0/config.yaml")).unwrap();
    assert!(cfg.contains("name: joint"), "{cfg}");
    // The resolved config omits unset keys and the keys of other model kinds.
    assert!(!cfg.contains("null"), "{cfg}");
    assert!(!cfg.contains("channels") && !cfg.contains("width"), "{cfg}");
    assert!(cfg.contains("train_subset: 20"), "{cfg}");
}

#[test]
fn a_file_where_the_run_directory_goes_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "q.yaml", Q);
    std::fs::create_dir_all(tmp.path().join("o/q")).unwrap();
    std::fs::write(tmp.path().join("o/q/seed-0"), "not a run").unwrap();
    let o = sequel(&["run", &f, "--quiet", "--out", "o"], tmp.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("exists and is not a run directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(entries(&tmp.path().join("o/q")), vec!["seed-0"]);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("o/q/seed-0")).unwrap(),
        "not a run"
    );
}

#[test]
fn two_sweeps_into_one_folder_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "q.yaml", Q);
    let args = [
        "sweep",
        f.as_str(),
        "--seeds",
        "0..3",
        "--grid",
        "optimizer.lr=0.03,0.05",
        "--out",
        "s",
    ];
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_sequel"))
            .args(args)
            .current_dir(tmp.path())
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for o in [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()] {
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = sequel(
        &[
            "sweep",
            &f,
            "--seeds",
            "0..3",
            "--grid",
            "optimizer.lr=0.03,0.05",
            "--out",
            "s",
            "--dry-run",
        ],
        tmp.path(),
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("6 points: 6 done, 0 to run"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn compare_by_several_keys_and_never_pools_other_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "q.yaml", Q);
    let o = sequel(
        &[
            "sweep",
            &f,
            "--grid",
            "benchmark.scenario=class-il,task-il",
            "--out",
            "s",
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Grouping by the algorithm alone must not average the two scenarios.
    let o = sequel(&["compare", "s", "--by", "algorithm.name"], tmp.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for s in ["class-il", "task-il"] {
        assert!(
            out.contains(&format!(
                "| algorithm.name=naive, benchmark.scenario={s} | 1 |"
            )),
            "{out}"
        );
    }
    for by in [
        vec!["--by", "algorithm.name,benchmark.scenario"],
        vec!["--by", "algorithm.name", "--by", "benchmark.scenario"],
    ] {
        let mut args = vec!["compare", "s"];
        args.extend(by);
        let o = sequel(&args, tmp.path());
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("| algorithm.name=naive, benchmark.scenario=task-il | 1 |"),
            "{out}"
        );
    }
    let o = sequel(&["compare", "s", "--by", "algorithm.nam"], tmp.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the keys that vary across these runs are: benchmark.scenario"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_bench_and_logs_as_a_new_user_meets_them() {
    let tmp = tempfile::tempdir().unwrap();
    let o = sequel(&["--help"], tmp.path());
    let help = String::from_utf8_lossy(&o.stdout);
    for c in [
        "run", "validate", "sweep", "compare", "report", "bench", "list",
    ] {
        assert!(help.contains(&format!("\n  {c} ")), "{c} missing:\n{help}");
    }
    // bench times synthetic batches: a dataset that is not installed is no obstacle.
    let f = write(
        tmp.path(),
        "c.yaml",
        "name: c\nbenchmark: { dataset: cifar100, kind: split, tasks: 10, scenario: class-il, data_dir: nowhere }\nmodel: { kind: mlp, hidden: [8] }\n",
    );
    let o = sequel(
        &["bench", &f, "--batch", "2", "--steps", "2", "--warmup", "1"],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("3x32x32 inputs, 100 outputs"), "{out}");
    // Log lines written to a file (not a terminal) carry no colour codes.
    let q = write(tmp.path(), "q.yaml", Q);
    let o = Command::new(env!("CARGO_BIN_EXE_sequel"))
        .args(["run", &q, "--quiet", "--out", "r"])
        .current_dir(tmp.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in: {log}");
}
