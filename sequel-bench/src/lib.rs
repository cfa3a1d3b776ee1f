//! The `sequel` command line as a library: `sequel_cli::main_with(registry)` is the whole CLI —
//! `run` (with `--resume`), `validate`, `sweep` (local or Slurm), `compare`, `report`, `bench`,
//! `list` — over any registry, so a crate with its own algorithms gets every command with a
//! three-line `main`:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     sequel_cli::main_with(sequel_algos::Registry::builtin())
//! }
//! ```
//!
//! Sweeps and Slurm array tasks re-invoke the running executable, so they see the same registry.
//! The library sets mimalloc as the global allocator (measured faster for the trainer's many
//! small tensors; docs/PERFORMANCE.md).

/// `println!` that ignores a closed stdout (`sequel list | head`) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod display;
mod report;
mod slurm;
mod sweep;

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sequel_algos::run::{execute_with, prepare};
use sequel_algos::Registry;
use sequel_core::experiment::{ResumeFrom, RunOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sequel",
    version,
    about = "Continual-learning experiments: run, validate, sweep, compare, report, bench, list"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the stream of tasks a config describes and write its run directory.
    Run {
        /// Experiment YAML file (optional with --resume: the run's own config.yaml is used).
        #[arg(required_unless_present = "resume")]
        config: Option<PathBuf>,
        /// Continue an unfinished run from its newest checkpoint: RUN_DIR is
        /// `<out>/<name>/.seed-N.partial` (or `<out>/<name>/seed-N`). The result is identical to an
        /// uninterrupted run; a CONFIG or --set that changes anything is refused.
        #[arg(long, value_name = "RUN_DIR")]
        resume: Option<PathBuf>,
        /// With --resume: continue from the checkpoint after task N instead of the newest (when
        /// the newest is damaged).
        #[arg(long, value_name = "N", requires = "resume")]
        resume_from_task: Option<usize>,
        /// Stop after task N has finished and been checkpointed (continue later with --resume).
        #[arg(long, value_name = "N")]
        stop_after_task: Option<usize>,
        /// Override any key, e.g. `--set optimizer.lr=0.1 --set model.hidden=[256,256]`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Experiment seed (same as --set seed=N).
        #[arg(long)]
        seed: Option<u64>,
        /// Root folder for run directories (same as --set output.dir=DIR).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Compute threads. Default: $RAYON_NUM_THREADS if set, else 1 for MLPs and all cores for
        /// convolutional models (measured, see docs/PERFORMANCE.md).
        #[arg(long)]
        threads: Option<usize>,
        /// cpu, cuda or cuda:N (same as --set device=...); CUDA needs a `--features cuda` build.
        #[arg(long)]
        device: Option<String>,
        /// Print only the final table.
        #[arg(long)]
        quiet: bool,
        /// Replace a finished run of the same name and seed even if it ran a different config
        /// (without it, that is refused; the same config reruns in place).
        #[arg(long)]
        overwrite: bool,
    },
    /// Check a config (keys, types, values, algorithm parameters) without training.
    Validate {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Check the config only; do not load the dataset or build the stream and model.
        #[arg(long)]
        no_data: bool,
    },
    /// Measure training-step throughput (steps/s) of a config's model and optimizer on synthetic
    /// batches shaped like its dataset.
    Bench {
        /// Experiment YAML file (its benchmark, model and optimizer sections are used).
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Batch sizes to time (repeatable).
        #[arg(long = "batch", default_values_t = [10usize, 128])]
        batch: Vec<usize>,
        /// Timed steps per batch size.
        #[arg(long, default_value_t = 500)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        /// Compute threads (default as for `run`).
        #[arg(long)]
        threads: Option<usize>,
        /// cpu, cuda or cuda:N (same as --set device=...).
        #[arg(long)]
        device: Option<String>,
        /// Input shape `CxHxW` (e.g. `3x32x32`): time on synthetic batches of this shape without
        /// loading the config's dataset (which may not be installed).
        #[arg(long, value_name = "CxHxW", value_parser = parse_shape)]
        input: Option<[usize; 3]>,
        /// Output units with `--input` (otherwise the config's stream decides).
        #[arg(long, default_value_t = 10, requires = "input")]
        outputs: usize,
        /// Time an algorithm's full training step instead of the plain model step: a name or a
        /// YAML mapping (`derpp`, `'{name: er, replay_batch_size: 32}'`; default: the config's
        /// algorithm). Runs the trainer's step on task 2 after task 1 has been trained, on the
        /// config's stream (or a synthetic stand-in of its shape when the data is not installed).
        #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "", conflicts_with = "input")]
        algorithm: Option<String>,
    },
    /// Run configs × grid × seeds, each point in its own run directory; finished points are
    /// skipped, so an interrupted sweep continues where it stopped. With --launcher slurm the
    /// points run as a Slurm job array instead (--status DIR, --resubmit DIR follow it up).
    Sweep {
        /// Experiment YAML files.
        #[arg(required_unless_present_any = ["status", "resubmit"])]
        configs: Vec<PathBuf>,
        /// Seeds: a range `0..5` (end exclusive), `0..=4`, or a list `0,2,7`.
        #[arg(long, default_value = "0")]
        seeds: String,
        /// A grid axis `key=v1,v2,...` (repeatable; values are YAML, commas inside [] or {} kept).
        #[arg(long = "grid", value_name = "KEY=V1,V2")]
        grid: Vec<String>,
        /// Overrides applied to every point.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Runs at a time; the cores are split between them. Default 1, or one per GPU of
        /// --devices.
        #[arg(long)]
        jobs: Option<usize>,
        /// CUDA devices to place the points on, e.g. `--devices 0,1,2,3`: each job runs on one
        /// of them (`--device cuda:N`), one job per device unless --jobs says more. Local
        /// sweeps only: Slurm assigns its own GPUs (`--gres gpu:1` with `device: cuda`).
        #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
        devices: Vec<usize>,
        /// Root of the run directories.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Print the expansion (and which points are done) without running anything; with
        /// --launcher slurm or --resubmit, print the job script without submitting it.
        #[arg(long)]
        dry_run: bool,
        /// Where the points run: on this machine, or as a Slurm job array submitted with sbatch.
        #[arg(long, value_enum, default_value = "local")]
        launcher: sweep::Launcher,
        #[command(flatten)]
        slurm: slurm::SlurmArgs,
        /// Show each point of the Slurm sweep in DIR: done, running, pending or failed (with
        /// its log and the error's last line).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["configs", "resubmit"])]
        status: Option<PathBuf>,
        /// Submit the unfinished points of the Slurm sweep in DIR again (those neither done nor
        /// still queued); sbatch options given here replace the earlier ones.
        #[arg(long, value_name = "DIR", conflicts_with = "configs")]
        resubmit: Option<PathBuf>,
    },
    /// Run one point of a Slurm sweep: what each array task of `sequel sweep --launcher slurm`
    /// executes.
    #[command(hide = true)]
    SweepTask {
        /// The submission's manifest, `<out>/.slurm/sweep-N.json`.
        manifest: PathBuf,
        /// The array index ($SLURM_ARRAY_TASK_ID).
        index: usize,
    },
    /// Write SVG plots (accuracy-matrix heatmap, per-task accuracy, average accuracy with a
    /// seed band, forgetting) and a self-contained report.html for the runs under the paths.
    Report {
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Group by the values of these config keys (comma-separated or repeated) instead of
        /// "same config but the seed"; runs that differ in anything else stay apart.
        #[arg(long, value_delimiter = ',', value_name = "KEY")]
        by: Vec<String>,
        /// Output folder (default: the run directory for a single run, else ./report).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Summarise finished runs: groups runs that differ only in the seed and prints mean ± std
    /// (and n) of the final metrics as a table, best average accuracy first.
    Compare {
        /// Run directories, or folders containing them (searched recursively).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Group by the values of these config keys instead (comma-separated or repeated, e.g.
        /// `--by algorithm.name,benchmark.scenario`). Runs that differ in anything else besides
        /// the seed are never averaged together: they get rows of their own, labelled with the
        /// keys that set them apart. A key no run has is an error naming the keys that vary.
        #[arg(long, value_delimiter = ',', value_name = "KEY")]
        by: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "md")]
        format: TableFormat,
    },
    /// List the available algorithms, consolidation strategies, datasets or models.
    List {
        #[arg(value_enum, default_value = "all")]
        what: ListWhat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TableFormat {
    Md,
    Csv,
}

#[derive(Clone, Copy, ValueEnum)]
enum ListWhat {
    All,
    Algorithms,
    Consolidation,
    Datasets,
    Models,
}

/// Parse the command line and run the command over `registry`'s algorithms and strategies;
/// errors are printed as one `error:` line (plus causes) with a failure exit code.
pub fn main_with(registry: Registry) -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Colour codes only on a terminal: a log written to a file stays plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match dispatch(cli, &registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// A config file's text and its name for messages; every failure is one line naming the file and
/// what to give instead.
pub(crate) fn read_config(path: &PathBuf) -> Result<(String, String)> {
    let shown = path.display();
    if path.is_dir() {
        anyhow::bail!("cannot read config {shown}: it is a directory; give a YAML file");
    }
    let bytes = std::fs::read(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
            _ => e.to_string(),
        };
        anyhow::anyhow!("cannot read config {shown}: {why}; give the path of a YAML file")
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "cannot read config {shown}: it is not a text file (not UTF-8); give a YAML config \
             such as configs/quickstart.yaml"
        )
    })?;
    if text.contains('\0') {
        anyhow::bail!(
            "cannot read config {shown}: it is a binary file; give a YAML config such as \
             configs/quickstart.yaml"
        );
    }
    Ok((text, path.display().to_string()))
}

