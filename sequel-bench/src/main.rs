//! `sequel`: run, validate and list continual-learning experiments.

mod display;

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sequel",
    version,
    about = "Continual-learning experiments: run, validate, list"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the stream of tasks a config describes and write its run directory.
    Run {
        /// Experiment YAML file.
        config: PathBuf,
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
        /// Print only the final table.
        #[arg(long)]
        quiet: bool,
    },
    /// Check a config (keys, types, values, algorithm parameters) without training.
    Validate {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
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
    },
    /// List the available algorithms, consolidation strategies, datasets or models.
    List {
        #[arg(value_enum, default_value = "all")]
        what: ListWhat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ListWhat {
    All,
    Algorithms,
    Consolidation,
    Datasets,
    Models,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn read_config(path: &PathBuf) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

fn dispatch(cli: Cli) -> Result<()> {
    let registry = Registry::builtin();
    match cli.command {
        Command::Run {
            config,
            mut set,
            seed,
            out,
            threads,
            quiet,
        } => {
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
            let prepared = prepare(&text, &origin, &set, &registry)?;
            configure_threads(threads, prepared.config.model.kind);
            let interactive = std::io::stderr().is_terminal() && !quiet;
            let mut progress = display::ProgressView::new(interactive, quiet);
            let hash = option_env!("SEQUEL_GIT_HASH")
                .filter(|h| !h.is_empty())
                .map(String::from);
            let finished = execute(prepared, &mut progress, hash)?;
            progress.finish();
            print!("{}", display::report(&finished.outcome));
            println!("run directory: {}", finished.dir.display());
            Ok(())
        }
        Command::Bench {
            config,
            set,
            batch,
            steps,
            warmup,
            threads,
        } => {
            let (text, origin) = read_config(&config)?;
            let p = prepare(&text, &origin, &set, &registry)?;
            configure_threads(threads, p.config.model.kind);
            let c = &p.config;
            let trainer = sequel_core::experiment::build_trainer(c, &origin, p.algorithm, None)?;
            let shape = trainer.stream.input_shape();
            let units = trainer.stream.num_units;
            println!(
                "model {} on {}x{}x{} inputs, {} outputs, optimizer {}, threads {}",
                yaml_name(&c.model.kind),
                shape[0],
                shape[1],
                shape[2],
                units,
                yaml_name(&c.optimizer.kind),
                std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into())
            );
            println!("{:>6} {:>10} {:>12}", "batch", "steps/s", "samples/s");
            for b in batch {
                let t = sequel_core::bench::time_train_steps(
                    &c.model,
                    &c.optimizer,
                    shape,
                    units,
                    b,
                    warmup,
                    steps,
                )?;
                println!(
                    "{:>6} {:>10.1} {:>12.0}",
                    b,
                    t.steps_per_s(),
                    t.samples_per_s()
                );
            }
            Ok(())
        }
        Command::Validate { config, set } => {
            let (text, origin) = read_config(&config)?;
            let p = prepare(&text, &origin, &set, &registry)?;
            println!(
                "{origin}: ok ({} on {} {:?}, {} tasks)",
                p.config.name,
                p.config.benchmark.dataset,
                p.config.benchmark.kind,
                p.config.benchmark.tasks
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
            if all || matches!(what, ListWhat::Datasets) {
                show(
                    "datasets",
                    sequel_core::data::discovery::DATASETS
                        .iter()
                        .map(|d| (d.to_string(), dataset_note(d).into()))
                        .collect(),
                );
            }
            if all || matches!(what, ListWhat::Models) {
                show(
                    "models",
                    sequel_core::model::MODELS
                        .iter()
                        .map(|m| (m.to_string(), model_note(m).into()))
                        .collect(),
                );
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

fn dataset_note(name: &str) -> &'static str {
    match name {
        "fmnist-mini" => "embedded Fashion-MNIST subset, 300 train + 100 test per class",
        "fashion-mnist" => "Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
        "mnist" => "MNIST IDX files",
        "cifar10" => "CIFAR-10 binary version",
        "cifar100" => "CIFAR-100 binary version",
        _ => "",
    }
}

fn model_note(name: &str) -> &'static str {
    match name {
        "mlp" => "multi-layer perceptron (model.hidden, model.activation, model.dropout)",
        "cnn" => "conv3x3-relu-maxpool blocks + linear head (model.channels)",
        "resnet18" => "reduced ResNet-18 without stem pooling (model.width)",
        _ => "",
    }
}

/// Thread counts must be in the environment before candle's pools start (no tensor exists yet
/// when this runs). Without `--threads` or `RAYON_NUM_THREADS`, the count is chosen by the
/// measurements in docs/PERFORMANCE.md: MLP steps are too small to gain from a second thread and
/// lose 30–60 % to synchronisation, convolutional models gain from every core.
fn configure_threads(threads: Option<usize>, model: sequel_core::config::ModelKind) {
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
