//! `sequel sweep --launcher slurm` against a real Slurm: `scripts/slurm-local.sh start` runs a
//! one-node cluster on this machine, and CI always starts one. Where no Slurm answers, the tests
//! that need it print why and return (under `CI` they fail instead); the rest run everywhere.
//!
//! Every wait is bounded, so a stuck cluster fails a test with the queue and the logs in the
//! message instead of hanging CI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn sequel(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sequel"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("binary runs")
}

fn repo() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .canonicalize()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

/// Whether a Slurm controller answers with an idle or busy node.
fn slurm_ready() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%t"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
        && Command::new("sbatch").arg("--version").output().is_ok();
    if !up {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run these tests against Slurm: .ci/run starts it with scripts/slurm-local.sh"
        );
        eprintln!(
            "skipped: no Slurm here (sbatch/sinfo missing or no controller); start a one-node \
             cluster with `sudo scripts/slurm-local.sh start`"
        );
    }
    up
}

fn job_id(o: &Output) -> String {
    let s = text(&o.stdout);
    assert!(o.status.success(), "{s}{}", text(&o.stderr));
    s.split("submitted job ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("no job id in: {s}"))
        .to_string()
}

fn status(dir: &Path) -> String {
    let o = sequel(&["sweep", "--status", dir.to_str().unwrap()], dir);
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout)
}

fn squeue() -> String {
    Command::new("squeue")
        .args(["-r", "-t", "all"])
        .output()
        .map(|o| text(&o.stdout))
        .unwrap_or_default()
}