/// An error as one line: its causes joined with `: `, line breaks inside messages (YAML
/// excerpts, OS errors) folded into spaces.
fn one_line(e: &anyhow::Error) -> String {
    let text = e
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn dispatch(cli: Cli, registry: &Registry) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            resume,
            resume_from_task,
            stop_after_task,
            mut set,
            seed,
            out,
            threads,
            device,
            quiet,
            overwrite,
        } => {
            if let Some(d) = device {
                set.push(format!("device={d}"));
            }
            if stop_after_task == Some(0) {
                anyhow::bail!("--stop-after-task must be at least 1 (the first checkpoint is written after task 1)");
            }
            // Before its config.yaml is read: a finished run has none left there, and the final
            // name of an unfinished one leads to its staging folder.
            let staging = match &resume {
                Some(dir) => Some(sequel_core::run::RunDir::check_resumable(dir)?),
                None => None,
            };
            let config = match (config, &staging) {
                (Some(c), _) => c,
                (None, Some(dir)) => dir.join("config.yaml"),
                (None, None) => anyhow::bail!("give a config file (or --resume RUN_DIR)"),
            };
            let (text, origin) = read_config(&config)?;
            if let Some(s) = seed {
                set.push(format!("seed={s}"));
            }
            if let Some(o) = out {
                set.push(format!(
                    "output.dir={}",
                    serde_yaml::to_string(&o.display().to_string())?.trim()
                ));
            }
            let prepared = prepare(&text, &origin, &set, registry)?;
            configure_threads(threads, &prepared.config.model.kind);
            let interactive = std::io::stderr().is_terminal() && !quiet;
            let mut progress = display::ProgressView::new(interactive, quiet);
            let hash = option_env!("SEQUEL_GIT_HASH")
                .filter(|h| !h.is_empty())
                .map(String::from);
            let interrupt = Arc::new(AtomicBool::new(false));
            {
                let flag = interrupt.clone();
                // First Ctrl-C: stop at the next step (the last checkpoint stays intact);
                // a second one exits at once.
                let _ = ctrlc::set_handler(move || {
                    if flag.swap(true, Ordering::SeqCst) {
                        std::process::exit(130);
                    }
                    eprintln!("\nstopping at the next step (Ctrl-C again to exit now)");
                });
            }
            let opts = RunOptions {
                resume: resume.map(|dir| ResumeFrom {
                    dir,
                    task: resume_from_task,
                }),
                stop_after_task,
                interrupt: Some(interrupt),
                overwrite,
            };
            let finished = execute_with(prepared, &mut progress, hash, &opts);
            progress.finish();
            let finished = finished?;
            say!(
                "{}run directory: {}",
                display::report(&finished.outcome),
                finished.dir.display()
            );
            Ok(())
        }
        Command::Bench {
            config,
            mut set,
            batch,
            steps,
            warmup,
            threads,
            device,
            input,
            outputs,
            algorithm,
        } => {
            if let Some(d) = device {
                set.push(format!("device={d}"));
            }
            if let Some(spec) = algorithm {
                if !spec.is_empty() {
                    set.push(format!("algorithm={spec}"));
                }
                return bench_algorithm(registry, &config, &set, threads, &batch, warmup, steps);
            }
            let (text, origin) = read_config(&config)?;
            let p = prepare(&text, &origin, &set, registry)?;
            configure_threads(threads, &p.config.model.kind);
            let c = p.config.clone();
            let sources = p.sources.clone();
            let (shape, units) = match input {
                Some(shape) => (shape, outputs),
                None => {
                    // Only the stream's shape matters: without the dataset's files, a stand-in
                    // of its known shape and classes gives the same input and output sizes.
                    let name = &c.benchmark.dataset;
                    let dataset = match sources.load_dataset(name, c.benchmark.data_dir.as_deref())
                    {
                        Ok(d) => d,
                        Err(e @ sequel_core::Error::DatasetNotFound { .. }) => {
                            let d = stand_in_dataset(name).ok_or(e)?;
                            say!("{name} not installed: timing on synthetic batches of its shape");
                            d
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let stream = sequel_core::experiment::build_stream(
                        &c,
                        &origin,
                        std::sync::Arc::new(dataset),
                    )?;
                    (stream.input_shape(), stream.num_units)
                }
            };
            say!(
                "model {} on {}x{}x{} inputs, {} outputs, optimizer {}, device {}, threads {}",
                yaml_name(&c.model.kind),
                shape[0],
                shape[1],
                shape[2],
                units,
                yaml_name(&c.optimizer.kind),
                c.device,
                std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
            );
            let dev = c
                .device
                .open()
                .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
            say!("{:>6} {:>10} {:>12}", "batch", "steps/s", "samples/s");
            for b in batch {
                let spec = sequel_core::BackboneSpec {
                    input: shape,
                    heads: &[units],
                    tasks: 1,
                    seed: 0,
                    device: &dev,
                };
                let model = sources.build_model(&c.model, &spec, &origin)?;
                let t = sequel_core::bench::time_train_steps(
                    model.as_ref(),
                    &c.optimizer,
                    shape,
                    units,
                    b,
                    warmup,
                    steps,
                )?;
                // Three decimals below 10 steps/s: ResNets run under 1 step/s on CPUs.
                let sps = t.steps_per_s();
                let digits = if sps < 10.0 { 3 } else { 1 };
                say!("{:>6} {:>10.*} {:>12.0}", b, digits, sps, t.samples_per_s());
            }
            Ok(())
        }
        Command::Validate {
            config,
            set,
            no_data,
        } => {
            let (text, origin) = read_config(&config)?;
            let p = prepare(&text, &origin, &set, registry)?;
            let c = p.config.clone();
            if no_data {
                say!("{origin}: config ok ({}; data not checked)", c.name);
                return Ok(());
            }
            // Load the data and build the stream and model too: that is where a missing file,
            // an unknown dataset or tasks that do not divide the classes show up.
            let trainer = p.trainer()?;
            // PaLoRA: the memory one task adds (docs/EXTENSIONS.md).
            let adapters = trainer.model.adapters().map_or(String::new(), |a| {
                format!(
                    ", of which {} per task in PaLoRA adapters",
                    a.params_per_task()
                )
            });
            say!(
                "{origin}: ok ({}: {} {} {}, {} tasks, {} output units, {} with {} parameters{adapters})",
                c.name,
                yaml_name(&c.benchmark.kind),
                c.benchmark.dataset,
                yaml_name(&c.benchmark.scenario),
                trainer.stream.len(),
                trainer.stream.num_units,
                yaml_name(&c.model.kind),
                trainer.model.params().num_trainable()
            );
            Ok(())
        }
        Command::Sweep {
            configs,
            seeds,
            grid,
            set,
            jobs,
            devices,
            out,
            dry_run,
            launcher,
            slurm,
            status,
            resubmit,
        } => match (status, resubmit) {
            (Some(dir), _) => slurm::status(&dir),
            (None, Some(dir)) => slurm::resubmit(&dir, &slurm, dry_run),
            (None, None) => sweep::run(
                registry,
                sweep::Args {
                    configs,
                    seeds,
                    grid,
                    set,
                    jobs,
                    devices,
                    out,
                    dry_run,
                    launcher,
                    slurm,
                },
            ),
        },
        Command::SweepTask { manifest, index } => slurm::task(registry, &manifest, index),
        Command::Report { runs, by, out } => {
            let path = report::run(&runs, &by, out)?;
            say!("report: {}", path.display());
            Ok(())
        }
        Command::Compare { runs, by, format } => {
            let records = sequel_core::results::find_runs(&runs)?;
            if records.is_empty() {
                anyhow::bail!(
                    "no run directories (with summary.json and config.yaml) under the given paths"
                );
            }
            let rows = sequel_core::results::compare(&records, &by)?;
            say!(
                "{}",
                sequel_core::results::format_table(&rows, matches!(format, TableFormat::Csv))
                    .trim_end()
            );
            Ok(())
        }
        Command::List { what } => {
            // Write errors (a closed pipe, as in `sequel list | head`) end the listing quietly.
            let mut out = std::io::stdout().lock();
            let mut show = |title: &str, rows: Vec<(String, String)>| {
                let _ = writeln!(out, "{title}:");
                if rows.is_empty() {
                    let _ = writeln!(out, "  (none yet)");
                }
                for (n, s) in rows {
                    let _ = writeln!(out, "  {n:<16} {s}");
                }
            };
            let all = matches!(what, ListWhat::All);
            if all || matches!(what, ListWhat::Algorithms) {
                show(
                    "algorithms",
                    registry
                        .algorithms()
                        .into_iter()
                        .map(|(n, s)| (n.into(), s.into()))
                        .collect(),
                );
            }
            if all || matches!(what, ListWhat::Consolidation) {
                show(
                    "consolidation",
                    registry
                        .consolidators()
                        .into_iter()
                        .map(|(n, s)| (n.into(), s.into()))
                        .collect(),
                );
            }
            let sources = registry.sources();
            let owned = |v: Vec<(&str, &str)>| {
                v.into_iter()
                    .map(|(n, s)| (n.to_string(), s.to_string()))
                    .collect()
            };
            if all || matches!(what, ListWhat::Datasets) {
                show("datasets", owned(sources.datasets()));
            }
            if all || matches!(what, ListWhat::Models) {
                show("models", owned(sources.backbones()));
            }
            Ok(())
        }
    }
}

