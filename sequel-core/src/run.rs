//! The run directory (design.md):
//!
//! ```text
//! <output.dir>/<name>/seed-<s>/
//!   config.yaml  accuracy_matrix.csv  metrics.csv  summary.json  train_log.csv  checkpoints/
//!   accuracy_matrix_raw.csv      (with a consolidator: the weights before consolidation)
//! ```
//!
//! A run writes into a hidden staging folder `<name>/.seed-<s>.partial` and moves it into place
//! only at the end, so a crashed run never leaves a directory that looks finished. Every file is
//! itself written to a temporary name and renamed.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};
use crate::metrics::peak_rss_mb;
use crate::outcome::RunOutcome;

pub struct RunDir {
    staging: PathBuf,
    final_dir: PathBuf,
    lock: PathBuf,
}

/// Write `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

impl RunDir {
    /// Prepare `<root>/<name>/seed-<seed>` for writing; fails early, before any training, when
    /// the location is not writable, or when something other than a run directory is where the
    /// run will go.
    pub fn create(root: &Path, name: &str, seed: u64) -> Result<Self> {
        let parent = root.join(name);
        let final_dir = parent.join(format!("seed-{seed}"));
        let staging = parent.join(format!(".seed-{seed}.partial"));
        let unwritable = |p: &Path, e: std::io::Error| {
            Error::Msg(format!(
            "output directory {} is not writable ({e}); set output.dir in the config or pass --out DIR",
            p.display()
        ))
        };
        fs::create_dir_all(&parent).map_err(|e| unwritable(&parent, e))?;
        if final_dir.exists() && !final_dir.is_dir() {
            return Err(Error::Msg(format!(
                "{} exists and is not a run directory: move it away, or pass --out DIR",
                final_dir.display()
            )));
        }
        // One writer per run directory: a second run with the same name and seed would delete
        // this one's staging folder.
        let lock = parent.join(format!(".seed-{seed}.lock"));
        take_lock(&lock, &final_dir).map_err(|e| match e {
            Error::Io { source, .. } => unwritable(&parent, source),
            e => e,
        })?;
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(|e| unwritable(&staging, e))?;
        }
        fs::create_dir_all(staging.join("checkpoints")).map_err(|e| unwritable(&staging, e))?;
        let probe = staging.join(".probe");
        fs::write(&probe, b"").map_err(|e| unwritable(&staging, e))?;
        let _ = fs::remove_file(probe);
        Ok(Self {
            staging,
            final_dir,
            lock,
        })
    }

    /// The staging folder, final folder and lock file of the run `path` names
    /// (`<name>/.seed-<s>.partial` or `<name>/seed-<s>`), if it can be resumed: an error that says
    /// why not otherwise (a finished run, no run, not a run directory name).
    fn locate(path: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let parent = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let seed = name
            .strip_prefix(".seed-")
            .and_then(|n| n.strip_suffix(".partial"))
            .or_else(|| name.strip_prefix("seed-"))
            .filter(|s| s.parse::<u64>().is_ok())
            .ok_or_else(|| {
                Error::Msg(format!(
                    "{} is not a run directory: expected <out>/<name>/.seed-N.partial (an \
                     unfinished run) or <out>/<name>/seed-N",
                    path.display()
                ))
            })?
            .to_string();
        let final_dir = parent.join(format!("seed-{seed}"));
        let staging = parent.join(format!(".seed-{seed}.partial"));
        if !staging.is_dir() {
            return Err(Error::Msg(if final_dir.join("summary.json").is_file() {
                format!(
                    "{} has finished: there is nothing to resume",
                    final_dir.display()
                )
            } else {
                format!(
                    "no unfinished run at {}: start it with `sequel run CONFIG`",
                    staging.display()
                )
            }));
        }
        if !staging.join("config.yaml").is_file() {
            return Err(Error::Msg(format!(
                "{} has no config.yaml: it is not a run `sequel run` started; start the run \
                 again with `sequel run CONFIG`",
                staging.display()
            )));
        }
        let lock = parent.join(format!(".seed-{seed}.lock"));
        Ok((staging, final_dir, lock))
    }

    /// Whether `path` names an unfinished run that `--resume` can continue (its staging folder,
    /// or that folder's final name); returns the staging folder, which holds the run's
    /// config.yaml. The error says why not (asked before the config is read).
    pub fn check_resumable(path: &Path) -> Result<PathBuf> {
        Self::locate(path).map(|(staging, _, _)| staging)
    }

    /// Reopen the staging folder of an unfinished run (`<name>/.seed-<s>.partial`, or its
    /// final name `<name>/seed-<s>` when only the staging folder exists) to continue it.
    pub fn reopen(path: &Path) -> Result<Self> {
        let (staging, final_dir, lock) = Self::locate(path)?;
        take_lock(&lock, &final_dir)?;
        Ok(Self {
            staging,
            final_dir,
            lock,
        })
    }

    /// Where files go while the run is in progress.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Where the run ends up.
    pub fn final_dir(&self) -> &Path {
        &self.final_dir
    }

    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.staging.join(rel), bytes)
    }

    /// Move the staging folder into place, replacing an earlier run of the same name and seed.
    /// The earlier run is deleted only once the new one is in place.
    pub fn finish(self) -> Result<PathBuf> {
        let old = self
            .final_dir
            .with_extension(format!("old-{}", std::process::id()));
        let had_old = self.final_dir.exists();
        if had_old {
            fs::rename(&self.final_dir, &old).map_err(|e| Error::io(&self.final_dir, e))?;
        }
        if let Err(e) = fs::rename(&self.staging, &self.final_dir) {
            if had_old {
                let _ = fs::rename(&old, &self.final_dir);
            }
            return Err(Error::io(&self.final_dir, e));
        }
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        Ok(self.final_dir.clone())
    }
}

