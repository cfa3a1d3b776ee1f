//! From a validated config to a finished run directory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use crate::algorithm::Algorithm;
use crate::config::ExperimentConfig;
use crate::consolidation::Consolidation;
use crate::data::{discovery::load_dataset, TaskStream};
use crate::error::{Error, Result};
use crate::model::build_model;
use crate::run::{write_results, RunDir, RunInfo};
use crate::trainer::{Progress, RunOutcome, Trainer};

/// Build the trainer that `cfg` describes around an already-built algorithm: load the data, build
/// the task stream and the seeded model. `origin` (the config file) prefixes errors that a config
/// change fixes.
pub fn build_trainer(
    cfg: &ExperimentConfig,
    origin: &str,
    algorithm: Box<dyn Algorithm>,
    consolidation: Option<Consolidation>,
) -> Result<Trainer> {
    let device = Device::Cpu;
    let in_file = |e: Error| match e {
        Error::UnknownName { .. } | Error::Benchmark(_) => Error::Msg(format!("{origin}: {e}")),
        Error::Msg(m) if m.starts_with("model.") => Error::Msg(format!("{origin}: {m}")),
        e => e,
    };
    let dataset =
        load_dataset(&cfg.benchmark.dataset, cfg.benchmark.data_dir.as_deref()).map_err(in_file)?;
    let stream = TaskStream::build(Arc::new(dataset), &cfg.benchmark, cfg.seed).map_err(in_file)?;
    let model = build_model(
        &cfg.model,
        stream.input_shape(),
        &stream.head_sizes(),
        cfg.seed,
        &device,
    )
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

/// Run `cfg` and write its run directory. `resolved_yaml` is the full config with defaults filled
/// in (written as config.yaml). A run that stops on a non-finite loss still writes the finished
/// tasks' results, then returns the error.
pub fn run_experiment(
    cfg: &ExperimentConfig,
    origin: &str,
    resolved_yaml: &str,
    algorithm: Box<dyn Algorithm>,
    consolidation: Option<Consolidation>,
    progress: &mut dyn Progress,
    git_hash: Option<String>,
) -> Result<Finished> {
    let start = Instant::now();
    let algo_name = algorithm.name().to_string();
    let cons_name = consolidation
        .as_ref()
        .map(|c| c.strategy.name().to_string());
    // Data and model errors come first so that they leave no run folder behind; an unwritable
    // output folder is still reported before any training.
    let mut trainer = build_trainer(cfg, origin, algorithm, consolidation)?;
    let dir = RunDir::create(&cfg.output.dir, &cfg.name, cfg.seed)?;
    trainer.checkpoint_dir = Some(dir.staging().join("checkpoints"));
    let mut outcome = trainer.run(progress)?;
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