/// A config enum as the YAML spells it (`class-il`, `mlp`, ...).
fn yaml_name<T: serde::Serialize>(v: &T) -> String {
    serde_yaml::to_string(v)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A dataset of a few blank images per class with `name`'s shape and classes, for timing on
/// synthetic batches when its files are not installed.
/// `sequel bench --algorithm`: the trainer's full step of the config's algorithm, per batch size.
fn bench_algorithm(
    registry: &Registry,
    config: &PathBuf,
    set: &[String],
    threads: Option<usize>,
    batches: &[usize],
    warmup: usize,
    steps: usize,
) -> Result<()> {
    let (text, origin) = read_config(config)?;
    let first = prepare(&text, &origin, set, registry)?;
    configure_threads(threads, &first.config.model.kind);
    let c = &first.config;
    let dataset = match first
        .sources
        .load_dataset(&c.benchmark.dataset, c.benchmark.data_dir.as_deref())
    {
        Ok(d) => d,
        Err(e @ sequel_core::Error::DatasetNotFound { .. }) => {
            let d = stand_in_dataset(&c.benchmark.dataset).ok_or(e)?;
            say!(
                "{} not installed: timing on a synthetic stand-in of its shape",
                c.benchmark.dataset
            );
            d
        }
        Err(e) => return Err(e.into()),
    };
    let dataset = std::sync::Arc::new(dataset);
    say!(
        "algorithm {} with model {}, optimizer {}, device {}, threads {}: the trainer's step on task 2",
        c.algorithm
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or("naive"),
        yaml_name(&c.model.kind),
        yaml_name(&c.optimizer.kind),
        c.device,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
    );
    say!("{:>6} {:>10} {:>12}", "batch", "steps/s", "samples/s");
    for &b in batches {
        let mut o = set.to_vec();
        o.push(format!("training.batch_size={b}"));
        let p = prepare(&text, &origin, &o, registry)?;
        let c = &p.config;
        let stream = sequel_core::experiment::build_stream(c, &origin, dataset.clone())?;
        let device = c
            .device
            .open()
            .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        let heads = stream.head_sizes();
        let spec = sequel_core::BackboneSpec {
            input: stream.input_shape(),
            heads: &heads,
            tasks: stream.len(),
            seed: c.seed,
            device: &device,
        };
        let model = p.sources.build_model(&c.model, &spec, &origin)?;
        let mut trainer = sequel_core::Trainer::new(
            c.clone(),
            stream,
            model,
            p.algorithm,
            p.consolidator,
            device,
        );
        let t = sequel_core::bench::time_algorithm_steps(&mut trainer, b, warmup, steps)
            .map_err(|e| anyhow::anyhow!("{origin}: timing batch size {b}: {e}"))?;
        let sps = t.steps_per_s();
        let digits = if sps < 10.0 { 3 } else { 1 };
        say!("{:>6} {:>10.*} {:>12.0}", b, digits, sps, t.samples_per_s());
    }
    Ok(())
}

fn stand_in_dataset(name: &str) -> Option<sequel_core::data::Dataset> {
    let (shape, classes) = match name {
        "fashion-mnist" | "mnist" | "fmnist-mini" => ([1, 28, 28], 10),
        "cifar10" => ([3, 32, 32], 10),
        "cifar100" => ([3, 32, 32], 100),
        _ => return None,
    };
    // A few per class, so that a validation split or a training subset still finds samples.
    let n = classes * 20;
    let set = sequel_core::data::ImageSet {
        images: vec![0; n * shape.iter().product::<usize>()],
        labels: (0..n).map(|i| (i % classes) as u16).collect(),
        shape,
    };
    Some(sequel_core::data::Dataset {
        name: name.to_string(),
        train: set.clone(),
        test: set,
        num_classes: classes,
        mean: vec![0.0; shape[0]],
        std: vec![1.0; shape[0]],
    })
}

/// Thread counts must be in the environment before candle's pools start (no tensor exists yet
/// when this runs). Without `--threads` or `RAYON_NUM_THREADS`, the count is chosen by the
/// measurements in docs/PERFORMANCE.md: MLP steps are too small to gain from a second thread and
/// lose 30–60 % to synchronisation, convolutional models gain from every core.
fn configure_threads(threads: Option<usize>, model: &sequel_core::config::ModelKind) {
    let n = match threads {
        Some(n) => n.max(1),
        None if std::env::var_os("RAYON_NUM_THREADS").is_some() => return,
        None => match model {
            sequel_core::config::ModelKind::Mlp => 1,
            _ => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        },
    };
    // SAFETY: called on the main thread before any other thread has been started.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

/// `CxHxW` → `[C, H, W]`.
fn parse_shape(s: &str) -> std::result::Result<[usize; 3], String> {
    let dims: Vec<usize> = s
        .split(['x', 'X', ','])
        .map(|d| d.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("{s:?}: {e}"))?;
    match dims.as_slice() {
        &[c, h, w] if c * h * w > 0 => Ok([c, h, w]),
        _ => Err(format!(
            "{s:?}: expected three positive sizes CxHxW, e.g. 3x32x32"
        )),
    }
}
