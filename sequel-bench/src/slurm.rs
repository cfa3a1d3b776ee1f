//! `sequel sweep --launcher slurm`: a sweep as Slurm job arrays.
//!
//! Every submission writes, under `<out>/.slurm/`, a manifest `sweep-<n>.json` (all points of the
//! sweep, the array indices submitted, the options and, once sbatch accepted it, the job id) and
//! the job-array script `sweep-<n>.sh`. Array index `i` is point `i` of the manifest; its task
//! runs `sequel sweep-task MANIFEST i`, which runs the point through the same `sequel run` child
//! as a local sweep, so run directories, locks and checkpoints are the same and a requeued or
//! resubmitted task resumes from its newest checkpoint. Slurm's output of task `J_i` goes to
//! `<out>/.slurm/logs/J_i.log`.
//!
//! The queue is read with `squeue` only: the one-node test cluster has no accounting database,
//! so `sacct` is not available, and Slurm keeps finished jobs visible for `MinJobAge` seconds.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use sequel_algos::run::prepare;
use sequel_algos::Registry;
use sequel_core::sweep::{is_finished, SweepPoint};

/// The sbatch options of a Slurm sweep. Given with `--resubmit`, they replace the ones the sweep
/// was submitted with (e.g. a longer `--time` after a timeout).
#[derive(clap::Args, Debug, Clone, Default, Serialize, Deserialize)]
pub struct SlurmArgs {
    /// With --launcher slurm: the partition (default: the cluster's default partition).
    #[arg(long, value_name = "P")]
    pub partition: Option<String>,
    /// With --launcher slurm: the time limit of each point, e.g. 02:00:00.
    #[arg(long, value_name = "HH:MM:SS")]
    pub time: Option<String>,
    /// With --launcher slurm: CPUs per point (convolutional models use them all; MLPs use one).
    #[arg(long, value_name = "N")]
    pub cpus_per_task: Option<usize>,
    /// With --launcher slurm: memory per point, e.g. 4G.
    #[arg(long, value_name = "M")]
    pub mem: Option<String>,
    /// With --launcher slurm: generic resources per point, e.g. gpu:1 (recorded in the point's
    /// log; sequel has no GPU backend yet, so the point still trains on the CPU).
    #[arg(long, value_name = "GRES")]
    pub gres: Option<String>,
    /// With --launcher slurm: at most K points running at once (the array's %K).
    #[arg(long, value_name = "K")]
    pub max_parallel: Option<usize>,
    /// With --launcher slurm: one more sbatch option for the script, e.g. --sbatch-arg=--requeue
    /// (repeatable).
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sbatch_arg: Vec<String>,
}