/// The identity a lock records: our pid and the process's start time (clock ticks since boot,
/// field 22 of /proc/<pid>/stat), so that a pid reused by another program is not taken for us.
fn lock_text() -> String {
    let pid = std::process::id();
    match process_start(pid) {
        Some(start) => format!("{pid} {start}"),
        None => pid.to_string(),
    }
}

/// State and start time of process `pid` from /proc/<pid>/stat, if it exists.
fn process_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: read after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

fn process_start(pid: u32) -> Option<u64> {
    process_stat(pid).map(|(_, start)| start)
}

/// Whether the writer a lock names still runs: its process exists, is not a zombie (exited,
/// not yet reaped — as after `kill -9` of a sweep), and started when the lock says.
fn lock_holder_alive(text: &str) -> Option<u32> {
    let mut parts = text.split_whitespace();
    let pid: u32 = parts.next()?.parse().ok()?;
    let start: Option<u64> = parts.next().and_then(|s| s.parse().ok());
    let (state, actual) = process_stat(pid)?;
    let running = !matches!(state, 'Z' | 'X' | 'x') && start.is_none_or(|s| s == actual);
    running.then_some(pid)
}

/// The pid of the live process writing run `<root>/<name>/seed-<seed>`, if one is; `Some(0)` for
/// a lock created this instant whose holder has not written its identity yet (as [`take_lock`]
/// reads it), so that a second sweep waits for that run instead of counting it failed.
pub fn writer_of(root: &Path, name: &str, seed: u64) -> Option<u32> {
    let lock = root.join(name).join(format!(".seed-{seed}.lock"));
    let text = fs::read_to_string(&lock).ok()?;
    if text.trim().is_empty() {
        // Bounded, so that a lock left empty by a crash between create and write is not waited
        // for forever.
        let age = fs::metadata(&lock)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        return age
            .is_some_and(|a| a < std::time::Duration::from_secs(10))
            .then_some(0);
    }
    lock_holder_alive(&text).filter(|&p| p != std::process::id())
}

