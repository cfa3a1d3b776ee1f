//! `sequel sweep`: expand configs × grid × seeds and run each point as a child `sequel run`
//! process, `--jobs` at a time. Children are separate processes so that each gets its own thread
//! pools (candle's are process-wide) and a crash in one point cannot take the others down.

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sequel_algos::run::prepare;
use sequel_algos::Registry;
use sequel_core::data::Dataset;
use sequel_core::experiment::{build_stream, preflight};
use sequel_core::sweep::{expand, is_finished, parse_grid, parse_seeds, SweepPoint};

pub struct Args {
    pub configs: Vec<PathBuf>,
    pub seeds: String,
    pub grid: Vec<String>,
    pub set: Vec<String>,
    /// Runs at a time (default: 1, or one per device of `devices`).
    pub jobs: Option<usize>,
    /// CUDA ordinals the local jobs are placed on; job `w` runs its points on
    /// `devices[w % devices.len()]`. Empty: every point runs on its config's device.
    pub devices: Vec<usize>,
    pub out: PathBuf,
    pub dry_run: bool,
    pub launcher: Launcher,
    pub slurm: crate::slurm::SlurmArgs,
}

/// Where a sweep's points run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Launcher {
    /// On this machine, `--jobs` at a time.
    Local,
    /// As one Slurm job array per submission (sbatch).
    Slurm,
}