impl SlurmArgs {
    /// The first option given, as its flag, to refuse Slurm options on a local sweep.
    pub fn first_given(&self) -> Option<&'static str> {
        [
            (self.partition.is_some(), "--partition"),
            (self.time.is_some(), "--time"),
            (self.cpus_per_task.is_some(), "--cpus-per-task"),
            (self.mem.is_some(), "--mem"),
            (self.gres.is_some(), "--gres"),
            (self.max_parallel.is_some(), "--max-parallel"),
            (!self.sbatch_arg.is_empty(), "--sbatch-arg"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    /// `self` with every option given in `newer` replaced.
    fn updated(&self, newer: &SlurmArgs) -> SlurmArgs {
        SlurmArgs {
            partition: newer.partition.clone().or_else(|| self.partition.clone()),
            time: newer.time.clone().or_else(|| self.time.clone()),
            cpus_per_task: newer.cpus_per_task.or(self.cpus_per_task),
            mem: newer.mem.clone().or_else(|| self.mem.clone()),
            gres: newer.gres.clone().or_else(|| self.gres.clone()),
            max_parallel: newer.max_parallel.or(self.max_parallel),
            sbatch_arg: if newer.sbatch_arg.is_empty() {
                self.sbatch_arg.clone()
            } else {
                newer.sbatch_arg.clone()
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Point {
    config: PathBuf,
    overrides: Vec<String>,
    name: String,
    seed: u64,
}

impl Point {
    fn sweep_point(&self) -> SweepPoint {
        SweepPoint {
            config: self.config.clone(),
            overrides: self.overrides.clone(),
            name: self.name.clone(),
            seed: self.seed,
        }
    }
}

/// One submission: written before sbatch runs, completed with the job id once it accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    out: PathBuf,
    exe: PathBuf,
    options: SlurmArgs,
    points: Vec<Point>,
    array: Vec<usize>,
    job_id: Option<String>,
}

fn slurm_dir(out: &Path) -> PathBuf {
    out.join(".slurm")
}

fn log_path(out: &Path, job: &str, index: usize) -> PathBuf {
    slurm_dir(out)
        .join("logs")
        .join(format!("{job}_{index}.log"))
}

/// The submissions under `out`, oldest first, as (number, manifest).
fn manifests(out: &Path) -> Result<Vec<(usize, Manifest)>> {
    let dir = slurm_dir(out);
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(found);
    };
    for e in entries {
        let name = e?.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix("sweep-")
            .and_then(|r| r.strip_suffix(".json"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let path = dir.join(&name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let m: Manifest = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; delete it if that submission is gone",
                path.display()
            )
        })?;
        found.push((n, m));
    }
    found.sort_by_key(|(n, _)| *n);
    Ok(found)
}

/// Array tasks Slurm still knows: `"<job>_<index>"` → (state, reason).
fn queue() -> Result<HashMap<String, (String, String)>> {
    let o = Command::new("squeue")
        .args(["-h", "-r", "-t", "all", "-o", "%i|%T|%r"])
        .output()
        .map_err(|e| missing_tool("squeue", e))?;
    if !o.status.success() {
        bail!(
            "squeue failed: {}; is the Slurm controller up (`sinfo`)?",
            last_line(&String::from_utf8_lossy(&o.stderr))
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, '|');
            Some((
                f.next()?.to_string(),
                (f.next()?.to_string(), f.next().unwrap_or("").to_string()),
            ))
        })
        .collect())
}

fn missing_tool(tool: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "`{tool}` not found on PATH: run this on a Slurm login node (or install \
             slurm-client), or drop --launcher slurm to run the sweep on this machine"
        )
    } else {
        anyhow::anyhow!("cannot run `{tool}`: {e}")
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

fn active(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "CONFIGURING"
            | "RUNNING"
            | "COMPLETING"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SUSPENDED"
            | "STAGE_OUT"
            | "SIGNALING"
    )
}

/// Where a point stands.
enum State {
    Done,
    Running(String),
    Pending(Option<String>),
    Failed { task: String, detail: String },
}

/// Every submitted array task per point (name, seed), oldest first.
type Tasks = HashMap<(String, u64), Vec<(String, usize)>>;

fn tasks(subs: &[(usize, Manifest)]) -> Tasks {
    let mut t: Tasks = HashMap::new();
    for (_, m) in subs {
        let Some(job) = &m.job_id else { continue };
        for &i in &m.array {
            if let Some(p) = m.points.get(i) {
                t.entry((p.name.clone(), p.seed))
                    .or_default()
                    .push((job.clone(), i));
            }
        }
    }
    t
}

fn state_of(
    out: &Path,
    p: &Point,
    tasks: &Tasks,
    queue: &HashMap<String, (String, String)>,
) -> State {
    if is_finished(out, &p.name, p.seed) {
        return State::Done;
    }
    let Some(list) = tasks.get(&(p.name.clone(), p.seed)) else {
        return State::Pending(None);
    };
    // A task still in the queue wins over older or newer finished ones.
    for (job, i) in list.iter().rev() {
        let id = format!("{job}_{i}");
        if let Some((s, _)) = queue.get(&id) {
            match s.as_str() {
                "RUNNING" | "COMPLETING" | "STAGE_OUT" | "SIGNALING" => return State::Running(id),
                s if active(s) => return State::Pending(Some(id)),
                _ => {}
            }
        }
    }
    let Some((job, i)) = list.last() else {
        return State::Pending(None);
    };
    let id = format!("{job}_{i}");
    let (slurm_state, reason) = queue
        .get(&id)
        .map(|(s, r)| (s.as_str(), r.as_str()))
        .unwrap_or(("", ""));
    let log = log_path(out, job, *i);
    let detail = match std::fs::read_to_string(&log) {
        Ok(text) => {
            // The last error is the latest attempt's: the run's own, or Slurm's verdict
            // (`slurmstepd: error: *** JOB 7 ON node CANCELLED AT ... ***`, a time limit).
            let why = text
                .lines()
                .rev()
                .find(|l| l.to_ascii_lowercase().contains("error"))
                .map(|l| l.trim().to_string())
                .unwrap_or_else(|| last_line(&text));
            let state = if slurm_state.is_empty() {
                String::new()
            } else {
                format!(" ({slurm_state})")
            };
            format!("{state} log {}: {why}", log.display())
        }
        Err(_) => format!(
            " ({}) no log at {}: the compute node could not write it, so it cannot see {}; put \
             the sweep folder (--out) on a filesystem the nodes share, then --resubmit",
            if reason.is_empty() {
                "not in the queue"
            } else {
                reason
            },
            log.display(),
            out.display()
        ),
    };
    State::Failed { task: id, detail }
}

/// `sequel sweep CONFIG... --launcher slurm`: submit the unfinished points of `points` as one job
/// array (or, with `dry_run`, print the script and submit nothing).
///
/// Errors: sbatch missing or refusing the job (a missing partition or gres is named with the
/// fix); an output path Slurm cannot carry; another submission in progress.
pub fn submit(out: &Path, points: &[SweepPoint], opts: &SlurmArgs, dry_run: bool) -> Result<()> {
    let out = std::path::absolute(out)
        .with_context(|| format!("--out {}: cannot make it absolute", out.display()))?;
    let points = points
        .iter()
        .map(|p| {
            Ok(Point {
                config: std::fs::canonicalize(&p.config)
                    .with_context(|| format!("cannot read config {}", p.config.display()))?,
                overrides: p.overrides.clone(),
                name: p.name.clone(),
                seed: p.seed,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    submit_points(&out, points, opts.clone(), dry_run)
}

/// `sequel sweep --resubmit DIR`: submit the points of the sweep in DIR that are neither finished
/// nor still queued or running, with the options of its last submission updated by `opts`.
///
/// Errors: DIR holds no Slurm sweep; as for [`submit`].
pub fn resubmit(dir: &Path, opts: &SlurmArgs, dry_run: bool) -> Result<()> {
    let dir = std::path::absolute(dir)
        .with_context(|| format!("--resubmit {}: cannot make it absolute", dir.display()))?;
    let Some((_, last)) = manifests(&dir)?
        .into_iter()
        .rev()
        .find(|(_, m)| m.job_id.is_some())
    else {
        bail!(
            "{} holds no submitted Slurm sweep (no .slurm/sweep-N.json with a job id): submit \
             one with `sequel sweep CONFIG... --launcher slurm --out {}`",
            dir.display(),
            dir.display()
        );
    };
    submit_points(&dir, last.points, last.options.updated(opts), dry_run)
}

fn check_path(what: &str, p: &Path) -> Result<()> {
    let s = p.display().to_string();
    if s.contains(char::is_whitespace) || s.contains('%') {
        bail!(
            "{what} {s}: a path with spaces or `%` cannot be written in an #SBATCH line; use a \
             folder without them"
        );
    }
    Ok(())
}

fn submit_points(out: &Path, points: Vec<Point>, opts: SlurmArgs, dry_run: bool) -> Result<()> {
    check_path("--out", out)?;
    if opts.max_parallel == Some(0) || opts.cpus_per_task == Some(0) {
        bail!("--max-parallel and --cpus-per-task must be at least 1");
    }
    if let Some(a) = opts.sbatch_arg.iter().find(|a| !a.starts_with('-')) {
        bail!("--sbatch-arg `{a}`: expected an sbatch option such as --requeue or --account=NAME");
    }
    let exe = std::env::current_exe().context("cannot find the sequel executable")?;
    let subs = manifests(out)?;
    let tasks = tasks(&subs);
    // Nothing is submitted twice: points still queued or running from an earlier submission are
    // left to it. Without earlier submissions there is nothing to ask Slurm.
    let queue = if tasks.is_empty() {
        HashMap::new()
    } else {
        queue()?
    };
    let (mut done, mut queued, mut todo) = (0, 0, Vec::new());
    for (i, p) in points.iter().enumerate() {
        match state_of(out, p, &tasks, &queue) {
            State::Done => done += 1,
            State::Running(_) | State::Pending(Some(_)) => queued += 1,
            _ => todo.push(i),
        }
    }
    let n = subs.last().map_or(1, |(n, _)| n + 1);
    let manifest_path = slurm_dir(out).join(format!("sweep-{n}.json"));
    let script_path = slurm_dir(out).join(format!("sweep-{n}.sh"));
    let summary = format!(
        "{} points: {done} done, {queued} queued or running, {} to submit",
        points.len(),
        todo.len()
    );
    if todo.is_empty() {
        say!(
            "{summary}; nothing to submit (see `sequel sweep --status {}`)",
            out.display()
        );
        return Ok(());
    }
    let m = Manifest {
        out: out.to_path_buf(),
        exe: exe.clone(),
        options: opts,
        points,
        array: todo,
        job_id: None,
    };
    let script = render_script(&m, &manifest_path)?;
    if dry_run {
        say!("{}", script.trim_end());
        eprintln!("{summary} (dry run: nothing written or submitted)");
        return Ok(());
    }
    std::fs::create_dir_all(slurm_dir(out).join("logs"))
        .with_context(|| format!("cannot create {}", slurm_dir(out).join("logs").display()))?;
    let _lock = SubmitLock::take(&slurm_dir(out).join("submit.lock"))?;
    let write = |path: &Path, text: &str| {
        sequel_core::run::write_atomic(path, text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write(&manifest_path, &serde_json::to_string_pretty(&m)?)?;
    write(&script_path, &script)?;
    let forget = || {
        let _ = std::fs::remove_file(&manifest_path);
        let _ = std::fs::remove_file(&script_path);
    };
    let job = match sbatch(&script_path, &m.options) {
        Ok(job) => job,
        Err(e) => {
            forget();
            return Err(e);
        }
    };
    let m = Manifest {
        job_id: Some(job.clone()),
        ..m
    };
    write(&manifest_path, &serde_json::to_string_pretty(&m)?)?;
    say!(
        "submitted job {job}: {} point{} as array task{} {} ({summary}); script {}; follow \
         with `sequel sweep --status {}`",
        m.array.len(),
        if m.array.len() == 1 { "" } else { "s" },
        if m.array.len() == 1 { "" } else { "s" },
        array_spec(&m.array),
        script_path.display(),
        out.display()
    );
    Ok(())
}

/// Run sbatch on the script; the job id, or an error that names the fix. Nothing is queued when
/// this fails.
fn sbatch(script: &Path, opts: &SlurmArgs) -> Result<String> {
    let o = Command::new("sbatch")
        .arg("--parsable")
        .arg(script)
        .output()
        .map_err(|e| missing_tool("sbatch", e))?;
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        let lower = err.to_ascii_lowercase();
        if lower.contains("invalid partition") {
            let known = Command::new("sinfo")
                .args(["-h", "-o", "%R"])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            bail!(
                "--partition {}: no such partition on this cluster (it has: {known}); nothing \
                 was submitted",
                opts.partition.as_deref().unwrap_or("(default)")
            );
        }
        if lower.contains("generic resource") || lower.contains("gres") {
            bail!(
                "--gres {}: the cluster has no such generic resource (`sinfo -o %G` lists what \
                 nodes offer); nothing was submitted",
                opts.gres.as_deref().unwrap_or("(none)")
            );
        }
        bail!(
            "sbatch refused the job: {}; fix the option it names, nothing was submitted",
            last_line(&err)
        );
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let id = stdout
        .trim()
        .split(';')
        .next()
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("sbatch printed no job id (stdout `{}`)", stdout.trim()))?;
    Ok(id.to_string())
}

/// Refuses a second submission into the same folder at the same time: both would see the same
/// points unqueued and submit them twice.
struct SubmitLock(PathBuf);

impl SubmitLock {
    fn take(path: &Path) -> Result<Self> {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(mut f) => {
                let _ = write!(f, "{}", std::process::id());
                Ok(Self(path.to_path_buf()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                "another submission into this sweep is in progress; if none is, delete {}",
                path.display()
            ),
            Err(e) => Err(e).with_context(|| format!("cannot create {}", path.display())),
        }
    }
}

impl Drop for SubmitLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `0-3,5,7-8`: Slurm's array syntax for sorted indices.
fn array_spec(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let mut j = i;
        while j + 1 < indices.len() && indices[j + 1] == indices[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            indices[i].to_string()
        } else {
            format!("{}-{}", indices[i], indices[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn render_script(m: &Manifest, manifest_path: &Path) -> Result<String> {
    check_path("the sequel executable", &m.exe)?;
    let o = &m.options;
    let mut s = String::from("#!/bin/bash\n");
    let mut opt = |line: String| {
        s.push_str("#SBATCH ");
        s.push_str(&line);
        s.push('\n');
    };
    let folder = m
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    opt(format!("--job-name=sequel-{folder}"));
    let mut array = array_spec(&m.array);
    if let Some(k) = o.max_parallel {
        array.push_str(&format!("%{k}"));
    }
    opt(format!("--array={array}"));
    opt(format!(
        "--output={}/logs/%A_%a.log",
        slurm_dir(&m.out).display()
    ));
    // A requeued task appends to the log of its earlier attempt instead of erasing it.
    opt("--open-mode=append".into());
    opt(format!("--chdir={}", m.out.display()));
    if let Some(p) = &o.partition {
        opt(format!("--partition={p}"));
    }
    if let Some(t) = &o.time {
        opt(format!("--time={t}"));
    }
    if let Some(c) = o.cpus_per_task {
        opt(format!("--cpus-per-task={c}"));
    }
    if let Some(mem) = &o.mem {
        opt(format!("--mem={mem}"));
    }
    if let Some(g) = &o.gres {
        opt(format!("--gres={g}"));
    }
    for a in &o.sbatch_arg {
        opt(a.clone());
    }
    s.push_str(&format!(
        "#\n# sequel sweep into {}: array index -> point\n",
        m.out.display()
    ));
    for &i in &m.array {
        let p = &m.points[i];
        s.push_str(&format!(
            "#   {i:>4}  {} seed {}  ({}{}{})\n",
            p.name,
            p.seed,
            p.config.display(),
            if p.overrides.is_empty() { "" } else { " " },
            p.overrides.join(" ")
        ));
    }
    s.push_str(
        "# Each task runs its point with `sequel run`, resuming from the point's newest\n\
         # checkpoint, so a requeued or resubmitted task continues where it stopped.\n",
    );
    s.push_str(&format!(
        "exec {} sweep-task {} \"$SLURM_ARRAY_TASK_ID\"\n",
        shell_quote(&m.exe.display().to_string()),
        shell_quote(&manifest_path.display().to_string())
    ));
    Ok(s)
}

/// `sequel sweep --status DIR`: one line per point (done, running, pending, failed with its log
/// and the error's last line), then the counts.
///
/// Errors: DIR holds no Slurm sweep; squeue missing or failing.
pub fn status(dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir)
        .with_context(|| format!("--status {}: cannot make it absolute", dir.display()))?;
    let subs = manifests(&dir)?;
    let Some((_, last)) = subs.iter().rev().find(|(_, m)| m.job_id.is_some()) else {
        bail!(
            "{} holds no submitted Slurm sweep (no .slurm/sweep-N.json with a job id); a local \
             sweep's state is shown by `sequel sweep CONFIG... --out {} --dry-run`",
            dir.display(),
            dir.display()
        );
    };
    let tasks = tasks(&subs);
    let queue = queue()?;
    let (mut done, mut running, mut pending, mut failed) = (0, 0, 0, 0);
    let mut out = std::io::stdout().lock();
    for p in &last.points {
        let what = format!("{} seed {}", p.name, p.seed);
        let line = match state_of(&dir, p, &tasks, &queue) {
            State::Done => {
                done += 1;
                format!("done     {what}")
            }
            State::Running(id) => {
                running += 1;
                format!("running  {what}  job {id}")
            }
            State::Pending(Some(id)) => {
                pending += 1;
                format!("pending  {what}  job {id}")
            }
            State::Pending(None) => {
                pending += 1;
                format!("pending  {what}  not submitted (sequel sweep --resubmit)")
            }
            State::Failed { task, detail } => {
                failed += 1;
                format!("failed   {what}  job {task}{detail}")
            }
        };
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "{} points: {done} done, {running} running, {pending} pending, {failed} failed{}",
        last.points.len(),
        if failed > 0 {
            format!(
                "; `sequel sweep --resubmit {}` runs them again",
                dir.display()
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `sequel sweep-task MANIFEST INDEX`, what array task INDEX runs: point INDEX of the manifest,
/// by replacing this process with its `sequel run`, resuming it when it has a checkpoint. Its
/// output goes to the task's log. Returns only on an error.
///
/// Errors: the manifest is not readable on this node (the sweep folder is not shared with it);
/// the index is not in the manifest; the run fails.
pub fn task(registry: &Registry, manifest: &Path, index: usize) -> Result<()> {
    let host = std::env::var("SLURMD_NODENAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "this node".into());
    let text = std::fs::read_to_string(manifest).with_context(|| {
        format!(
            "cannot read {} on {host}: the compute nodes must see the sweep folder; put --out on \
             a filesystem they share",
            manifest.display()
        )
    })?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged", manifest.display()))?;
    let p = m
        .points
        .get(index)
        .with_context(|| {
            format!(
                "array index {index} is not a point of {} ({} points)",
                manifest.display(),
                m.points.len()
            )
        })?
        .sweep_point();
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
    eprintln!(
        "sequel sweep-task: {} seed {} as job {}_{} on {host}, {} CPUs",
        p.name,
        p.seed,
        env("SLURM_ARRAY_JOB_ID"),
        env("SLURM_ARRAY_TASK_ID"),
        std::env::var("SLURM_CPUS_PER_TASK").unwrap_or_else(|_| env("SLURM_JOB_CPUS_PER_NODE"))
    );
    if is_finished(&m.out, &p.name, p.seed) {
        eprintln!("sequel sweep-task: already finished, nothing to do");
        return Ok(());
    }
    let (text, origin) = crate::read_config(&p.config)?;
    let prepared = prepare(&text, &origin, &p.all_overrides(), registry)?;
    if m.options.gres.is_some() || std::env::var_os("CUDA_VISIBLE_DEVICES").is_some() {
        // Slurm numbers the GPUs it assigned from 0 in CUDA_VISIBLE_DEVICES, so `cuda` (cuda:0)
        // is the first assigned GPU, never another job's.
        let device = prepared.config.device;
        let on = if device.is_cpu() {
            "the CPU (set `device: cuda` to train on the assigned GPU)".to_string()
        } else {
            format!("{device}, counted among the GPUs assigned")
        };
        eprintln!(
            "sequel sweep-task: gres {} assigned CUDA_VISIBLE_DEVICES={} SLURM_JOB_GPUS={}; \
             this point trains on {on}",
            m.options.gres.as_deref().unwrap_or("-"),
            env("CUDA_VISIBLE_DEVICES"),
            env("SLURM_JOB_GPUS")
        );
    }
    // As in a local sweep: MLP steps do not gain from a second thread; other models use the
    // CPUs Slurm gave the task.
    let threads = if prepared.config.model.kind == sequel_core::config::ModelKind::Mlp {
        1
    } else {
        std::env::var("SLURM_CPUS_PER_TASK")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1)
    };
    let exe = std::env::current_exe().context("cannot find the sequel executable")?;
    let mut cmd = crate::sweep::point_command(registry, &exe, &p, &m.out, threads);
    cmd.stdin(std::process::Stdio::null());
    // The run replaces this process instead of running as its child: Slurm then signals the run
    // itself on scancel, requeue or a time limit. A child would outlive a killed parent, escape
    // proctrack/linuxproc and keep training (and its run's lock) after its task ended.
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let e = cmd.exec();
        Err(e).context("cannot start `sequel run`")
    }
    #[cfg(not(unix))]
    {
        let status = cmd.status().context("cannot start `sequel run`")?;
        if !status.success() {
            bail!("{} seed {}: `sequel run` failed ({status})", p.name, p.seed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_spec_compresses_runs() {
        assert_eq!(array_spec(&[0, 1, 2, 3, 5, 7, 8]), "0-3,5,7-8");
        assert_eq!(array_spec(&[4]), "4");
    }

    #[test]
    fn resubmit_options_replace_only_what_is_given() {
        let old = SlurmArgs {
            partition: Some("a".into()),
            time: Some("00:10:00".into()),
            sbatch_arg: vec!["--requeue".into()],
            ..Default::default()
        };
        let new = SlurmArgs {
            time: Some("01:00:00".into()),
            ..Default::default()
        };
        let u = old.updated(&new);
        assert_eq!(u.partition.as_deref(), Some("a"));
        assert_eq!(u.time.as_deref(), Some("01:00:00"));
        assert_eq!(u.sbatch_arg, vec!["--requeue".to_string()]);
        assert_eq!(new.first_given(), Some("--time"));
        assert_eq!(SlurmArgs::default().first_given(), None);
    }
}
