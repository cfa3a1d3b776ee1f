//! `device:` / `--device` in a CPU-only build: a CUDA device is refused before anything is
//! written, with one line that says how to get a CUDA build; `cpu` is the default.

#![cfg(not(feature = "cuda"))]

use std::process::Command;

#[test]
fn cuda_in_a_cpu_build_is_refused_up_front_and_cpu_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("t.yaml");
    std::fs::write(
        &cfg,
        "name: t\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 2, scenario: class-il, train_subset: 20 }\n",
    )
    .unwrap();
    let out = tmp.path().join("runs");
    let run = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_sequel"))
            .args(["run", cfg.to_str().unwrap(), "--quiet", "--device", device])
            .arg("--out")
            .arg(&out)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let o = run("cuda:1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("t.yaml") && err.contains("cuda:1") && err.contains("build-cuda.sh"),
        "{err}"
    );
    assert!(!out.exists(), "nothing may be written for a refused run");

    let o = run("gpu");
    assert!(String::from_utf8_lossy(&o.stderr).contains("cpu, cuda or cuda:N"));

    let o = run("cpu");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = std::fs::read_to_string(out.join("t/seed-0/summary.json")).unwrap();
    assert!(summary.contains("\"device\": \"cpu\""), "{summary}");
    let resolved = std::fs::read_to_string(out.join("t/seed-0/config.yaml")).unwrap();
    assert!(
        !resolved.contains("device"),
        "cpu is the default and is left out: {resolved}"
    );
}

#[test]
fn sweep_devices_gives_each_job_its_own_gpu() {
    // In a CPU build every point fails at once with the device it was given, which is what this
    // test reads: 4 points, `--devices 3,5` → two jobs, each running its points on one device.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("t.yaml");
    std::fs::write(
        &cfg,
        "name: t\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 2, scenario: class-il, train_subset: 20 }\n",
    )
    .unwrap();
    let out = tmp.path().join("runs");
    let sweep = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sequel"))
            .args(["sweep", cfg.to_str().unwrap(), "--seeds", "0..4", "--out"])
            .arg(&out)
            .args(extra)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };
    let o = sweep(&["--devices", "3,5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("2 at a time on cuda:3, cuda:5"), "{err}");
    assert!(err.contains("4 of 4 points failed"), "{err}");
    let mut devices = Vec::new();
    for seed in 0..4 {
        let log =
            std::fs::read_to_string(out.join(format!(".sweep-logs/t-seed-{seed}.log"))).unwrap();
        let d = ["cuda:3", "cuda:5"]
            .into_iter()
            .filter(|d| log.contains(d))
            .collect::<Vec<_>>();
        assert_eq!(d.len(), 1, "seed {seed}: {log}");
        devices.push(d[0]);
    }
    assert!(
        devices.contains(&"cuda:3") && devices.contains(&"cuda:5"),
        "{devices:?}"
    );

    // Under Slurm the scheduler assigns GPUs: --devices is refused before anything is written.
    let o = sweep(&["--devices", "0", "--launcher", "slurm", "--dry-run"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--gres gpu:1"), "{err}");
    let o = sweep(&["--jobs", "0"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--jobs must be at least 1"));
}