/// Write our identity into `lock`, unless a live process holds it. A lock left by a process
/// that no longer runs (gone, a zombie, or its pid now another program's) is taken over.
fn take_lock(lock: &Path, final_dir: &Path) -> Result<()> {
    use std::io::Write as _;
    // `create_new` makes taking the lock atomic: of two runs starting together, one gets
    // `AlreadyExists`. A lock whose holder is gone (or is this process) is removed and taken again.
    for _ in 0..2 {
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(lock)
        {
            Ok(mut f) => {
                return f
                    .write_all(lock_text().as_bytes())
                    .map_err(|e| Error::io(lock, e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(lock).unwrap_or_default();
                // An empty lock is one being written this instant: its holder is alive.
                let holder = if text.trim().is_empty() {
                    Some(0)
                } else {
                    lock_holder_alive(&text).filter(|&p| p != std::process::id())
                };
                if let Some(pid) = holder {
                    let who = match pid {
                        0 => "another run".to_string(),
                        p => format!("another run (pid {p})"),
                    };
                    return Err(Error::Msg(format!(
                        "{who} is writing {}; wait for it, or delete {} if that process is gone",
                        final_dir.display(),
                        lock.display()
                    )));
                }
                fs::remove_file(lock).map_err(|e| Error::io(lock, e))?;
            }
            Err(e) => return Err(Error::io(lock, e)),
        }
    }
    Err(Error::Msg(format!(
        "could not take {}: another run keeps taking it",
        lock.display()
    )))
}

/// Facts about the run recorded in summary.json.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub name: String,
    pub seed: u64,
    pub algorithm: String,
    pub consolidation: Option<String>,
    pub git_hash: Option<String>,
    pub threads: usize,
    /// `cpu` or `cuda:N`.
    pub device: crate::device::DeviceSpec,
    pub wall_s: f64,
    /// The protocol choices that move numbers (protocols.md §4), recorded explicitly.
    pub protocol: serde_json::Value,
}

/// Name, driver and CUDA version of a CUDA run's GPU, as `nvidia-smi` reports them (null on the
/// CPU or where nvidia-smi is missing).
fn gpu_facts(device: crate::device::DeviceSpec) -> serde_json::Value {
    let crate::device::DeviceSpec::Cuda(n) = device else {
        return serde_json::Value::Null;
    };
    let query = |what: &str| -> Option<String> {
        let out = std::process::Command::new("nvidia-smi")
            .args([
                &format!("--query-gpu={what}"),
                "--format=csv,noheader",
                "-i",
                &n.to_string(),
            ])
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        out.status.success().then(|| text.trim().to_string())
    };
    let cuda = std::process::Command::new("nvidia-smi")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| {
            let rest = t.split("CUDA Version:").nth(1)?;
            rest.split_whitespace().next().map(str::to_string)
        });
    json!({ "name": query("name"), "driver": query("driver_version"), "cuda": cuda })
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// metrics.csv: one row per finished task. With a consolidator, three more columns describe the
/// trained weights before consolidation (the raw matrix).
pub fn metrics_csv(outcome: &RunOutcome) -> String {
    let mut s = String::from(
        "task,avg_acc,avg_acc_pooled,avg_inc_acc,learning_acc,forgetting,forgetting_chaudhry,bwt,fwt,train_s,eval_s,peak_rss_mb",
    );
    if outcome.raw.is_some() {
        s.push_str(",avg_acc_raw,learning_acc_raw,forgetting_raw");
    }
    // Only runs with a pre-training task (`benchmark.base_classes`) have a control task.
    let control = outcome.control.as_ref();
    if control.is_some() {
        s.push_str(",control_acc");
        if outcome.raw.is_some() {
            s.push_str(",control_acc_raw");
        }
    }
    if let Some(key) = &outcome.chosen_key {
        let _ = write!(s, ",{key}");
    }
    if outcome.independent {
        s.push_str(",normalized_acc");
    }
    let realtime = !outcome.realtime.is_empty();
    if realtime {
        s.push_str(",online_acc,batches,trained,step_cost,step_ms");
    }
    s.push('\n');
    for (i, t) in outcome.times.iter().enumerate() {
        let m = outcome.matrix.metrics_after(i + 1);
        let _ = write!(
            s,
            "{},{:.6},{:.6},{:.6},{:.6},{},{},{},{},{:.3},{:.3},{}",
            m.task,
            m.avg_acc,
            m.avg_acc_pooled,
            m.avg_inc_acc,
            m.learning_acc,
            opt(m.forgetting),
            opt(m.forgetting_chaudhry),
            opt(m.bwt),
            opt(m.fwt),
            t.train_s,
            t.eval_s,
            t.peak_rss_mb.map(|v| format!("{v:.1}")).unwrap_or_default()
        );
        if let Some(raw) = &outcome.raw {
            let r = raw.metrics_after(i + 1);
            let _ = write!(
                s,
                ",{:.6},{:.6},{}",
                r.avg_acc,
                r.learning_acc,
                opt(r.forgetting)
            );
        }
        if let Some(c) = control {
            let _ = write!(s, ",{}", opt(c.after.get(i).copied()));
            if outcome.raw.is_some() {
                let _ = write!(s, ",{}", opt(c.after_raw.get(i).copied()));
            }
        }
        if outcome.chosen_key.is_some() {
            let _ = write!(s, ",{}", opt(outcome.chosen.get(i).copied()));
        }
        if outcome.independent {
            let _ = write!(s, ",{}", opt(outcome.normalized_acc(i + 1)));
        }
        if realtime {
            let r = outcome.realtime.get(i).copied().unwrap_or_default();
            let _ = write!(
                s,
                ",{},{},{},{},{}",
                opt(r.online_acc()),
                r.batches,
                r.trained,
                opt(r.mean_cost()),
                r.mean_step_ms()
                    .map(|v| format!("{v:.3}"))
                    .unwrap_or_default()
            );
        }
        s.push('\n');
    }
    s
}

/// train_log.csv: the sampled steps.
pub fn train_log_csv(outcome: &RunOutcome) -> String {
    let mut s = String::from("task,epoch,step,loss,batch_acc,lr\n");
    for r in &outcome.log {
        let _ = writeln!(
            s,
            "{},{},{},{:.6},{:.4},{}",
            r.task, r.epoch, r.step, r.loss, r.batch_acc, r.lr
        );
    }
    s
}

pub fn summary_json(outcome: &RunOutcome, info: &RunInfo) -> serde_json::Value {
    let done = outcome.matrix.rows.len();
    let last = (done > 0).then(|| outcome.matrix.metrics_after(done));
    let status = match &outcome.failure {
        None => "completed".to_string(),
        Some(e) => format!("failed: {e}"),
    };
    let mut v = json!({
        "name": info.name,
        "status": status,
        "seed": info.seed,
        "algorithm": info.algorithm,
        "consolidation": info.consolidation,
        "tasks_total": outcome.matrix.num_tasks(),
        "tasks_completed": done,
        "final": last,
        "train_s": outcome.times.iter().map(|t| t.train_s).sum::<f64>(),
        "eval_s": outcome.init_eval_s + outcome.times.iter().map(|t| t.eval_s).sum::<f64>(),
        "steps": outcome.times.iter().map(|t| t.steps).sum::<usize>(),
        "wall_s": info.wall_s,
        "peak_rss_mb": peak_rss_mb(),
        "protocol": info.protocol,
        "versions": {
            "sequel": env!("CARGO_PKG_VERSION"),
            "git": info.git_hash,
        },
        "machine": {
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "threads": info.threads,
            "device": info.device.to_string(),
            "gpu": gpu_facts(info.device),
            "cpu_model": cpu_model(),
            "memory_mb": mem_total_mb(),
        },
    });
    // Only runs with a consolidator have a raw matrix; others keep their exact keys.
    if let (Some(raw), Some(map)) = (&outcome.raw, v.as_object_mut()) {
        let last_raw = (done > 0).then(|| raw.metrics_after(done));
        map.insert("final_raw".into(), json!(last_raw));
    }
    if let (true, Some(map)) = (outcome.independent, v.as_object_mut()) {
        map.insert(
            "normalized".into(),
            json!({
                "acc": (done > 0).then(|| outcome.normalized_acc(done)),
                "per_task": (done > 0).then(|| outcome.normalized_after(done)),
            }),
        );
    }
    if let (false, Some(map)) = (outcome.realtime.is_empty(), v.as_object_mut()) {
        let r = &outcome.realtime;
        let sum = |f: fn(&crate::outcome::RealTimeTask) -> f64| r.iter().map(f).sum::<f64>();
        let trained = r.iter().map(|t| t.trained).sum::<usize>();
        map.insert(
            "realtime".into(),
            json!({
                "online_acc": outcome.online_acc(r.len()),
                "batches": r.iter().map(|t| t.batches).sum::<usize>(),
                "trained": trained,
                "step_cost": (trained > 0).then(|| sum(|t| t.cost_sum) / trained as f64),
                "step_ms": (trained > 0).then(|| 1e3 * sum(|t| t.step_s) / trained as f64),
            }),
        );
    }
    if let (Some(c), Some(map)) = (&outcome.control, v.as_object_mut()) {
        map.insert(
            "control".into(),
            json!({
                "init": c.init,
                "pretrained": c.pretrained,
                "final": c.after.last(),
                "final_raw": c.after_raw.last(),
                "count": c.count,
                "train_s": c.train_s,
                "steps": c.steps,
            }),
        );
    }
    v
}

/// control.csv (runs with `benchmark.base_classes`): the control task's accuracy in percent
/// before pre-training (`init`), after it (`pretrain`) and after each stream task, of the
/// evaluated weights and, with a consolidator, of the trained ones (`control_acc_raw`).
pub fn control_csv(outcome: &RunOutcome) -> Option<String> {
    let c = outcome.control.as_ref()?;
    let raw = outcome.raw.is_some();
    let mut s = String::from("after_task,control_acc");
    if raw {
        s.push_str(",control_acc_raw");
    }
    s.push('\n');
    let pct = |v: f64| format!("{:.4}", v * 100.0);
    for (name, v) in [("init", c.init), ("pretrain", c.pretrained)] {
        let _ = write!(s, "{name},{}", pct(v));
        if raw {
            let _ = write!(s, ",{}", pct(v));
        }
        s.push('\n');
    }
    for (i, v) in c.after.iter().enumerate() {
        let _ = write!(s, "{},{}", i + 1, pct(*v));
        if let Some(r) = c.after_raw.get(i).filter(|_| raw) {
            let _ = write!(s, ",{}", pct(*r));
        }
        s.push('\n');
    }
    Some(s)
}

/// Write every result file of `outcome` into the run's staging folder.
pub fn write_results(
    dir: &RunDir,
    config_yaml: &str,
    outcome: &RunOutcome,
    info: &RunInfo,
) -> Result<()> {
    dir.write("config.yaml", config_yaml.as_bytes())?;
    dir.write("accuracy_matrix.csv", outcome.matrix.to_csv().as_bytes())?;
    if let Some(raw) = &outcome.raw {
        dir.write("accuracy_matrix_raw.csv", raw.to_csv().as_bytes())?;
    }
    if let Some(control) = control_csv(outcome) {
        dir.write("control.csv", control.as_bytes())?;
    }
    dir.write("metrics.csv", metrics_csv(outcome).as_bytes())?;
    dir.write("train_log.csv", train_log_csv(outcome).as_bytes())?;
    let mut summary = serde_json::to_string_pretty(&summary_json(outcome, info))
        .map_err(|e| Error::msg(format!("summary.json: {e}")))?;
    summary.push('\n');
    dir.write("summary.json", summary.as_bytes())
}

fn cpu_model() -> Option<String> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn mem_total_mb() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024)
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_replaces_an_earlier_run_and_a_live_lock_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = RunDir::create(tmp.path(), "r", 0).unwrap();
        d.write("a.txt", b"first").unwrap();
        let path = d.finish().unwrap();
        let d = RunDir::create(tmp.path(), "r", 0).unwrap();
        d.write("a.txt", b"second").unwrap();
        assert_eq!(d.finish().unwrap(), path);
        assert_eq!(fs::read(path.join("a.txt")).unwrap(), b"second");
        let names: Vec<String> = fs::read_dir(tmp.path().join("r"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            vec!["seed-0".to_string()],
            "no leftovers, lock released"
        );
        // A lock held by a live process (pid 1 always exists) blocks a second writer.
        fs::write(tmp.path().join("r/.seed-0.lock"), "1").unwrap();
        let e = RunDir::create(tmp.path(), "r", 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("another run (pid 1)"), "{e}");
        fs::remove_file(tmp.path().join("r/.seed-0.lock")).unwrap();
    }

    #[test]
    fn a_lock_being_written_counts_as_held_for_a_while() {
        // Created by `create_new`, identity not yet written: a second sweep must wait for it
        // (it failed such a point in CI once), but not forever if its writer died right there.
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("r")).unwrap();
        let lock = tmp.path().join("r/.seed-0.lock");
        let f = fs::File::create(&lock).unwrap();
        assert_eq!(writer_of(tmp.path(), "r", 0), Some(0));
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        f.set_modified(old).unwrap();
        assert_eq!(writer_of(tmp.path(), "r", 0), None);
        assert_eq!(writer_of(tmp.path(), "r", 1), None, "no lock, no writer");
    }

    #[test]
    fn a_lock_of_a_zombie_or_of_another_program_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let lock = tmp.path().join("r/.seed-0.lock");
        fs::create_dir_all(tmp.path().join("r")).unwrap();
        // A child that has exited but is not reaped yet: a zombie, as after `kill -9`.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_stat(pid).map(|(s, _)| s) != Some('Z') {
            assert!(
                std::time::Instant::now() < deadline,
                "child never became a zombie"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        fs::write(&lock, pid.to_string()).unwrap();
        let d = RunDir::create(tmp.path(), "r", 0).expect("a zombie holds no lock");
        drop(d);
        child.wait().unwrap();
        // pid 1 runs, but it is not the process that wrote the lock (another start time).
        let start = process_start(1).unwrap();
        fs::write(&lock, format!("1 {}", start + 1)).unwrap();
        let d = RunDir::create(tmp.path(), "r", 0).expect("a reused pid holds no lock");
        // The lock now names this process with its start time.
        let text = fs::read_to_string(&lock).unwrap();
        assert_eq!(
            text,
            format!(
                "{} {}",
                std::process::id(),
                process_start(std::process::id()).unwrap()
            )
        );
        drop(d);
    }
}
