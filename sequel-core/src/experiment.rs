//! From a validated config to a finished run directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::algorithm::Algorithm;
use crate::checkpoint;
use crate::config::ExperimentConfig;
use crate::consolidation::Consolidation;
use crate::data::TaskStream;
use crate::error::{Error, Result};
use crate::outcome::RunOutcome;
use crate::run::{write_results, RunDir, RunInfo};
use crate::sources::{BackboneSpec, Sources};
use crate::trainer::{Progress, Trainer};

/// A config resolved and ready to run: the algorithm (and consolidator) built, every default
/// filled in, and the datasets and backbones its names refer to.
pub struct Prepared {
    pub config: ExperimentConfig,
    pub algorithm: Box<dyn Algorithm>,
    pub consolidator: Option<Consolidation>,
    /// The config with every default filled in, as YAML.
    pub resolved_yaml: String,
    /// Where the config came from (a file name), for error messages.
    pub origin: String,
    pub sources: Sources,
}

impl Prepared {
    /// Load the data, build the task stream and the seeded model: the trainer, before any step.
    pub fn trainer(self) -> Result<Trainer> {
        build_trainer_with(
            &self.sources,
            &self.config,
            &self.origin,
            self.algorithm,
            self.consolidator,
        )
    }
}

/// Build the trainer that `cfg` describes around an already-built algorithm, from the built-in
/// datasets and backbones ([`build_trainer_with`] for registered ones).
pub fn build_trainer(
    cfg: &ExperimentConfig,
    origin: &str,
    algorithm: Box<dyn Algorithm>,
    consolidation: Option<Consolidation>,
) -> Result<Trainer> {
    build_trainer_with(&Sources::builtin(), cfg, origin, algorithm, consolidation)
}

/// Load the data, build the task stream and the seeded model from `sources`. `origin` (the
/// config file) prefixes errors that a config change fixes.
pub fn build_trainer_with(
    sources: &Sources,
    cfg: &ExperimentConfig,
    origin: &str,
    algorithm: Box<dyn Algorithm>,
    consolidation: Option<Consolidation>,
) -> Result<Trainer> {
    let device = cfg
        .device
        .open()
        .map_err(|e| Error::Msg(format!("{origin}: {e}")))?;
    let in_file = |e: Error| match e {
        Error::UnknownName { .. } | Error::Benchmark(_) => Error::Msg(format!("{origin}: {e}")),
        Error::Msg(m) if m.starts_with("model.") => Error::Msg(format!("{origin}: {m}")),
        e => e,
    };
    let b = &cfg.benchmark;
    let dataset = sources
        .load_dataset(&b.dataset, b.data_dir.as_deref())
        .map_err(in_file)?;
    let stream = TaskStream::build(Arc::new(dataset), b, cfg.seed).map_err(in_file)?;
    let heads = stream.head_sizes();
    let spec = BackboneSpec {
        input: stream.input_shape(),
        heads: &heads,
        seed: cfg.seed,
        device: &device,
    };
    let model = sources
        .build_model(&cfg.model, &spec, origin)
        .map_err(in_file)?;
    Ok(Trainer::new(
        cfg.clone(),
        stream,
        model,
        algorithm,
        consolidation,
        device,
    ))
}

/// The result of [`run_experiment`].
pub struct Finished {
    /// The run directory that was written.
    pub dir: PathBuf,
    pub outcome: RunOutcome,
}

/// How [`run_experiment`] starts and stops, beyond the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue an unfinished run from its checkpoint instead of starting afresh.
    pub resume: Option<ResumeFrom>,
    /// Stop once this many tasks are finished and checkpointed (tests, staged runs).
    pub stop_after_task: Option<usize>,
    /// Set to true (e.g. by a Ctrl-C handler) to stop at the next step.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// Which unfinished run to continue, and from which checkpoint.
#[derive(Debug, Clone)]
pub struct ResumeFrom {
    /// The run's staging folder (`<out>/<name>/.seed-<s>.partial`) or its final name.
    pub dir: PathBuf,
    /// Resume after this task instead of the newest checkpoint (e.g. when the newest is damaged).
    pub task: Option<usize>,
}

/// The fingerprint checkpoints record: the resolved config without `output` (where the run is
/// written does not change what it computes).
pub fn config_fingerprint(resolved_yaml: &str) -> Result<String> {
    let mut v: serde_yaml::Value =
        serde_yaml::from_str(resolved_yaml).map_err(|e| Error::msg(e.to_string()))?;
    if let Some(m) = v.as_mapping_mut() {
        m.remove("output");
        m.remove("device");
    }
    let text = serde_yaml::to_string(&v).map_err(|e| Error::msg(e.to_string()))?;
    Ok(checkpoint::config_hash(&text))
}

