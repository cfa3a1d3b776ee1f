//! From a validated config to a finished run directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::algorithm::Algorithm;
use crate::checkpoint;
use crate::config::{ExperimentConfig, ModelConfig, ModelKind};
use crate::consolidation::Consolidation;
use crate::data::{Dataset, TaskStream};
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

/// [`Error::in_file`] as a closure for `map_err`.
fn in_file(origin: &str) -> impl Fn(Error) -> Error + '_ {
    move |e: Error| e.in_file(origin)
}

/// Build the task stream `cfg` describes over an already-loaded `dataset`.
pub fn build_stream(
    cfg: &ExperimentConfig,
    origin: &str,
    dataset: Arc<Dataset>,
) -> Result<TaskStream> {
    TaskStream::build(dataset, &cfg.benchmark, cfg.seed)
        .and_then(|s| s.with_augmentation(&cfg.augmentation, cfg.seed))
        .map_err(in_file(origin))
}

/// Every check of the config that needs the stream, short of training: the algorithm's
/// [`Algorithm::check_stream`], its replay memory's ([`crate::Memory::check`]), and whether the
/// model fits in memory. `run` makes them before it creates the run folder, and `validate` and
/// `sweep` make them too, so that nothing `run` rejects passes validation. Errors name the file
/// and the key.
pub fn preflight(
    cfg: &ExperimentConfig,
    origin: &str,
    stream: &TaskStream,
    algorithm: &mut dyn Algorithm,
) -> Result<()> {
    let in_file = in_file(origin);
    // The file's tensors are checked against the backbone when it is built (`validate` and
    // `run` build it before writing anything); a sweep's dry run at least finds the file.
    if let Some(path) = cfg.model.init_from.as_ref().filter(|p| !p.is_file()) {
        return Err(in_file(Error::Config {
            file: String::new(),
            path: "model.init_from".into(),
            message: format!(
                "`{}` is not a file (a relative path is taken from the working directory)",
                path.display()
            ),
        }));
    }
    if let Some(rt) = &cfg.training.realtime {
        let refuse = |path: &str, message: String| {
            Err(in_file(Error::Config {
                file: String::new(),
                path: path.into(),
                message,
            }))
        };
        if !algorithm.trains_on_the_stream() {
            let name = cfg.algorithm.get("name").and_then(|n| n.as_str());
            return refuse(
                "training.realtime",
                format!(
                    "`{}` trains on its own sample list (exemplars mixed in, the tasks seen so \
                     far, or a re-fit), not on the stream's batches as they arrive; remove \
                     training.realtime or choose a method that learns from the stream",
                    name.unwrap_or("this algorithm")
                ),
            );
        }
        let bs = cfg.training.batch_size.max(1);
        let fewest = (stream.first()..stream.len())
            .map(|t| stream.tasks[t].train.len().div_ceil(bs))
            .min()
            .unwrap_or(0);
        if rt.label_delay >= fewest {
            return refuse(
                "training.realtime.label_delay",
                format!(
                    "{} batches, and a task has only {fewest}: its labels would never arrive and \
                     nothing would be trained; set it below {fewest}",
                    rt.label_delay
                ),
            );
        }
    }
    algorithm.check_stream(stream).map_err(&in_file)?;
    if let Some(m) = algorithm.memory() {
        m.check(stream).map_err(&in_file)?;
    }
    check_model_size(
        &cfg.model,
        stream.input_shape(),
        &stream.head_sizes(),
        available_memory_bytes(),
    )
    .map_err(&in_file)
}

/// Bytes held per model parameter while training: the weights, their gradients, the optimizer's
/// state and a snapshot (teachers, anchors and consolidation keep more, so this is a floor).
const BYTES_PER_PARAM: u64 = 16;

