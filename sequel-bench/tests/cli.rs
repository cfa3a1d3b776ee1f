//! The `sequel` binary as a user meets it: exit codes and one-line errors that name the fix.

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

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const BASE: &str =
    "name: t\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il }\n";

#[test]
fn quickstart_runs_and_prints_the_matrix() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = repo().join("configs/quickstart.yaml");
    let out = tmp.path().join("runs");
    let o = sequel(
        &["run", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()],
        tmp.path(),
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout.contains("accuracy matrix"), "{stdout}");
    for key in ["average accuracy", "forgetting", "BWT", "FWT"] {
        assert!(stdout.contains(key), "{key} missing:\n{stdout}");
    }
    assert!(
        stderr(&o).contains("task 5/5"),
        "plain progress lines off a terminal"
    );
    assert!(out.join("quickstart/seed-0/accuracy_matrix.csv").is_file());
}

#[test]
fn every_shipped_config_validates() {
    let mut n = 0;
    for dir in [
        "configs",
        "configs/split-fmnist",
        "configs/permuted-fmnist",
        "configs/rotated-fmnist",
        "configs/split-cifar10",
        "configs/split-cifar100",
    ] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                let o = sequel(&["validate", "--no-data", p.to_str().unwrap()], repo());
                assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
                // With data at hand, the stream and model must build too.
                let text = std::fs::read_to_string(&p).unwrap();
                let fmnist =
                    Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
                        .exists();
                if text.contains("fmnist-mini") || (text.contains("fashion-mnist") && fmnist) {
                    let o = sequel(&["validate", p.to_str().unwrap()], repo());
                    assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
                }
                n += 1;
            }
        }
    }
    assert!(n >= 9, "found only {n} configs");
}

#[test]
fn bad_configs_fail_with_one_line_that_names_file_key_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "optimizer: { lr: 0.1, momentun: 0.9 }\n",
            &[
                "optimizer",
                "unknown field `momentun`",
                "did you mean `momentum`",
            ],
        ),
        (
            "training: { epochs: two }\n",
            &["training.epochs", "invalid type"],
        ),
        (
            "model: { kind: transformer }\n",
            &[
                "model.kind",
                "unknown backbone `transformer`",
                "mlp, cnn, resnet18",
            ],
        ),
        (
            "algorithm: { name: ewk }\n",
            &["algorithm.name", "unknown algorithm `ewk`", "valid:"],
        ),
        (
            "augmentation: { random_crop: { padding: 29 } }\n",
            &[
                "augmentation.random_crop.padding",
                "larger than the 28×28 image",
            ],
        ),
        (
            "augmentation: { horizontal_flip: 2 }\n",
            &["augmentation.horizontal_flip", "[0, 1]"],
        ),
        (
            "augmentation: { normalize: { mean: [0.5, 0.5, 0.5], std: [1, 1, 1] } }\n",
            &["augmentation.normalize.mean", "1-channel"],
        ),
        (
            "augmentation: { normalize: { mean: [0.5], std: [-1] } }\n",
            &["augmentation.normalize.std", "> 0"],
        ),
    ];
    for (i, (extra, needles)) in cases.iter().enumerate() {
        let f = write(
            tmp.path(),
            &format!("bad{i}.yaml"),
            &format!("{BASE}{extra}"),
        );
        let o = sequel(&["validate", &f], tmp.path());
        assert!(!o.status.success());
        let e = stderr(&o);
        assert_eq!(e.trim_end().lines().count(), 1, "one line expected:\n{e}");
        assert!(e.contains(&f), "{e}");
        for n in *needles {
            assert!(e.contains(n), "`{n}` missing in: {e}");
        }
    }
}

#[test]
fn unknown_dataset_and_indivisible_tasks_are_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(tmp.path(), "c.yaml", BASE);
    let o = sequel(
        &[
            "run",
            &f,
            "--set",
            "benchmark.dataset=imagenet",
            "--out",
            "r",
        ],
        tmp.path(),
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(&f) && e.contains("imagenet") && e.contains("fashion-mnist"),
        "{e}"
    );
    let o = sequel(
        &["run", &f, "--set", "benchmark.tasks=3", "--out", "r"],
        tmp.path(),
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("3 tasks do not divide the 10 classes"), "{e}");
    assert!(
        !tmp.path().join("r/t/seed-0").exists(),
        "no results for a failed run"
    );
}