/// Run `cfg` and write its run directory. `resolved_yaml` is the full config with defaults filled
/// in (written as config.yaml). A run that stops on a non-finite loss still writes the finished
/// tasks' results, then returns the error. A run stopped on request (`opts`) leaves its staging
/// folder with the checkpoints and returns [`Error::Stopped`] naming how to continue.
pub fn run_experiment(
    p: Prepared,
    progress: &mut dyn Progress,
    git_hash: Option<String>,
    opts: &RunOptions,
) -> Result<Finished> {
    let start = Instant::now();
    let cfg = p.config.clone();
    let cfg = &cfg;
    let resolved_yaml = p.resolved_yaml.clone();
    let resolved_yaml = resolved_yaml.as_str();
    let algo_name = cfg
        .algorithm
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("naive")
        .to_string();
    let cons_name = p
        .consolidator
        .as_ref()
        .map(|c| c.strategy.name().to_string());
    // Data and model errors come first so that they leave no run folder behind; an unwritable
    // output folder is still reported before any training.
    let mut trainer = p.trainer()?;
    trainer.config_hash = config_fingerprint(resolved_yaml)?;
    trainer.stop_after_task = opts.stop_after_task;
    trainer.interrupt = opts.interrupt.clone();
    let dir = match &opts.resume {
        None => {
            let dir = RunDir::create(&cfg.output.dir, &cfg.name, cfg.seed)?;
            // Written now too, so that an unfinished run can be resumed from its folder alone.
            dir.write("config.yaml", resolved_yaml.as_bytes())?;
            dir
        }
        Some(r) => {
            let dir = RunDir::reopen(&r.dir)?;
            check_same_config(&dir, resolved_yaml)?;
            let ckpt_dir = dir.staging().join("checkpoints");
            let available = checkpoint::available(&ckpt_dir);
            let t = match (r.task, available.last()) {
                (Some(t), _) if available.contains(&t) => t,
                (Some(t), _) => {
                    return Err(Error::Msg(format!(
                        "no checkpoint after task {t} in {}; available: {available:?}",
                        ckpt_dir.display()
                    )))
                }
                (None, Some(&t)) => t,
                (None, None) => {
                    return Err(Error::Msg(format!(
                        "{} has no checkpoint yet (the run stopped during task 1): start it \
                         again with `sequel run CONFIG`",
                        dir.staging().display()
                    )))
                }
            };
            trainer.restore(checkpoint::load(&ckpt_dir, t)?)?;
            tracing::info!(after_task = t, "resuming");
            dir
        }
    };
    trainer.checkpoint_dir = Some(dir.staging().join("checkpoints"));
    let mut outcome = trainer.run(progress)?;
    if let Some(Error::Stopped(why)) = &outcome.failure {
        if outcome.matrix.rows.is_empty() {
            return Err(Error::Stopped(
                "interrupted during task 1, before any checkpoint: start the run again".into(),
            ));
        }
        return Err(Error::Stopped(format!(
            "{why}; continue with `{} run --resume {}`",
            program_name(),
            dir.staging().display()
        )));
    }
    let info = RunInfo {
        name: cfg.name.clone(),
        seed: cfg.seed,
        algorithm: algo_name,
        consolidation: cons_name,
        git_hash,
        threads: std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            }),
        device: cfg.device,
        wall_s: start.elapsed().as_secs_f64(),
        protocol: protocol_facts(cfg),
    };
    write_results(&dir, resolved_yaml, &outcome, &info)?;
    let failure = outcome.failure.take();
    let path = dir.finish()?;
    match failure {
        Some(e) => Err(Error::Msg(format!(
            "{e} (results of the finished tasks are in {})",
            path.display()
        ))),
        None => Ok(Finished { dir: path, outcome }),
    }
}

/// The name the running program was started as (`sequel`, or a user crate's own CLI), for hints
/// that name a command to type.
pub fn program_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "sequel".into())
}

/// Keys (dotted paths) whose values differ between the config an unfinished run was started with
/// (`<staging>/config.yaml`) and `resolved_yaml`, ignoring `output`.
pub fn config_differences(staging: &Path, resolved_yaml: &str) -> Result<Vec<String>> {
    let path = staging.join("config.yaml");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let parse = |t: &str| -> Result<serde_yaml::Value> {
        let mut v: serde_yaml::Value =
            serde_yaml::from_str(t).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        if let Some(m) = v.as_mapping_mut() {
            m.remove("output");
            m.remove("device");
        }
        Ok(v)
    };
    Ok(checkpoint::yaml_differences(
        &parse(&text)?,
        &parse(resolved_yaml)?,
    ))
}

/// Refuse to resume a run with a config that computes something else, naming the keys.
fn check_same_config(dir: &RunDir, resolved_yaml: &str) -> Result<()> {
    let diff = config_differences(dir.staging(), resolved_yaml)?;
    if diff.is_empty() {
        return Ok(());
    }
    Err(Error::Msg(format!(
        "the config differs from the one the run was started with ({}) in: {}; resume with the \
         same config (`sequel run --resume DIR` alone uses it), or start a new run",
        dir.staging().join("config.yaml").display(),
        diff.join(", ")
    )))
}

/// The protocol choices that change numbers between libraries (protocols.md §4), spelled out.
fn protocol_facts(cfg: &ExperimentConfig) -> serde_json::Value {
    let b = &cfg.benchmark;
    let kebab = |v: &dyn erased::Ser| v.yaml();
    serde_json::json!({
        "scenario": kebab(&b.scenario),
        "task_il_head": kebab(&b.task_il_head),
        "task_il_mask_in_training": b.scenario == crate::config::Scenario::TaskIl
            && b.task_il_head == crate::config::TaskIlHead::Multi,
        "class_order": if b.classes.is_some() { "explicit".to_string() } else { kebab(&b.class_order) },
        "optimizer_reset_each_task": cfg.optimizer.reset_each_task,
        "optimizer": kebab(&cfg.optimizer.kind),
        "average_accuracy": "mean over tasks (pooled also reported)",
        "eval_on": kebab(&b.eval_on),
        "normalize": b.normalize,
    })
}

mod erased {
    /// Serialize a config enum to its YAML spelling (`task-il`, ...).
    pub trait Ser {
        fn yaml(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn yaml(&self) -> String {
            serde_yaml::to_string(self)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        }
    }
}