/// About how many parameters the configured backbone has on `input` with `heads`, or `None`
/// when the count does not fit in 64 bits.
pub fn parameter_estimate(cfg: &ModelConfig, input: [usize; 3], heads: &[usize]) -> Option<u64> {
    let u = |v: usize| u64::try_from(v).ok();
    let outputs = heads.iter().try_fold(0u64, |a, &h| a.checked_add(u(h)?))?;
    // A dense layer n → m: (n + 1) · m weights and biases.
    let dense = |n: u64, m: u64| n.checked_add(1)?.checked_mul(m);
    match &cfg.kind {
        // A registered backbone's size is its own business.
        ModelKind::Other(_) => Some(0),
        ModelKind::Mlp => {
            let mut n = input.iter().try_fold(1u64, |a, &d| a.checked_mul(u(d)?))?;
            let mut total = 0u64;
            for &h in &cfg.hidden {
                total = total.checked_add(dense(n, u(h)?)?)?;
                n = u(h)?;
            }
            total.checked_add(dense(n, outputs)?)
        }
        ModelKind::Cnn => {
            let [mut c, mut h, mut w] = input.map(|d| d as u64);
            let mut total = 0u64;
            for &out in &cfg.channels {
                total = total.checked_add(dense(c.checked_mul(9)?, u(out)?)?)?;
                c = u(out)?;
                h /= 2;
                w /= 2;
            }
            let flat = c.checked_mul(h)?.checked_mul(w)?;
            total.checked_add(dense(flat, outputs)?)
        }
        // ResNet-18 with base width nf has about 2727·nf² convolution weights (11.2 M at 64),
        // and a head on 8·nf features.
        ModelKind::Resnet18 => {
            let nf = u(cfg.width)?;
            let body = nf.checked_mul(nf)?.checked_mul(2727)?;
            body.checked_add(dense(nf.checked_mul(8)?, outputs)?)
        }
    }
}

/// Refuse a model whose parameters alone would not fit in `available` bytes (when known), in
/// one line naming the key that sizes it, before anything is allocated.
pub fn check_model_size(
    cfg: &ModelConfig,
    input: [usize; 3],
    heads: &[usize],
    available: Option<u64>,
) -> Result<()> {
    let (key, value) = match &cfg.kind {
        ModelKind::Mlp => ("model.hidden", format!("{:?}", cfg.hidden)),
        ModelKind::Cnn => ("model.channels", format!("{:?}", cfg.channels)),
        ModelKind::Resnet18 => ("model.width", cfg.width.to_string()),
        ModelKind::Other(_) => return Ok(()),
    };
    let err = |message: String| Error::Config {
        file: String::new(),
        path: key.into(),
        message,
    };
    let limit = available.map(|a| a / BYTES_PER_PARAM);
    let limit_text = match (available, limit) {
        (Some(a), Some(l)) => format!(
            "; this machine has {:.1} GB available, enough for about {l:.1e} parameters",
            a as f64 / 1e9,
            l = l as f64
        ),
        _ => String::new(),
    };
    match parameter_estimate(cfg, input, heads) {
        None => Err(err(format!(
            "{value} gives a model of more than 2^64 parameters{limit_text}; lower {key}"
        ))),
        Some(n) if limit.is_some_and(|l| n > l) => Err(err(format!(
            "{value} gives a model of about {n:.1e} parameters, which needs about {:.1} GB \
             ({BYTES_PER_PARAM} bytes per parameter: weights, gradients, optimizer state, a \
             snapshot){limit_text}; lower {key}",
            n as f64 * BYTES_PER_PARAM as f64 / 1e9,
            n = n as f64
        ))),
        Some(_) => Ok(()),
    }
}

/// Memory available to a new allocation (`MemAvailable` of /proc/meminfo), if known.
fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    kb.checked_mul(1024)
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