#[test]
fn truncated_data_file_is_reported_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for f in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        // A valid header that promises 100 samples, then nothing.
        let magic: u32 = if f.contains("images") { 0x803 } else { 0x801 };
        let mut bytes = magic.to_be_bytes().to_vec();
        bytes.extend(100u32.to_be_bytes());
        if f.contains("images") {
            bytes.extend(28u32.to_be_bytes());
            bytes.extend(28u32.to_be_bytes());
        }
        std::fs::write(data.join(f), bytes).unwrap();
    }
    let f = write(tmp.path(), "c.yaml", BASE);
    let o = sequel(
        &[
            "run",
            &f,
            "--set",
            "benchmark.dataset=mnist",
            "--set",
            &format!("benchmark.data_dir={}", data.display()),
            "--out",
            "r",
        ],
        tmp.path(),
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
}

#[test]
fn compare_summarises_seeds_of_real_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(
        tmp.path(),
        "c.yaml",
        "name: t\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 100 }\n",
    );
    for seed in ["0", "1"] {
        let o = sequel(
            &["run", &f, "--seed", seed, "--quiet", "--out", "r"],
            tmp.path(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = sequel(&["compare", "r"], tmp.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let row = out
        .lines()
        .find(|l| l.starts_with("| t |"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.starts_with("| t | 2 | "), "{row}");
    // The report: plots inlined into one HTML page that loads nothing from the network.
    let o = sequel(&["report", "r", "--out", "rep"], tmp.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(tmp.path().join("rep/report.html")).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        4,
        "avg acc, forgetting, heatmap, per-task"
    );
    let without_svg_namespace = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(
        !without_svg_namespace.contains("http://") && !without_svg_namespace.contains("https://")
    );
    assert!(!html.contains("src="), "no external resources");
    assert!(
        html.contains("| t |") || html.contains("<td>t</td>"),
        "the comparison table"
    );
    assert!(tmp.path().join("rep/avg_acc.svg").is_file());
    let o = sequel(&["compare", "nowhere"], tmp.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nowhere: no such run directory"));
}

#[test]
fn sweep_expands_exactly_skips_finished_points_and_parallel_equals_sequential() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(
        tmp.path(),
        "c.yaml",
        "name: s\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 60 }\n",
    );
    let args = |out: &str, jobs: &str| -> Vec<String> {
        [
            "sweep",
            &f,
            "--seeds",
            "0..2",
            "--grid",
            "optimizer.lr=0.03,0.05",
            "--grid",
            "model.hidden=[32],[16, 16]",
            "--jobs",
            jobs,
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        sequel(&a, tmp.path())
    };
    let mut dry = args("seq", "1");
    dry.push("--dry-run".into());
    let o = run(dry.clone());
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("8 points: 0 done, 8 to run"), "{out}");
    assert!(
        out.contains("s-optimizer.lr=0.05-model.hidden=_16__16_  seed 1"),
        "{out}"
    );
    assert!(run(args("seq", "1")).status.success());
    let o = run(args("par", "2"));
    assert!(o.status.success(), "{}", stderr(&o));
    for d in std::fs::read_dir(tmp.path().join("seq")).unwrap() {
        let name = d.unwrap().file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        for seed in 0..2 {
            let rel = Path::new(&name).join(format!("seed-{seed}/accuracy_matrix.csv"));
            let a = std::fs::read(tmp.path().join("seq").join(&rel)).unwrap();
            let b = std::fs::read(tmp.path().join("par").join(&rel)).unwrap();
            assert_eq!(a, b, "{}", rel.display());
        }
    }
    let o = run(args("seq", "1"));
    assert!(
        stderr(&o).contains("8 already done, 0 to run"),
        "{}",
        stderr(&o)
    );
    let o = run(dry);
    assert!(String::from_utf8_lossy(&o.stdout).contains("8 points: 8 done, 0 to run"));
}

#[test]
fn list_names_algorithms_datasets_and_models() {
    let o = sequel(&["list"], repo());
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    for name in [
        "naive",
        "joint",
        "lines",
        "ties",
        "magmax",
        "fmnist-mini",
        "fashion-mnist",
        "cifar10",
        "mlp",
        "resnet18",
    ] {
        assert!(s.contains(name), "{name} missing:\n{s}");
    }
}

/// Full-data smoke test: runs when Debian's dataset-fashion-mnist is installed (.ci/run installs it).
#[test]
fn full_fashion_mnist_smoke_run() {
    if !Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists() {
        eprintln!("skipped: apt-get install dataset-fashion-mnist to run this test");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = repo().join("configs/split-fmnist/naive.yaml");
    let o = sequel(
        &[
            "run",
            cfg.to_str().unwrap(),
            "--set",
            "benchmark.train_subset=300",
            "--quiet",
            "--out",
            tmp.path().to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let csv = std::fs::read_to_string(
        tmp.path()
            .join("split-fmnist-naive/seed-0/accuracy_matrix.csv"),
    )
    .unwrap();
    assert_eq!(csv.lines().count(), 7);
}

/// A run long enough to be stopped from outside during task 3: 5 tasks of 1000 steps each.
fn slow_config(dir: &Path) -> String {
    write(
        dir,
        "slow.yaml",
        "name: slow\nseed: 4\n\
         benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 200 }\n\
         model: { kind: mlp, hidden: [32] }\n\
         optimizer: { kind: sgd, lr: 0.05 }\n\
         training: { epochs: 50, batch_size: 10, log_every: 0 }\n\
         algorithm: { name: er, buffer_size: 50 }\n",
    )
}

/// Start a run, wait until task 2's checkpoint exists, then signal it while task 3 trains.
fn interrupt_during_task_3(dir: &Path, cfg: &str, signal: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sequel"))
        .args(["run", cfg, "--out", "runs", "--quiet"])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ckpt = dir.join("runs/slow/.seed-4.partial/checkpoints/state-2.json");
    let start = std::time::Instant::now();
    while !ckpt.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before task 2 was checkpointed"
        );
        assert!(
            start.elapsed().as_secs() < 300,
            "no checkpoint after 5 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run must still be training when it is signalled"
    );
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    child.wait_with_output().unwrap()
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_result() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = slow_config(tmp.path());
    let killed = interrupt_during_task_3(tmp.path(), &cfg, "-KILL");
    assert!(!killed.status.success());
    assert!(tmp.path().join("runs/slow/.seed-4.partial").is_dir());
    // The run's final name, which does not exist yet, leads to its staging folder too.
    let final_name = tmp.path().join("runs/slow/seed-4");
    assert!(!final_name.exists());
    let resumed = sequel(
        &["run", "--resume", final_name.to_str().unwrap(), "--quiet"],
        tmp.path(),
    );
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let got = std::fs::read(tmp.path().join("runs/slow/seed-4/accuracy_matrix.csv")).unwrap();
    let full = sequel(&["run", &cfg, "--out", "full", "--quiet"], tmp.path());
    assert!(full.status.success(), "{}", stderr(&full));
    let want = std::fs::read(tmp.path().join("full/slow/seed-4/accuracy_matrix.csv")).unwrap();
    assert_eq!(got, want, "resumed and uninterrupted matrices differ");
}

#[test]
fn ctrl_c_stops_cleanly_with_a_resume_hint() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = slow_config(tmp.path());
    let out = interrupt_during_task_3(tmp.path(), &cfg, "-INT");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("sequel run --resume"), "{err}");
    // Signalled during task 3 (a slow machine may deliver it a task later): the task in progress
    // is abandoned and the newest checkpoint is the task before it.
    let task: usize = err
        .split("interrupted during task ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(task >= 3, "{err}");
    let ckpt = tmp.path().join("runs/slow/.seed-4.partial/checkpoints");
    assert_eq!(
        sequel_core::checkpoint::available(&ckpt).last(),
        Some(&(task - 1))
    );
    // No stray temporary files from a half-written checkpoint.
    for e in std::fs::read_dir(&ckpt).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "leftover {name}");
    }
    // A different config is refused, naming the key.
    let partial = tmp.path().join("runs/slow/.seed-4.partial");
    let refused = sequel(
        &[
            "run",
            &cfg,
            "--resume",
            partial.to_str().unwrap(),
            "--set",
            "optimizer.lr=0.1",
        ],
        tmp.path(),
    );
    assert!(!refused.status.success());
    let e = stderr(&refused);
    assert!(e.contains("optimizer.lr") && e.lines().count() == 1, "{e}");
    // The same run resumed ends where the uninterrupted one does.
    let resumed = sequel(
        &["run", "--resume", partial.to_str().unwrap(), "--quiet"],
        tmp.path(),
    );
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let full = sequel(&["run", &cfg, "--out", "full", "--quiet"], tmp.path());
    assert!(full.status.success(), "{}", stderr(&full));
    for f in ["accuracy_matrix.csv", "checkpoints/task-5.safetensors"] {
        let got = std::fs::read(tmp.path().join("runs/slow/seed-4").join(f)).unwrap();
        let want = std::fs::read(tmp.path().join("full/slow/seed-4").join(f)).unwrap();
        assert!(got == want, "{f} differs after Ctrl-C and resume");
    }
}

#[test]
fn a_sweep_resumes_a_stopped_point_and_restarts_one_whose_config_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let f = write(
        tmp.path(),
        "c.yaml",
        "name: s\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 4, classes_per_task: 2, scenario: class-il, train_subset: 60 }\n\
         algorithm: { name: er, buffer_size: 30 }\n",
    );
    let sweep = |out: &str, lr: &str| {
        sequel(
            &[
                "sweep",
                &f,
                "--grid",
                &format!("optimizer.lr={lr}"),
                "--out",
                out,
            ],
            tmp.path(),
        )
    };
    // The uninterrupted reference.
    assert!(sweep("ref", "0.05").status.success());
    // The same point, stopped after task 2 by hand, then completed by the sweep.
    let name = "s-optimizer.lr=0.05";
    let stop = sequel(
        &[
            "run",
            &f,
            "--set",
            "optimizer.lr=0.05",
            "--set",
            &format!("name={name}"),
            "--seed",
            "0",
            "--out",
            "part",
            "--stop-after-task",
            "2",
            "--quiet",
        ],
        tmp.path(),
    );
    assert!(!stop.status.success());
    assert!(stderr(&stop).contains("--resume"), "{}", stderr(&stop));
    // A marker: a resumed run does not redo task 1, so it cannot write this file again.
    let marker = |root: &str, dir: &str| {
        tmp.path().join(format!(
            "{root}/{name}/{dir}/checkpoints/task-1.safetensors"
        ))
    };
    std::fs::remove_file(marker("part", ".seed-0.partial")).unwrap();
    let o = sweep("part", "0.05");
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(
        tmp.path()
            .join(format!("part/.sweep-logs/{name}-seed-0.log")),
    )
    .unwrap();
    assert!(!log.contains("error"), "{log}");
    let matrix = |root: &str| {
        std::fs::read(
            tmp.path()
                .join(format!("{root}/{name}/seed-0/accuracy_matrix.csv")),
        )
        .unwrap()
    };
    assert_eq!(matrix("ref"), matrix("part"));
    assert!(
        !marker("part", "seed-0").exists(),
        "the sweep reran the point instead of resuming"
    );
    // A stopped point whose config has changed since is run afresh instead of failing to resume.
    let stop = sequel(
        &[
            "run",
            &f,
            "--set",
            "optimizer.lr=0.05",
            "--set",
            "model.hidden=[8]",
            "--set",
            &format!("name={name}"),
            "--seed",
            "0",
            "--out",
            "changed",
            "--stop-after-task",
            "1",
            "--quiet",
        ],
        tmp.path(),
    );
    assert!(!stop.status.success());
    std::fs::remove_file(marker("changed", ".seed-0.partial")).unwrap();
    let o = sweep("changed", "0.05");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(matrix("ref"), matrix("changed"));
    assert!(
        marker("changed", "seed-0").exists(),
        "a fresh run writes every task"
    );
}

#[test]
fn bench_times_an_algorithms_full_step() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = repo().join("configs/quickstart.yaml");
    let cfg = cfg.to_str().unwrap();
    let args = |algo: &str| {
        [
            "bench",
            cfg,
            "--algorithm",
            algo,
            "--batch",
            "10",
            "--steps",
            "3",
            "--warmup",
            "1",
        ]
        .map(String::from)
    };
    let o = sequel(
        &args("{name: derpp, buffer_size: 50}")
            .each_ref()
            .map(|s| s.as_str()),
        tmp.path(),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        out.contains("algorithm derpp") && out.contains("task 2"),
        "{out}"
    );
    let row = out.lines().last().unwrap();
    let sps: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(row.trim_start().starts_with("10 ") && sps > 0.0, "{out}");

    // GDumb trains no step on the stream: one line that says so.
    let o = sequel(&args("gdumb").each_ref().map(|s| s.as_str()), tmp.path());
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no step to time"), "{err}");
}