/// Poll `cond` every 200 ms; after `limit` fail with the queue, the sweep's status and its logs.
fn wait_for(what: &str, dir: &Path, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            let mut logs = String::new();
            if let Ok(rd) = std::fs::read_dir(dir.join(".slurm/logs")) {
                for e in rd.flatten() {
                    logs += &format!(
                        "--- {}\n{}\n",
                        e.path().display(),
                        std::fs::read_to_string(e.path()).unwrap_or_default()
                    );
                }
            }
            panic!(
                "timed out after {:?} waiting for {what}\nsqueue:\n{}\nstatus:\n{}\n{logs}",
                limit,
                squeue(),
                text(&sequel(&["sweep", "--status", dir.to_str().unwrap()], dir).stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn matrix(root: &Path, name: &str, seed: u64) -> Vec<u8> {
    let p = root.join(format!("{name}/seed-{seed}/accuracy_matrix.csv"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const MINI_ER: &str = "name: mini-er\nseed: 0\n\
    benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 100 }\n\
    model: { kind: mlp, hidden: [32] }\n\
    optimizer: { kind: sgd, lr: 0.05 }\n\
    algorithm: { name: er, buffer_size: 50 }\n";

#[test]
fn slurm_sweep_gives_the_local_results_and_compare_reads_it() {
    if !slurm_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let quick = repo().join("configs/quickstart.yaml").display().to_string();
    let er = write(tmp.path(), "mini-er.yaml", MINI_ER);
    let sweep = |extra: &[&str]| {
        let mut a = vec!["sweep", &quick, &er, "--seeds", "0..3"];
        a.extend_from_slice(extra);
        sequel(&a, tmp.path())
    };
    let slurm = tmp.path().join("slurm");
    // CUDA_VISIBLE_DEVICES stands in for what Slurm sets with a GPU gres (this cluster has no
    // GPU): the point's log must record it and say the run is on the CPU.
    let o = sweep(&[
        "--launcher",
        "slurm",
        "--max-parallel",
        "2",
        "--sbatch-arg=--export=ALL,CUDA_VISIBLE_DEVICES=0",
        "--out",
        "slurm",
    ]);
    let job = job_id(&o);
    let script = std::fs::read_to_string(slurm.join(".slurm/sweep-1.sh")).unwrap();
    assert!(script.contains("#SBATCH --array=0-5%2"), "{script}");
    // The local reference runs while the cluster works.
    let local = sweep(&["--out", "local", "--jobs", "1"]);
    assert!(local.status.success(), "{}", text(&local.stderr));
    wait_for("6 points done", &slurm, Duration::from_secs(600), || {
        status(&slurm).contains("6 points: 6 done")
    });
    for name in ["quickstart", "mini-er"] {
        for seed in 0..3 {
            assert_eq!(
                matrix(&slurm, name, seed),
                matrix(&tmp.path().join("local"), name, seed),
                "{name} seed {seed}: Slurm and local matrices differ"
            );
        }
    }
    let log = std::fs::read_to_string(slurm.join(format!(".slurm/logs/{job}_0.log"))).unwrap();
    assert!(
        log.contains("CUDA_VISIBLE_DEVICES=0")
            && log.contains("trains on the CPU (set `device: cuda`"),
        "{log}"
    );
    // compare and report read the sweep folder as a local one.
    let c = sequel(&["compare", "slurm", "--format", "csv"], tmp.path());
    let table = text(&c.stdout);
    assert!(c.status.success(), "{}", text(&c.stderr));
    assert_eq!(table.lines().count(), 3, "{table}");
    let r = sequel(&["report", "slurm", "--out", "slurm-report"], tmp.path());
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(tmp.path().join("slurm-report/report.html").is_file());
    // A finished sweep submits nothing more.
    let o = sequel(&["sweep", "--resubmit", "slurm"], tmp.path());
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("nothing to submit"),
        "{}",
        text(&o.stdout)
    );
    assert!(!slurm.join(".slurm/sweep-2.json").exists());
}

/// 5 tasks of 3000 steps (seconds each): long enough to be cancelled from outside during task 3.
const SLOW: &str = "name: slow\n\
    benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 200 }\n\
    model: { kind: mlp, hidden: [32] }\n\
    optimizer: { kind: sgd, lr: 0.05 }\n\
    training: { epochs: 150, batch_size: 10, log_every: 0 }\n\
    algorithm: { name: er, buffer_size: 50 }\n";

#[test]
fn a_cancelled_task_resumes_on_resubmit_and_status_shows_every_state() {
    if !slurm_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "slow.yaml", SLOW);
    let dir = tmp.path().join("s");
    let o = sequel(
        &[
            "sweep",
            &cfg,
            "--seeds",
            "0..2",
            "--launcher",
            "slurm",
            "--max-parallel",
            "1",
            "--sbatch-arg=--hold",
            "--out",
            "s",
        ],
        tmp.path(),
    );
    let job = job_id(&o);
    let st = status(&dir);
    assert!(
        st.contains(&format!("pending  slow seed 0  job {job}_0")),
        "{st}"
    );
    assert!(
        st.contains(&format!("pending  slow seed 1  job {job}_1")),
        "{st}"
    );
    assert!(
        st.contains("2 points: 0 done, 0 running, 2 pending, 0 failed"),
        "{st}"
    );
    let released = Command::new("scontrol")
        .args(["release", &job])
        .status()
        .unwrap();
    assert!(released.success());
    // %1: seed 0 runs, seed 1 waits for it.
    let ckpt = dir.join("slow/.seed-0.partial/checkpoints/state-2.json");
    wait_for("seed 0 past task 2", &dir, Duration::from_secs(300), || {
        ckpt.exists()
    });
    let st = status(&dir);
    assert!(
        st.contains(&format!("running  slow seed 0  job {job}_0")),
        "{st}"
    );
    assert!(
        st.contains(&format!("pending  slow seed 1  job {job}_1")),
        "{st}"
    );
    let cancel = Command::new("scancel")
        .arg(format!("{job}_0"))
        .status()
        .unwrap();
    assert!(cancel.success());
    wait_for(
        "seed 0 to show as failed",
        &dir,
        Duration::from_secs(60),
        || status(&dir).contains("failed   slow seed 0"),
    );
    let st = status(&dir);
    let line = st.lines().find(|l| l.contains("seed 0")).unwrap();
    assert!(
        line.contains(&format!(
            "job {job}_0 (CANCELLED) log {}",
            dir.join(format!(".slurm/logs/{job}_0.log")).display()
        )) && line.contains("CANCELLED AT"),
        "{st}"
    );
    assert!(
        !dir.join("slow/seed-0").exists(),
        "the task was cancelled before its run finished"
    );
    // A resumed run does not redo task 1, so it cannot write this file again.
    let marker = |d: &str| dir.join(format!("slow/{d}/checkpoints/task-1.safetensors"));
    std::fs::remove_file(marker(".seed-0.partial")).unwrap();
    // Seed 1 is still queued or running under the first job: only seed 0 goes again. Options
    // given here replace the earlier ones (else --hold would hold it again).
    let o = sequel(
        &["sweep", "--resubmit", "s", "--sbatch-arg=--requeue"],
        tmp.path(),
    );
    let job2 = job_id(&o);
    assert!(
        text(&o.stdout).contains("1 point as array task 0 "),
        "{}",
        text(&o.stdout)
    );
    let script = std::fs::read_to_string(dir.join(".slurm/sweep-2.sh")).unwrap();
    assert!(
        script.contains("#SBATCH --requeue") && !script.contains("--hold"),
        "{script}"
    );
    let st = status(&dir);
    assert!(
        st.contains(&format!("slow seed 0  job {job2}_0"))
            && st.contains(&format!("slow seed 1  job {job}_1")),
        "{st}"
    );
    wait_for("both points done", &dir, Duration::from_secs(300), || {
        status(&dir).contains("2 points: 2 done, 0 running, 0 pending, 0 failed")
    });
    assert!(
        !marker("seed-0").exists(),
        "the resubmitted point started afresh"
    );
    let local = sequel(
        &["sweep", &cfg, "--seeds", "0..2", "--out", "ref"],
        tmp.path(),
    );
    assert!(local.status.success(), "{}", text(&local.stderr));
    for seed in 0..2 {
        assert_eq!(
            matrix(&dir, "slow", seed),
            matrix(&tmp.path().join("ref"), "slow", seed),
            "seed {seed}: resumed Slurm run differs from the uninterrupted one"
        );
    }
}

#[test]
fn slurm_submission_errors_name_the_fix_and_submit_nothing() {
    if !slurm_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let quick = repo().join("configs/quickstart.yaml").display().to_string();
    let sweep = |extra: &[&str]| {
        let mut a = vec!["sweep", &quick, "--launcher", "slurm", "--out", "r"];
        a.extend_from_slice(extra);
        sequel(&a, tmp.path())
    };
    let one_line = |o: &Output, needles: &[&str]| {
        assert!(!o.status.success());
        let e = text(&o.stderr);
        assert_eq!(e.trim_end().lines().count(), 1, "one line expected:\n{e}");
        for n in needles {
            assert!(e.contains(n), "`{n}` missing in: {e}");
        }
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("r/.slurm"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("sweep-") || n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    };
    one_line(
        &sweep(&["--partition", "nope"]),
        &[
            "--partition nope",
            "no such partition",
            "debug",
            "nothing was submitted",
        ],
    );
    one_line(
        &sweep(&["--gres", "gpu:1"]),
        &[
            "--gres gpu:1",
            "no such generic resource",
            "nothing was submitted",
        ],
    );
    one_line(
        &sweep(&["--time", "soon"]),
        &["sbatch refused the job", "nothing was submitted"],
    );
    // Output the compute node cannot write (as on a node that does not see the folder): the
    // point fails before it starts, and --status says why and what to do.
    let o = sweep(&["--sbatch-arg=--hold"]);
    let job = job_id(&o);
    let dir = tmp.path().join("r");
    std::fs::remove_dir_all(dir.join(".slurm/logs")).unwrap();
    assert!(Command::new("scontrol")
        .args(["release", &job])
        .status()
        .unwrap()
        .success());
    wait_for("the point to fail", &dir, Duration::from_secs(60), || {
        status(&dir).contains("failed   quickstart seed 0")
    });
    let st = status(&dir);
    assert!(
        st.contains("no log at") && st.contains("filesystem the nodes share"),
        "{st}"
    );
}

/// What does not need a cluster: the script `--dry-run` prints, and the errors found before
/// sbatch runs.
#[test]
fn slurm_dry_run_prints_the_script_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let quick = repo().join("configs/quickstart.yaml").display().to_string();
    let o = sequel(
        &[
            "sweep",
            &quick,
            "--seeds",
            "0..3",
            "--grid",
            "optimizer.lr=0.03,0.1",
            "--launcher",
            "slurm",
            "--partition",
            "gpu",
            "--time",
            "00:10:00",
            "--cpus-per-task",
            "4",
            "--mem",
            "2G",
            "--gres",
            "gpu:1",
            "--max-parallel",
            "3",
            "--sbatch-arg=--requeue",
            "--out",
            "r",
            "--dry-run",
        ],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let s = text(&o.stdout);
    for line in [
        "#SBATCH --array=0-5%3",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=00:10:00",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=2G",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --requeue",
        "quickstart-optimizer.lr=0.1 seed 2",
        "sweep-task",
    ] {
        assert!(s.contains(line), "`{line}` missing:\n{s}");
    }
    assert!(s.contains(env!("CARGO_BIN_EXE_sequel")), "{s}");
    assert!(text(&o.stderr).contains("6 points: 0 done, 0 queued or running, 6 to submit"));
    assert!(!tmp.path().join("r").exists(), "a dry run writes nothing");
}

#[test]
fn slurm_mistakes_found_before_sbatch_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let quick = repo().join("configs/quickstart.yaml").display().to_string();
    let o = sequel(
        &["sweep", &quick, "--partition", "x", "--out", "r"],
        tmp.path(),
    );
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("--partition") && e.contains("--launcher slurm"),
        "{e}"
    );
    let o = sequel(&["sweep", "--status", "."], tmp.path());
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("holds no submitted Slurm sweep"));
    // No sbatch on PATH.
    let o = Command::new(env!("CARGO_BIN_EXE_sequel"))
        .args(["sweep", &quick, "--launcher", "slurm", "--out", "r"])
        .current_dir(tmp.path())
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(
        e.contains("`sbatch` not found on PATH") && e.contains("slurm-client"),
        "{e}"
    );
    assert!(
        std::fs::read_dir(tmp.path().join("r/.slurm"))
            .map(|rd| rd
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().starts_with("sweep-")))
            .unwrap_or(true),
        "nothing half-written"
    );
}

#[test]
fn a_requeued_task_resumes_from_its_checkpoint() {
    if !slurm_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "slow.yaml", SLOW);
    let dir = tmp.path().join("q");
    let o = sequel(
        &[
            "sweep",
            &cfg,
            "--launcher",
            "slurm",
            "--sbatch-arg=--requeue",
            "--out",
            "q",
        ],
        tmp.path(),
    );
    let job = job_id(&o);
    let partial = dir.join("slow/.seed-0.partial/checkpoints");
    wait_for("seed 0 past task 2", &dir, Duration::from_secs(300), || {
        partial.join("state-2.json").exists()
    });
    let task = format!("{job}_0");
    let scontrol = |args: &[&str]| {
        let o = Command::new("scontrol").args(args).output().unwrap();
        assert!(o.status.success(), "scontrol {args:?}: {}", text(&o.stderr));
    };
    scontrol(&["requeue", &task]);
    // Removed after the kill: the requeued task cannot write it again unless it starts afresh.
    wait_for(
        "the requeue to stop the task",
        &dir,
        Duration::from_secs(60),
        || status(&dir).contains(&format!("pending  slow seed 0  job {task}")),
    );
    std::fs::remove_file(partial.join("task-1.safetensors")).unwrap();
    // Slurm holds a requeued job back until its old credential expires (`cred_expire`, 10 s on
    // the test cluster of scripts/slurm-local.sh, 120 s by default); forcing an earlier start
    // gets the job killed ("Job credential revoked").
    wait_for(
        "the requeued point done",
        &dir,
        Duration::from_secs(300),
        || status(&dir).contains("1 points: 1 done"),
    );
    assert!(
        !dir.join("slow/seed-0/checkpoints/task-1.safetensors")
            .exists(),
        "the requeued task started afresh instead of resuming"
    );
    let log = std::fs::read_to_string(dir.join(format!(".slurm/logs/{task}.log"))).unwrap();
    assert!(log.contains("DUE TO JOB REQUEUE"), "{log}");
    let local = sequel(&["sweep", &cfg, "--out", "ref"], tmp.path());
    assert!(local.status.success(), "{}", text(&local.stderr));
    assert_eq!(
        matrix(&dir, "slow", 0),
        matrix(&tmp.path().join("ref"), "slow", 0),
        "requeued and uninterrupted matrices differ"
    );
}