/// Load the data, build the task stream, run the [`preflight`] checks, and build the seeded model
/// from `sources`. `origin` (the config file) prefixes errors that a config change fixes.
pub fn build_trainer_with(
    sources: &Sources,
    cfg: &ExperimentConfig,
    origin: &str,
    mut algorithm: Box<dyn Algorithm>,
    consolidation: Option<Consolidation>,
) -> Result<Trainer> {
    let device = cfg
        .device
        .open()
        .map_err(|e| Error::Msg(format!("{origin}: {e}")))?;
    let b = &cfg.benchmark;
    let dataset = sources
        .load_dataset(&b.dataset, b.data_dir.as_deref())
        .map_err(in_file(origin))?;
    let stream = build_stream(cfg, origin, Arc::new(dataset))?;
    preflight(cfg, origin, &stream, algorithm.as_mut())?;
    let independent = cfg.training.mode == crate::config::TrainingMode::Independent;
    if independent
        && consolidation
            .as_ref()
            .is_some_and(|c| c.wiring.anchor != crate::consolidation::Anchor::Initial)
    {
        return Err(Error::Config {
            file: origin.to_string(),
            path: "training.mode".into(),
            message: "`independent` merges task vectors relative to θ₀: set consolidation.anchor: initial".into(),
        });
    }
    let heads = stream.head_sizes();
    let spec = BackboneSpec {
        input: stream.input_shape(),
        heads: &heads,
        tasks: stream.len(),
        seed: cfg.seed,
        device: &device,
    };
    let model = sources
        .build_model(&cfg.model, &spec, origin)
        .map_err(in_file(origin))?;
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
    /// Replace a finished run of the same name and seed even when it ran a different config
    /// (otherwise refused: results are never replaced silently).
    pub overwrite: bool,
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
    mut p: Prepared,
    progress: &mut dyn Progress,
    git_hash: Option<String>,
    opts: &RunOptions,
) -> Result<Finished> {
    let start = Instant::now();
    // A resumed run takes every weight from its checkpoint: the `init_from` file only identifies
    // what the run started from, and may be gone by now.
    let init_from_gone = opts.resume.is_some()
        && p.config
            .model
            .init_from
            .as_ref()
            .is_some_and(|f| !f.is_file());
    let cfg = p.config.clone();
    let cfg = &cfg;
    if init_from_gone {
        p.config.model.init_from = None;
    }
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
    trainer.init_from_sha256 = match &cfg.model.init_from {
        Some(path) if !init_from_gone => Some(crate::model::pretrained::file_sha256(path)?),
        _ => None,
    };
    trainer.stop_after_task = opts.stop_after_task;
    trainer.interrupt = opts.interrupt.clone();
    let dir = match &opts.resume {
        None => {
            if !opts.overwrite {
                check_not_replacing(cfg, resolved_yaml)?;
            }
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
            let ckpt = checkpoint::load(&ckpt_dir, t)?;
            if init_from_gone {
                tracing::warn!(
                    "model.init_from is missing; resuming from the checkpoint's weights (sha256 of \
                     the original file kept)"
                );
                trainer.init_from_sha256 = ckpt.meta.init_from_sha256.clone();
            }
            trainer.restore(ckpt)?;
            tracing::info!(after_task = t, "resuming");
            dir
        }
    };
    trainer.checkpoint_dir = Some(dir.staging().join("checkpoints"));
    let init_sha = trainer.init_from_sha256.clone();
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
        protocol: protocol_facts(cfg, init_sha.as_deref()),
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

/// Keys (dotted paths) whose values differ between the config a run was started with
/// (`<dir>/config.yaml`, `dir` its staging or final folder) and `resolved_yaml`, ignoring
/// `output`.
pub fn config_differences(staging: &Path, resolved_yaml: &str) -> Result<Vec<String>> {
    let path = staging.join("config.yaml");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let parse = |t: &str| -> Result<serde_yaml::Value> {
        let v: serde_yaml::Value =
            serde_yaml::from_str(t).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        Ok(crate::config::comparable_config(&v))
    };
    Ok(checkpoint::yaml_differences(
        &parse(&text)?,
        &parse(resolved_yaml)?,
    ))
}

/// Refuse to replace the finished run at `<output.dir>/<name>/seed-<s>` with a run of a
/// different config (the same config reruns in place: its results are the same).
fn check_not_replacing(cfg: &ExperimentConfig, resolved_yaml: &str) -> Result<()> {
    let dir = cfg
        .output
        .dir
        .join(&cfg.name)
        .join(format!("seed-{}", cfg.seed));
    if !dir.is_dir() {
        return Ok(());
    }
    let what = match config_differences(&dir, resolved_yaml) {
        Ok(diff) if diff.is_empty() => return Ok(()),
        Ok(diff) => format!(
            "a finished run of a different config (it differs in: {})",
            diff.join(", ")
        ),
        Err(_) => "something that is not a finished run (no readable config.yaml)".into(),
    };
    Err(Error::Msg(format!(
        "{} holds {what}; give this run its own folder with --set name=NEW_NAME (or --out DIR), \
         or pass --overwrite to replace it",
        dir.display()
    )))
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
fn protocol_facts(cfg: &ExperimentConfig, init_sha: Option<&str>) -> serde_json::Value {
    let b = &cfg.benchmark;
    let kebab = |v: &dyn erased::Ser| v.yaml();
    let mut facts = serde_json::json!({
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
    });
    // Stated only when set, so that runs without it record what they always did.
    if let (Some(path), Some(sha), Some(m)) =
        (&cfg.model.init_from, init_sha, facts.as_object_mut())
    {
        m.insert(
            "init_from".into(),
            serde_json::json!({ "path": path.display().to_string(), "sha256": sha }),
        );
    }
    // Stated only when on, so that runs without it record what they always did.
    if !cfg.augmentation.is_off() {
        // Through YAML, so that f32 values keep their short spelling (0.4914, not 0.49140000343).
        let a = serde_yaml::to_string(&cfg.augmentation)
            .ok()
            .and_then(|y| serde_yaml::from_str::<serde_json::Value>(&y).ok());
        if let (Some(m), Some(a)) = (facts.as_object_mut(), a) {
            m.insert("augmentation".into(), a);
        }
    }
    facts
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