pub fn run(registry: &Registry, a: Args) -> Result<()> {
    if a.launcher == Launcher::Local {
        if let Some(flag) = a.slurm.first_given() {
            bail!("{flag} is an sbatch option: add --launcher slurm, or drop {flag} to run here");
        }
    } else if !a.devices.is_empty() {
        bail!(
            "--devices places local jobs; under Slurm set `device: cuda` and ask for a GPU per \
             task with --gres gpu:1 (Slurm picks the device)"
        );
    }
    if a.jobs == Some(0) {
        bail!("--jobs must be at least 1");
    }
    let seeds = parse_seeds(&a.seeds)?;
    let grid = a
        .grid
        .iter()
        .map(|g| parse_grid(g))
        .collect::<sequel_core::Result<Vec<_>>>()?;
    let mut named = Vec::new();
    for c in &a.configs {
        let (text, origin) = crate::read_config(c)?;
        let p = prepare(&text, &origin, &a.set, registry)?;
        named.push((c.clone(), p.config.name.clone()));
    }
    let mut points = expand(&named, &grid, &seeds);
    for p in &mut points {
        let mut o = a.set.clone();
        o.append(&mut p.overrides);
        p.overrides = o;
    }
    // Every point must pass what `run` checks before training, before anything runs: the
    // config, and the checks that need the stream (each dataset is loaded once).
    let mut mlp = Vec::with_capacity(points.len());
    let mut datasets: HashMap<(String, Option<PathBuf>), Option<Arc<Dataset>>> = HashMap::new();
    for p in &points {
        let (text, origin) = crate::read_config(&p.config)?;
        let point = || format!("sweep point {} seed {}", p.name, p.seed);
        let mut o = p.all_overrides();
        o.push(format!("seed={}", p.seed));
        let mut prepared = prepare(&text, &origin, &o, registry).with_context(point)?;
        let c = &prepared.config;
        mlp.push(c.model.kind == sequel_core::config::ModelKind::Mlp);
        let key = (c.benchmark.dataset.clone(), c.benchmark.data_dir.clone());
        let dataset = match datasets.get(&key) {
            Some(d) => d.clone(),
            None => {
                let loaded = match prepared.sources.load_dataset(&key.0, key.1.as_deref()) {
                    Ok(d) => Some(Arc::new(d)),
                    // Slurm points may see files this machine does not: check what can be.
                    Err(e) if a.launcher == Launcher::Slurm => {
                        eprintln!(
                            "warning: {origin}: {e}; the points on `{}` are checked without \
                             their data",
                            key.0
                        );
                        None
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context(point())),
                };
                datasets.insert(key, loaded.clone());
                loaded
            }
        };
        if let Some(d) = dataset {
            let stream = build_stream(c, &origin, d).with_context(point)?;
            preflight(c, &origin, &stream, prepared.algorithm.as_mut()).with_context(point)?;
        }
    }
    if a.launcher == Launcher::Slurm {
        return crate::slurm::submit(&a.out, &points, &a.slurm, a.dry_run);
    }
    let todo: Vec<(&SweepPoint, bool)> = points
        .iter()
        .zip(mlp)
        .filter(|(p, _)| !is_finished(&a.out, &p.name, p.seed))
        .collect();
    let done = points.len() - todo.len();
    if a.dry_run {
        for p in &points {
            let state = if is_finished(&a.out, &p.name, p.seed) {
                "done"
            } else {
                "todo"
            };
            say!(
                "{state}  {}  seed {}  {}  {}",
                p.name,
                p.seed,
                p.config.display(),
                p.overrides.join(" ")
            );
        }
        say!(
            "{} points: {} done, {} to run",
            points.len(),
            done,
            todo.len()
        );
        return Ok(());
    }
    let wanted = a.jobs.unwrap_or(a.devices.len().max(1));
    let jobs = wanted.min(todo.len().max(1));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // The cores are split between jobs; MLPs run single-threaded anyway (docs/PERFORMANCE.md).
    let conv_threads = (cores / jobs).max(1);
    eprintln!(
        "sweep: {} points, {} already done, {} to run, {} at a time{}",
        points.len(),
        done,
        todo.len(),
        jobs,
        if a.devices.is_empty() {
            String::new()
        } else {
            let d: Vec<String> = a.devices.iter().map(|d| format!("cuda:{d}")).collect();
            format!(" on {}", d.join(", "))
        }
    );
    let exe = std::env::current_exe().context("cannot find the sequel executable")?;
    let logs = a.out.join(".sweep-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let queue = Mutex::new(todo.iter().copied());
    let failures = Mutex::new(Vec::new());
    let finished = Mutex::new(0usize);
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| indicatif::ProgressBar::new(todo.len() as u64));
    std::thread::scope(|s| {
        for worker in 0..jobs {
            // Each job keeps one device for all its points, so no two jobs share a GPU
            // while there are as many devices as jobs.
            let device = (!a.devices.is_empty()).then(|| a.devices[worker % a.devices.len()]);
            let (queue, failures, finished, bar, logs, exe, a, todo) =
                (&queue, &failures, &finished, &bar, &logs, &exe, &a, &todo);
            s.spawn(move || loop {
                let Some((p, is_mlp)) = queue.lock().unwrap_or_else(|e| e.into_inner()).next()
                else {
                    break;
                };
                let threads = if is_mlp { 1 } else { conv_threads };
                let start = Instant::now();
                let log = logs.join(format!("{}-seed-{}.log", p.name, p.seed));
                // Another sweep into the same folder may be running this point: wait for it
                // rather than fail on its lock, and count the point done if it finished.
                let (ok, outcome) = if done_elsewhere(&a.out, p) {
                    (true, "done by another process")
                } else {
                    // The child writes a log of its own, moved into place when it ends, so
                    // that a second sweep never overwrites the log of the first's child.
                    let own = logs.join(format!(
                        ".{}-seed-{}.log.{}",
                        p.name,
                        p.seed,
                        std::process::id()
                    ));
                    let status = std::fs::File::create(&own).and_then(|f| {
                        let mut cmd = point_command(registry, exe, p, &a.out, threads);
                        if let Some(d) = device {
                            cmd.arg("--device").arg(format!("cuda:{d}"));
                        }
                        cmd.stdin(Stdio::null())
                            .stdout(f.try_clone()?)
                            .stderr(f)
                            .status()
                    });
                    if matches!(status, Ok(s) if s.success()) {
                        let _ = std::fs::rename(&own, &log);
                        (true, "done")
                    } else if done_elsewhere(&a.out, p) {
                        let _ = std::fs::remove_file(&own);
                        (true, "done by another process")
                    } else {
                        let _ = std::fs::rename(&own, &log);
                        (false, "FAILED")
                    }
                };
                let mut n = finished.lock().unwrap_or_else(|e| e.into_inner());
                *n += 1;
                let line = format!(
                    "[{}/{}] {} seed {}: {} in {:.1}s",
                    *n,
                    todo.len(),
                    p.name,
                    p.seed,
                    outcome,
                    start.elapsed().as_secs_f64()
                );
                match &bar {
                    Some(b) => {
                        b.println(line);
                        b.inc(1);
                    }
                    None => eprintln!("{line}"),
                }
                if !ok {
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!(
                            "{} seed {} (log: {})",
                            p.name,
                            p.seed,
                            log.display()
                        ));
                }
            });
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    if !failures.is_empty() {
        bail!(
            "{} of {} points failed: {}",
            failures.len(),
            todo.len(),
            failures.join("; ")
        );
    }
    say!(
        "sweep complete: {} runs under {}; summarise with `sequel compare {}`",
        points.len(),
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

/// Whether point `p` has been finished by another process (after waiting for a live writer of
/// it, such as a second sweep into the same folder, to end).
fn done_elsewhere(out: &Path, p: &SweepPoint) -> bool {
    while sequel_core::run::writer_of(out, &p.name, p.seed).is_some() {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    is_finished(out, &p.name, p.seed)
}

/// The `sequel run` child that computes one point under `out`. An interrupted point continues
/// from its newest checkpoint, unless its config changed since: then it starts afresh, replacing
/// the partial run. Local sweeps and Slurm array tasks both run points through this.
pub(crate) fn point_command(
    registry: &Registry,
    exe: &Path,
    p: &SweepPoint,
    out: &Path,
    threads: usize,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg(&p.config);
    let partial = out.join(&p.name).join(format!(".seed-{}.partial", p.seed));
    if !sequel_core::checkpoint::available(&partial.join("checkpoints")).is_empty()
        && unchanged(registry, p, &partial)
    {
        cmd.arg("--resume").arg(&partial);
    }
    for o in p.all_overrides() {
        cmd.arg("--set").arg(o);
    }
    cmd.args([
        "--seed",
        &p.seed.to_string(),
        "--quiet",
        "--threads",
        &threads.to_string(),
    ])
    .arg("--out")
    .arg(out);
    cmd
}

/// Whether a point's config (with its seed) is the one its unfinished run was started with.
fn unchanged(registry: &Registry, p: &SweepPoint, partial: &Path) -> bool {
    let mut o = p.all_overrides();
    o.push(format!("seed={}", p.seed));
    crate::read_config(&p.config)
        .ok()
        .and_then(|(text, origin)| prepare(&text, &origin, &o, registry).ok())
        .and_then(|prepared| {
            sequel_core::experiment::config_differences(partial, &prepared.resolved_yaml).ok()
        })
        .is_some_and(|d| d.is_empty())
}
