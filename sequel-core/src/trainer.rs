//! The unified trainer: one loop for every algorithm, scenario and backbone (design.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, D};

use crate::algorithm::{Algorithm, EvalCtx, StepCost, StepCtx, TaskCtx};
use crate::checkpoint::{self, Checkpoint, Meta, FORMAT_VERSION};
use crate::config::{EvaluateWith, ExperimentConfig, StepCostRule};
use crate::consolidation::{
    apply, selection_score, Anchor, Consolidation, ConsolidationCtx, ContinueFrom, Evaluate,
    TaskVector,
};
use crate::data::{Batch, GatherBuf, SampleRef, Split, TaskStream};
use crate::error::{Error, Result};
use crate::metrics::{peak_rss_mb, AccuracyMatrix};
use crate::model::{Model, ModelOutput, Snapshot};
use crate::optim::{build_optimizer, LrSchedule, Optimizer};
use crate::outcome::{Control, LogRow, RealTimeTask, Results, RunOutcome, TaskTimes};
use crate::rng::{SeededRng, Stream};
use crate::state::{put_prefixed, take_prefixed, StateDict, StateIo};
use crate::step::{finite_loss, optimize, optimize_with};

/// Receives progress events; every method has a no-op default.
pub trait Progress {
    fn task_start(&mut self, _task: usize, _tasks: usize, _steps: usize) {}
    fn step(&mut self, _step: usize, _loss: f32) {}
    fn task_end(&mut self, _task: usize, _row: &[f64], _times: &TaskTimes) {}
}

/// A `Progress` that ignores everything.
pub struct Silent;
impl Progress for Silent {}

pub struct Trainer {
    pub cfg: ExperimentConfig,
    pub stream: TaskStream,
    pub model: Box<dyn Model>,
    pub algorithm: Box<dyn Algorithm>,
    pub consolidation: Option<Consolidation>,
    /// When set, the evaluated weights are saved to `task-<t>.safetensors` here after each task.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    optimizer: Box<dyn Optimizer>,
    schedule: LrSchedule,
    device: Device,
    data_rng: SeededRng,
    algo_rng: SeededRng,
    consolidation_rng: SeededRng,
    /// The task vectors kept for the consolidator (`anchor: initial` and it asked for them).
    task_vectors: Vec<TaskVector>,
    /// θ₀ and θ̄_{t−1}, kept only with a consolidator.
    initial: Option<Snapshot>,
    previous: Option<Snapshot>,
    /// Stream tasks trained so far, counting the one in training (PaLoRA's class-IL merge).
    seen: usize,
    /// Set by [`Trainer::restore`]: the results of the tasks finished before the resume.
    resumed: Option<Results>,
    /// Fingerprint of the resolved config, recorded in checkpoints.
    pub config_hash: String,
    /// SHA-256 of the `model.init_from` file, recorded in checkpoints: a resume refuses another
    /// file under the same path, so that summary.json names the file the run started from.
    pub init_from_sha256: Option<String>,
    /// Stop (with [`Error::Stopped`] in `RunOutcome::failure`) once this many tasks are done and
    /// checkpointed.
    pub stop_after_task: Option<usize>,
    /// When it becomes true, training stops at the next step; the last checkpoint is intact.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// The sample passes of the last [`Trainer::step`].
    last_cost: StepCost,
}

/// The weights a consolidation of one task works with.
struct Weights<'a> {
    initial: &'a Snapshot,
    previous: &'a Snapshot,
    trained: &'a Snapshot,
    anchor: &'a Snapshot,
    kind: Anchor,
}

/// The two weight sets after a task's consolidation.
struct Consolidated {
    trained: Snapshot,
    consolidated: Snapshot,
}

impl Trainer {
    pub fn new(
        cfg: ExperimentConfig,
        stream: TaskStream,
        model: Box<dyn Model>,
        algorithm: Box<dyn Algorithm>,
        consolidation: Option<Consolidation>,
        device: Device,
    ) -> Self {
        let seed = cfg.seed;
        Self {
            optimizer: build_optimizer(&cfg.optimizer),
            schedule: LrSchedule::new(cfg.optimizer.lr, cfg.optimizer.schedule.clone()),
            cfg,
            stream,
            model,
            algorithm,
            consolidation,
            checkpoint_dir: None,
            device,
            data_rng: SeededRng::new(seed, Stream::DataOrder),
            algo_rng: SeededRng::new(seed, Stream::Algorithm),
            consolidation_rng: SeededRng::new(seed, Stream::Consolidation),
            task_vectors: Vec::new(),
            initial: None,
            previous: None,
            seen: 0,
            resumed: None,
            config_hash: String::new(),
            init_from_sha256: None,
            stop_after_task: None,
            interrupt: None,
            last_cost: StepCost::default(),
        }
    }

    /// `training.mode: independent`: every task fine-tunes θ₀ alone.
    fn independent(&self) -> bool {
        self.cfg.training.mode == crate::config::TrainingMode::Independent
    }

    /// The task vectors τ_t = θ̂_t − θ₀ kept so far by a merging strategy with `anchor: initial`
    /// (empty otherwise), in stream order.
    pub fn task_vectors(&self) -> &[TaskVector] {
        &self.task_vectors
    }

    /// The algorithm as its concrete type (tests and tools inspect it after a run).
    pub fn algorithm<A: Algorithm>(&self) -> Option<&A> {
        (self.algorithm.as_ref() as &dyn std::any::Any).downcast_ref::<A>()
    }

    /// The device the model's tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The running algorithm as its concrete type, mutably (e.g. to read its memory through
    /// [`Algorithm::memory`] after a run).
    pub fn algorithm_mut<A: Algorithm>(&mut self) -> Option<&mut A> {
        (self.algorithm.as_mut() as &mut dyn std::any::Any).downcast_mut::<A>()
    }

    /// Run the whole stream (or, after [`Trainer::restore`], the tasks left): for each task,
    /// train → consolidate and evaluate → checkpoint. A stop (asked for, a non-finite loss or
    /// weights) ends the loop with `failure` set and the finished tasks' results kept.
    pub fn run(&mut self, progress: &mut dyn Progress) -> Result<RunOutcome> {
        // The stream-dependent config checks (also run before a run folder is created, see
        // `experiment::preflight`), for a trainer assembled by hand.
        self.algorithm.check_stream(&self.stream)?;
        if let Some(m) = self.algorithm.memory() {
            m.check(&self.stream)?;
        }
        let mut outcome = match self.resumed.take() {
            Some(results) => RunOutcome {
                results,
                failure: None,
            },
            None => self.start()?,
        };
        // With a pre-training task (`benchmark.base_classes`), stream index `t` is row `t − 1`.
        let first = self.stream.first();
        for r in outcome.matrix.rows.len()..self.stream.len() - first {
            let step = self.stop_before(r).map_or_else(
                || self.task(r + first, progress, &mut outcome.results),
                |stop| Err(Error::Stopped(stop)),
            );
            match step {
                Ok(()) => self.save_state(&outcome)?,
                Err(
                    e @ (Error::NonFiniteLoss { .. }
                    | Error::NonFiniteWeights { .. }
                    | Error::Stopped(_)),
                ) => {
                    outcome.failure = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(outcome)
    }

    /// Why the run stops before task `t`, if it does.
    fn stop_before(&self, t: usize) -> Option<String> {
        if let Some(n) = self.stop_after_task.filter(|&n| n <= t) {
            return Some(format!(
                "stopped after task {n} as asked (--stop-after-task)"
            ));
        }
        // Also checked between tasks: end-of-task work (a GDumb re-fit, Fisher estimates,
        // evaluation) runs no training step that would notice the flag.
        let asked = self
            .interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed));
        (t > 0 && asked).then(|| format!("interrupted after task {t}; its checkpoint is intact"))
    }

    /// Train task `t` (a stream index), consolidate, evaluate, and append the task's rows and
    /// times to `results`.
    fn task(&mut self, t: usize, progress: &mut dyn Progress, results: &mut Results) -> Result<()> {
        let r = t - self.stream.first();
        let start = Instant::now();
        let (steps, realtime) = self.train_task(t, progress, &mut results.log)?;
        // The loss is checked before each step; the weights after the last one are not, and
        // NaN logits would be scored as "class 0" by argmax.
        if !self.weights_finite()? {
            return Err(Error::NonFiniteWeights { task: r + 1 });
        }
        let consolidated = match self.initial.clone() {
            Some(initial) => {
                let previous = self.previous.clone();
                let (c, chosen) = self.consolidate(r, &initial, previous.as_ref())?;
                if !snapshot_finite(&c.consolidated)? {
                    return Err(Error::NonFiniteWeights { task: r + 1 });
                }
                if let Some(v) = chosen {
                    results.chosen.push(f64::from(v));
                    results.chosen_key = self
                        .consolidation
                        .as_ref()
                        .and_then(|c| c.strategy.auto_coefficient())
                        .map(|a| a.key);
                }
                Some(c)
            }
            None => None,
        };
        let train_s = start.elapsed().as_secs_f64();
        let fast = self.swap_in_slow_weights()?;
        let e0 = Instant::now();
        // The model holds θ̂_t here. With a consolidator, the trained weights fill the raw
        // matrix and the evaluated ones the main matrix (evaluated once if they are the same).
        let evaluate = self.consolidation.as_ref().map(|c| c.wiring.evaluate);
        let (row, raw_row) = match (&consolidated, evaluate) {
            (Some(c), Some(evaluate)) => {
                let raw = self.evaluate_all()?;
                let row = match evaluate {
                    Evaluate::Consolidated => {
                        self.model.params().restore(&c.consolidated)?;
                        self.evaluate_all()?
                    }
                    Evaluate::Trained => raw.clone(),
                };
                (row, Some(raw))
            }
            _ => (self.evaluate_all()?, None),
        };
        let times = TaskTimes {
            train_s,
            eval_s: e0.elapsed().as_secs_f64(),
            steps,
            peak_rss_mb: peak_rss_mb(),
        };
        tracing::info!(
            task = r + 1,
            train_s,
            eval_s = times.eval_s,
            "task finished"
        );
        self.save_weights(r)?;
        if let Some(fast) = fast {
            self.model.params().restore(&fast)?;
        }
        if let (Some(c), Some(cons)) = (consolidated, &self.consolidation) {
            let from = match (cons.wiring.continue_from, &self.initial) {
                // `training.mode: independent`: every task starts from θ₀.
                (_, Some(initial)) if self.independent() => initial,
                (ContinueFrom::Consolidated, _) => &c.consolidated,
                (ContinueFrom::Trained, _) => &c.trained,
            };
            self.model.params().restore(from)?;
            self.previous = Some(c.consolidated);
        }
        let (row, control) = self.split_row(row);
        progress.task_end(r, &row, &times);
        results.matrix.rows.push(row);
        if let (Some(c), Some(acc)) = (results.control.as_mut(), control) {
            c.after.push(acc);
        }
        if let (Some(raw), Some(raw_row)) = (results.raw.as_mut(), raw_row) {
            let (raw_row, control) = self.split_row(raw_row);
            raw.rows.push(raw_row);
            if let (Some(c), Some(acc)) = (results.control.as_mut(), control) {
                c.after_raw.push(acc);
            }
        }
        results.times.push(times);
        results.realtime.extend(realtime);
        Ok(())
    }

    /// With `optimizer.lookahead.evaluate_with: slow`, put the slow weights φ into the trainable
    /// parameters for evaluation and return the fast weights to restore afterwards, so training
    /// continues from θ. (Validation refuses `slow` with a consolidation strategy.)
    fn swap_in_slow_weights(&self) -> Result<Option<Snapshot>> {
        let slow = self
            .cfg
            .optimizer
            .lookahead
            .as_ref()
            .map(|l| l.evaluate_with)
            == Some(EvaluateWith::Slow);
        let Some(phi) = self.optimizer.slow_weights().filter(|_| slow) else {
            return Ok(None);
        };
        let params = self.model.params();
        let fast = params.snapshot()?;
        for (p, phi) in params.trainable().zip(phi) {
            p.var.set(phi)?;
        }
        Ok(Some(fast))
    }

    /// A row over every task of the stream split into the stream's tasks and the control
    /// task's accuracy (`None` without a pre-training task).
    fn split_row(&self, mut row: Vec<f64>) -> (Vec<f64>, Option<f64>) {
        if self.stream.control {
            let control = row.remove(0);
            (row, Some(control))
        } else {
            (row, None)
        }
    }

    /// Evaluate the untrained model, pre-train it (with `benchmark.base_classes`), and set up
    /// what a fresh run needs. With a pre-training task the stream's `init` row is the
    /// pre-trained model's, and so is θ₀ of a consolidator.
    fn start(&mut self) -> Result<RunOutcome> {
        let first = self.stream.first();
        let t0 = Instant::now();
        let row = self.evaluate_all()?;
        let (init, control_init) = self.split_row(row);
        let mut outcome = RunOutcome {
            results: Results {
                matrix: AccuracyMatrix {
                    init,
                    rows: Vec::new(),
                    counts: (first..self.stream.len())
                        .map(|j| self.stream.eval_indices(j).0.len())
                        .collect(),
                },
                raw: None,
                times: Vec::new(),
                init_eval_s: t0.elapsed().as_secs_f64(),
                log: Vec::new(),
                control: None,
                chosen: Vec::new(),
                chosen_key: None,
                independent: self.independent(),
                realtime: Vec::new(),
            },
            failure: None,
        };
        if let Some(control_init) = control_init {
            let t1 = Instant::now();
            let steps = self.pretrain(&mut outcome.log)?;
            let train_s = t1.elapsed().as_secs_f64();
            if !self.weights_finite()? {
                return Err(Error::NonFiniteWeights { task: 0 });
            }
            let t2 = Instant::now();
            let row = self.evaluate_all()?;
            let (init, pretrained) = self.split_row(row);
            outcome.init_eval_s += t2.elapsed().as_secs_f64();
            outcome.matrix.init = init;
            outcome.control = Some(Control {
                init: control_init,
                pretrained: pretrained.unwrap_or_default(),
                after: Vec::new(),
                after_raw: Vec::new(),
                count: self.stream.eval_indices(0).0.len(),
                train_s,
                steps,
            });
        }
        if self.consolidation.is_some() {
            outcome.raw = Some(outcome.matrix.clone());
            // θ₀ is only needed by a consolidator.
            self.initial = Some(self.model.params().snapshot()?);
            if self.stream.control {
                // The pre-trained model is θ̄_0: the first stream task is consolidated too.
                self.previous = self.initial.clone();
            }
        }
        Ok(outcome)
    }

    /// Train the pre-training task (stream index 0 with `benchmark.base_classes`) with the plain
    /// step: cross-entropy on its own samples, no algorithm hook, no memory, the optimizer reset
    /// before and after. Its log rows are task 0. Returns the number of optimizer steps.
    fn pretrain(&mut self, log: &mut Vec<LogRow>) -> Result<usize> {
        self.optimizer.reset();
        self.adapt_for_training(0)?;
        let mut order = crate::algorithm::task_samples(&self.stream, 0);
        let epochs = self
            .cfg
            .benchmark
            .base_epochs
            .unwrap_or(self.cfg.training.epochs);
        let total = order.len().div_ceil(self.cfg.training.batch_size) * epochs;
        tracing::info!(samples = order.len(), steps = total, "pre-training started");
        let mut forwarded = vec![false; self.stream.len()];
        forwarded[0] = true;
        let stopped = || "interrupted during pre-training; nothing was checkpointed".to_string();
        self.epochs(
            &mut order,
            epochs,
            (0, &stopped),
            &mut Silent,
            log,
            |s, epoch, step, batch| {
                let out = s.model.forward(&batch.x, true)?;
                let loss = crate::loss::task_loss(&out.logits, &batch, &s.stream)?;
                let value = finite_loss(&loss, (0, epoch + 1, step + 1))?;
                optimize(
                    &loss,
                    s.model.as_ref(),
                    &s.stream,
                    &forwarded,
                    s.cfg.training.clip_grad_norm,
                    s.optimizer.as_mut(),
                    |_| Ok(()),
                )?;
                Ok(Some((value, out, batch)))
            },
        )
    }

    /// The epoch loop of pre-training and of every stream task: shuffle `order` with the data
    /// stream, cut it into batches, stop at an interrupt (with the message of `stop.1`), set the
    /// scheduled learning rate, and hand each batch to `each`. `each` returns the loss, output
    /// and batch of the step it took, or `None` when it trained on nothing; sampled steps are
    /// logged as task `stop.0`. Returns the number of batches.
    fn epochs(
        &mut self,
        order: &mut [SampleRef],
        epochs: usize,
        stop: (usize, &dyn Fn() -> String),
        progress: &mut dyn Progress,
        log: &mut Vec<LogRow>,
        mut each: impl FnMut(
            &mut Self,
            usize,
            usize,
            Batch,
        ) -> Result<Option<(f32, ModelOutput, Batch)>>,
    ) -> Result<usize> {
        let bs = self.cfg.training.batch_size;
        let total = order.len().div_ceil(bs) * epochs;
        let mut buf = GatherBuf::default();
        let log_every = self.cfg.training.log_every;
        let mut step = 0;
        for epoch in 0..epochs {
            self.data_rng.shuffle(order);
            for chunk in order.chunks(bs) {
                if self
                    .interrupt
                    .as_ref()
                    .is_some_and(|f| f.load(Ordering::Relaxed))
                {
                    return Err(Error::Stopped(stop.1()));
                }
                let lr = self.schedule.lr(epoch, step, total);
                self.optimizer.set_learning_rate(lr);
                let batch = self.stream.gather_train(chunk, &mut buf, &self.device)?;
                if let Some((value, out, trained)) = each(self, epoch, step, batch)? {
                    if log_every > 0 && step % log_every == 0 {
                        log.push(LogRow {
                            task: stop.0,
                            epoch: epoch + 1,
                            step: step + 1,
                            loss: value,
                            batch_acc: self.batch_accuracy(&out.logits, &trained)?,
                            lr,
                        });
                    }
                    progress.step(step, value);
                }
                step += 1;
            }
        }
        Ok(step)
    }

    /// Write the full state after a task (see [`crate::checkpoint`]). Without a checkpoint
    /// folder nothing is written.
    fn save_state(&mut self, outcome: &RunOutcome) -> Result<()> {
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(());
        };
        let mut algo = StateDict::new();
        let mut io = StateIo::save(&mut algo);
        self.algorithm.state(&mut io)?;
        if let Some(m) = self.algorithm.memory() {
            m.state(&mut io)?;
        }
        let mut tensors = StateDict::new();
        let params = self.model.params();
        for p in params.iter() {
            tensors.insert(format!("model.{}", p.name), p.var.as_tensor().copy()?);
        }
        put_prefixed(&mut tensors, "optim.", self.optimizer.save_state()?);
        put_prefixed(&mut tensors, "algo.", algo);
        let mut put_snapshot = |key: &str, s: &Snapshot| {
            for (p, t) in params.iter().zip(&s.tensors) {
                tensors.insert(format!("cons.{key}.{}", p.name), t.clone());
            }
        };
        if let Some(s) = &self.initial {
            put_snapshot("initial", s);
        }
        if let Some(s) = &self.previous {
            put_snapshot("previous", s);
        }
        for (k, tv) in self.task_vectors.iter().enumerate() {
            for (p, v) in params.iter().zip(&tv.values) {
                if let Some(v) = v {
                    tensors.insert(
                        format!("cons.tv{k}.{}", p.name),
                        Tensor::from_slice(v, v.len(), &Device::Cpu)?,
                    );
                }
            }
        }
        let meta = Meta {
            version: FORMAT_VERSION,
            tasks_done: outcome.matrix.rows.len(),
            config_hash: self.config_hash.clone(),
            init_from_sha256: self.init_from_sha256.clone(),
            tensors_crc32: 0,
            data_rng: self.data_rng.state(),
            algo_rng: self.algo_rng.state(),
            consolidation_rng: self.consolidation_rng.state(),
            model_rngs: self.model.rng_states(),
            augment_rng: self.stream.augment_state(),
            task_vectors: self.task_vectors.len(),
            has_initial: self.initial.is_some(),
            has_previous: self.previous.is_some(),
            results: outcome.results.clone(),
        };
        checkpoint::save(dir, meta, &tensors)
    }

    /// Put the trainer in the state a checkpoint recorded; [`Trainer::run`] then trains the
    /// remaining tasks exactly as the uninterrupted run would have.
    pub fn restore(&mut self, ckpt: Checkpoint) -> Result<()> {
        let Checkpoint { meta, tensors } = ckpt;
        // Checkpoints are read into host memory; a run checkpointed on one device resumes on
        // another (a no-op on the CPU).
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&self.device)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        if meta.config_hash != self.config_hash {
            return Err(Error::msg(
                "the checkpoint was written by a different config (hash mismatch); resume with \
                 `sequel run --resume DIR` alone (it uses the run's own config.yaml), or start a new run",
            ));
        }
        if meta.init_from_sha256 != self.init_from_sha256 {
            let sha = |s: &Option<String>| s.clone().unwrap_or_else(|| "none".into());
            return Err(Error::msg(format!(
                "model.init_from: the file differs from the one the run started from (sha256 {} \
                 then, {} now); put the original file back or start a new run",
                sha(&meta.init_from_sha256),
                sha(&self.init_from_sha256)
            )));
        }
        let missing = |k: &str| Error::msg(format!("checkpoint lacks `{k}`"));
        let params = self.model.params();
        for p in params.iter() {
            let k = format!("model.{}", p.name);
            let t = tensors.get(&k).ok_or_else(|| missing(&k))?;
            p.var
                .set(&t.to_dtype(p.var.dtype())?.to_device(&self.device)?)?;
        }
        let snapshot = |key: &str| -> Result<Snapshot> {
            let tensors = params
                .iter()
                .map(|p| {
                    let k = format!("cons.{key}.{}", p.name);
                    tensors.get(&k).cloned().ok_or_else(|| missing(&k))
                })
                .collect::<Result<_>>()?;
            Ok(Snapshot { tensors })
        };
        self.initial = meta.has_initial.then(|| snapshot("initial")).transpose()?;
        self.previous = meta
            .has_previous
            .then(|| snapshot("previous"))
            .transpose()?;
        self.task_vectors = (0..meta.task_vectors)
            .map(|k| {
                let values = params
                    .iter()
                    .map(|p| {
                        tensors
                            .get(&format!("cons.tv{k}.{}", p.name))
                            .map(|t| t.to_vec1::<f32>())
                            .transpose()
                    })
                    .collect::<std::result::Result<_, _>>()?;
                Ok(TaskVector { values })
            })
            .collect::<Result<_>>()?;
        self.optimizer
            .load_state(&take_prefixed(&tensors, "optim."))?;
        let algo = take_prefixed(&tensors, "algo.");
        let mut io = StateIo::load(&algo);
        self.algorithm.state(&mut io)?;
        if let Some(m) = self.algorithm.memory() {
            m.state(&mut io)?;
        }
        self.data_rng = SeededRng::from(meta.data_rng);
        self.algo_rng = SeededRng::from(meta.algo_rng);
        self.consolidation_rng = SeededRng::from(meta.consolidation_rng);
        self.model.set_rng_states(&meta.model_rngs)?;
        match (meta.augment_rng, self.stream.augment_state()) {
            (Some(s), Some(_)) => self.stream.set_augment_state(s),
            (None, None) => {}
            _ => {
                return Err(Error::msg(
                    "the checkpoint's data augmentation does not match the config's; resume with \
                     the run's own config.yaml",
                ))
            }
        }
        self.resumed = Some(meta.results);
        Ok(())
    }

    /// Run the consolidator on the trained weights of stream task `r` (0-based row, held by the
    /// model). `previous` is θ̄_{r−1}, `None` before the first task. With an automatic
    /// coefficient, returns the value chosen on validation data too.
    fn consolidate(
        &mut self,
        r: usize,
        initial: &Snapshot,
        previous: Option<&Snapshot>,
    ) -> Result<(Consolidated, Option<f32>)> {
        let Some(cons) = self.consolidation.as_ref() else {
            return Err(Error::msg("consolidate called without a consolidator"));
        };
        let anchor_kind = cons.wiring.anchor;
        let keeps = anchor_kind == Anchor::Initial && cons.strategy.keeps_task_vectors();
        let auto = cons.strategy.auto_coefficient();
        let trained = self.model.params().snapshot()?;
        // θ̄_0: θ₀ with `initial`; with `previous` there is no model before task 1 worth pulling
        // towards (θ₀ is an untrained initialisation), so task 1 is its own anchor (with a
        // pre-training task, `previous` is the pre-trained model from the start).
        let previous = match (previous, anchor_kind) {
            (Some(p), _) => p.clone(),
            (None, Anchor::Initial) => initial.clone(),
            (None, Anchor::Previous) => trained.clone(),
        };
        let anchor = match anchor_kind {
            Anchor::Initial => initial.clone(),
            Anchor::Previous => previous.clone(),
        };
        let tau = TaskVector::between(self.model.params(), &anchor, &trained)?;
        // Taken out of `self` while in use, so that candidates can be evaluated.
        let mut vectors = if keeps {
            std::mem::take(&mut self.task_vectors)
        } else {
            Vec::new()
        };
        vectors.push(tau);
        let w = Weights {
            initial,
            previous: &previous,
            trained: &trained,
            anchor: &anchor,
            kind: anchor_kind,
        };
        let chosen = match auto {
            Some(auto) => Some(self.choose(r, &auto.grid, &w, &vectors)?),
            None => None,
        };
        let mut rng = std::mem::replace(
            &mut self.consolidation_rng,
            SeededRng::new(0, Stream::Consolidation),
        );
        let consolidated = self.merge(r, chosen, &w, &vectors, &mut rng);
        self.consolidation_rng = rng;
        if keeps {
            self.task_vectors = vectors;
        }
        Ok((
            Consolidated {
                trained,
                consolidated: consolidated?,
            },
            chosen,
        ))
    }

    /// The consolidated weights of stream task `r` with the strategy's coefficient set to
    /// `value` (if given), drawing from `rng`.
    fn merge(
        &mut self,
        r: usize,
        value: Option<f32>,
        w: &Weights,
        vectors: &[TaskVector],
        rng: &mut SeededRng,
    ) -> Result<Snapshot> {
        let Some(cons) = self.consolidation.as_mut() else {
            return Err(Error::msg("consolidate called without a consolidator"));
        };
        if let Some(v) = value {
            cons.strategy.set_coefficient(v);
        }
        let params = self.model.params();
        let current = vectors.last().ok_or_else(|| Error::msg("no task vector"))?;
        let merged = cons.strategy.consolidate(&mut ConsolidationCtx {
            task: r,
            params,
            initial: w.initial,
            previous: w.previous,
            trained: w.trained,
            anchor: w.kind,
            task_vectors: vectors,
            rng,
        })?;
        apply(params, w.anchor, w.trained, current, &merged)
    }

    /// Choose the strategy's automatic coefficient for stream task `r` on validation data by the
    /// LiNeS rule ([`selection_score`]): the target is task `r`, normalised by the trained
    /// weights' accuracy; the control tasks are the pre-training task if there is one, else the
    /// earlier stream tasks, normalised by the anchor weights' accuracy. Every candidate draws
    /// from a copy of the consolidation stream, so the search shifts no random draw. The model
    /// holds the trained weights again afterwards.
    fn choose(
        &mut self,
        r: usize,
        grid: &[f32],
        w: &Weights,
        vectors: &[TaskVector],
    ) -> Result<f32> {
        let first = self.stream.first();
        let target = r + first;
        if self.independent() && vectors.len() == r + 1 {
            return self.choose_multi_task(r, grid, w, vectors);
        }
        let controls: Vec<usize> = if self.stream.control {
            vec![0]
        } else {
            (first..target).collect()
        };
        let mut tasks = vec![target];
        tasks.extend(&controls);
        let target_ref = self.valid_accuracies(&[target])?[0];
        self.model.params().restore(w.anchor)?;
        let control_ref = self.valid_accuracies(&controls)?;
        let mut best: Option<(f32, f64)> = None;
        for &v in grid {
            let mut rng = SeededRng::from(self.consolidation_rng.state());
            let candidate = self.merge(r, Some(v), w, vectors, &mut rng)?;
            self.model.params().restore(&candidate)?;
            let acc = self.valid_accuracies(&tasks)?;
            let control: Vec<(f64, f64)> = acc[1..]
                .iter()
                .copied()
                .zip(control_ref.iter().copied())
                .collect();
            let score = selection_score(acc[0], target_ref, &control);
            if best.is_none_or(|(_, s)| score >= s) {
                best = Some((v, score));
            }
        }
        self.model.params().restore(w.trained)?;
        best.map(|(v, _)| v)
            .ok_or_else(|| Error::msg("the automatic coefficient's grid is empty"))
    }

    /// [`Self::choose`] for `training.mode: independent` with every task vector kept: the LiNeS
    /// paper's multi-task rule (§4), the mean over the stream tasks so far of the candidate's
    /// validation accuracy normalised by the individually fine-tuned model's, θ₀ + τ_j (task j's
    /// own weights for the task just trained, rebuilt from its task vector for the earlier
    /// ones). A reference accuracy of 0 leaves the task out. Ties go to the larger value.
    fn choose_multi_task(
        &mut self,
        r: usize,
        grid: &[f32],
        w: &Weights,
        vectors: &[TaskVector],
    ) -> Result<f32> {
        let first = self.stream.first();
        let tasks: Vec<usize> = (first..=r + first).collect();
        let none = vectors[r].zeros_like();
        let mut refs = Vec::with_capacity(tasks.len());
        for (j, tau) in vectors.iter().enumerate() {
            let own = if j == r {
                w.trained.clone()
            } else {
                apply(self.model.params(), w.anchor, w.anchor, &none, tau)?
            };
            self.model.params().restore(&own)?;
            refs.push(self.valid_accuracies(&[j + first])?[0]);
        }
        let mut best: Option<(f32, f64)> = None;
        for &v in grid {
            let mut rng = SeededRng::from(self.consolidation_rng.state());
            let candidate = self.merge(r, Some(v), w, vectors, &mut rng)?;
            self.model.params().restore(&candidate)?;
            let acc = self.valid_accuracies(&tasks)?;
            let norm: Vec<f64> = acc
                .iter()
                .zip(&refs)
                .filter(|(_, &reference)| reference > 0.0)
                .map(|(a, reference)| a / reference)
                .collect();
            let score = norm.iter().sum::<f64>() / norm.len().max(1) as f64;
            if best.is_none_or(|(_, s)| score >= s) {
                best = Some((v, score));
            }
        }
        self.model.params().restore(w.trained)?;
        best.map(|(v, _)| v)
            .ok_or_else(|| Error::msg("the automatic coefficient's grid is empty"))
    }

    /// Accuracy of the model's current weights on the validation split of each task in `tasks`.
    fn valid_accuracies(&mut self, tasks: &[usize]) -> Result<Vec<f64>> {
        let ctx = EvalCtx {
            stream: &self.stream,
            model: self.model.as_ref(),
            device: &self.device,
        };
        self.adapt_for_eval_hooks()?;
        self.algorithm.before_eval(&ctx)?;
        let accs = tasks
            .iter()
            .map(|&j| {
                let refs: Vec<SampleRef> = self.stream.tasks[j]
                    .valid
                    .iter()
                    .map(|&index| SampleRef {
                        task: j as u32,
                        index,
                    })
                    .collect();
                self.evaluate_refs(j, &refs, Split::Train)
            })
            .collect();
        self.algorithm.after_eval(&ctx)?;
        accs
    }

    fn weights_finite(&self) -> Result<bool> {
        for p in self.model.params().iter() {
            let s = p
                .var
                .as_tensor()
                .sum_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_scalar::<f32>()?;
            if !s.is_finite() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Save the model's current weights (the evaluated ones) as `task-<t>.safetensors`.
    fn save_weights(&self, t: usize) -> Result<()> {
        let Some(dir) = &self.checkpoint_dir else {
            return Ok(());
        };
        let path = dir.join(format!("task-{}.safetensors", t + 1));
        let tmp = dir.join(format!(".task-{}.safetensors.tmp", t + 1));
        candle_core::safetensors::save(&self.model.params().to_named(), &tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }

    /// Train on task `t`; returns the number of optimizer steps and, with `training.realtime`,
    /// the task's latency-aware evaluation.
    fn train_task(
        &mut self,
        t: usize,
        progress: &mut dyn Progress,
        log: &mut Vec<LogRow>,
    ) -> Result<(usize, Option<RealTimeTask>)> {
        let mut order = self.begin_task(t)?;
        let epochs = self.cfg.training.epochs;
        let total = order.len().div_ceil(self.cfg.training.batch_size) * epochs;
        // Tasks are numbered within the stream (the pre-training task is task 0).
        let first = self.stream.first();
        let number = t + 1 - first;
        tracing::info!(
            task = number,
            samples = order.len(),
            steps = total,
            "task started"
        );
        progress.task_start(t - first, self.stream.len() - first, total);
        let stopped = || {
            format!("interrupted during task {number}; the checkpoint of the last finished task is intact")
        };
        let stop = (number, &stopped as &dyn Fn() -> String);
        let (steps, realtime) = match self.cfg.training.realtime.clone() {
            None => {
                let steps =
                    self.epochs(&mut order, epochs, stop, progress, log, |s, e, i, b| {
                        let (value, out) = s.step(t, e, i, &b)?;
                        Ok(Some((value, out, b)))
                    })?;
                (steps, None)
            }
            Some(rt) => {
                let mut task = RealTimeTask::default();
                // Arrived batches whose labels are not yet used: batch i − Δ … i.
                let mut queue = std::collections::VecDeque::new();
                let mut busy_until = 0.0;
                // While a step is still running, the weights from before it predict.
                let mut deployed: Option<Snapshot> = None;
                let fixed = match rt.cost {
                    StepCostRule::Fixed(c) => Some(c),
                    StepCostRule::Rule(_) => None,
                };
                self.epochs(&mut order, epochs, stop, progress, log, |s, e, i, b| {
                    task.batches += 1;
                    task.samples += b.incoming;
                    if (i as f64) >= busy_until {
                        deployed = None;
                    }
                    task.correct += match &deployed {
                        Some(w) => {
                            let trained = s.model.params().snapshot()?;
                            s.model.params().restore(w)?;
                            let correct = s.online_correct(t, &b);
                            s.model.params().restore(&trained)?;
                            correct?
                        }
                        None => s.online_correct(t, &b)?,
                    };
                    queue.push_back(b);
                    if queue.len() > rt.label_delay + 1 {
                        queue.pop_front();
                    }
                    if (i as f64) < busy_until || queue.len() <= rt.label_delay {
                        return Ok(None);
                    }
                    let Some(b) = queue.pop_front() else {
                        return Ok(None);
                    };
                    // Only a step that outlasts the next arrival needs the weights before it.
                    let before = match fixed {
                        Some(c) if c <= 1.0 => None,
                        _ => Some(s.model.params().snapshot()?),
                    };
                    let start = Instant::now();
                    let (value, out) = s.step(t, e, i, &b)?;
                    task.step_s += start.elapsed().as_secs_f64();
                    let c = fixed.unwrap_or_else(|| s.last_cost.relative(b.len()));
                    task.cost_sum += c;
                    task.trained += 1;
                    busy_until = i as f64 + c;
                    if busy_until > (i + 1) as f64 {
                        deployed = before;
                    }
                    Ok(Some((value, out, b)))
                })?;
                (task.trained, Some(task))
            }
        };
        self.end_task(t)?;
        Ok((steps, realtime))
    }

    /// How many of `batch`'s incoming samples the current weights predict right, from the
    /// evaluation-mode logits (over task `t`'s units where evaluation masks them) on the
    /// inputs without augmentation. The algorithm's own `predict` is not used: it may need
    /// `before_eval`'s work over the whole memory (class means), which an online prediction
    /// cannot wait for.
    fn online_correct(&self, t: usize, batch: &Batch) -> Result<usize> {
        let plain;
        let batch = if self.stream.augment_state().is_some() {
            let mut buf = GatherBuf::default();
            plain = self
                .stream
                .gather(&batch.refs, Split::Train, &mut buf, &self.device)?;
            &plain
        } else {
            batch
        };
        let logits = self.model.forward(&batch.x, false)?.logits;
        let pred = self.predicted(&logits, t)?;
        Ok(pred
            .iter()
            .zip(&batch.units)
            .take(batch.incoming)
            .filter(|(p, y)| p == y)
            .count())
    }

    /// Start task `t`: reset the optimizer if asked, run the algorithm's `before_task` (and create
    /// its memory); returns the samples to train on.
    pub fn begin_task(&mut self, t: usize) -> Result<Vec<SampleRef>> {
        self.adapt_for_training(t)?;
        if t <= self.stream.first() || self.cfg.optimizer.reset_each_task || self.independent() {
            self.optimizer.reset();
        }
        if self.independent() && t > self.stream.first() {
            // Each later task's order from its own stream, so that a task trains exactly as it
            // would after any other first task; the first keeps the run's stream, as fine-tuning
            // on it alone would.
            self.data_rng = SeededRng::derived(self.cfg.seed, Stream::DataOrder, t as u64);
        }
        let mut ctx = TaskCtx {
            task: t,
            stream: &self.stream,
            model: self.model.as_ref(),
            device: &self.device,
            rng: &mut self.algo_rng,
            interrupt: self.interrupt.as_deref(),
        };
        self.algorithm.before_task(&mut ctx)?;
        if let Some(m) = self.algorithm.memory() {
            m.ensure(ctx.stream, ctx.rng)?;
        }
        self.algorithm.training_samples(&mut ctx)
    }

    /// One optimisation step of task `t` on the incoming `batch`: the algorithm's loss (which
    /// forwards what it needs), the step rules of [`optimize`] with the algorithm's gradient edit,
    /// then `after_step` and the memory's insertion. Returns the loss value and the incoming
    /// batch's training-mode output. `epoch` and `step` are 0-based.
    pub fn step(
        &mut self,
        t: usize,
        epoch: usize,
        step: usize,
        batch: &Batch,
    ) -> Result<(f32, ModelOutput)> {
        let mut ctx = StepCtx::new(
            t,
            epoch,
            step,
            &self.stream,
            self.model.as_ref(),
            &self.device,
            &mut self.algo_rng,
            batch,
        );
        let loss = self.algorithm.loss(batch, &mut ctx)?;
        let out = ctx.incoming_output().cloned().ok_or_else(|| {
            Error::msg(
                "the algorithm's loss did not forward the incoming batch: pass the `batch` it \
                 received to StepCtx::forward",
            )
        })?;
        let value = finite_loss(&loss, (t + 1 - self.stream.first(), epoch + 1, step + 1))?;
        let forwarded = ctx.forwarded_tasks().to_vec();
        let own = self.algorithm.own_params().cloned();
        let algorithm = &mut self.algorithm;
        optimize_with(
            &loss,
            self.model.as_ref(),
            own.as_ref(),
            &self.stream,
            &forwarded,
            self.cfg.training.clip_grad_norm,
            self.optimizer.as_mut(),
            |grads| algorithm.edit_gradients(grads, &mut ctx),
        )?;
        self.algorithm.after_step(batch, &out, &mut ctx)?;
        self.last_cost = ctx.cost();
        if let Some(m) = self.algorithm.memory() {
            m.after_step(batch, &out)?;
        }
        Ok((value, out))
    }

    /// The sample passes of the last [`Trainer::step`] ([`StepCost`]).
    pub fn last_step_cost(&self) -> StepCost {
        self.last_cost
    }

    /// End task `t`: fill the memory (task-end insertion), then the algorithm's `after_task`.
    pub fn end_task(&mut self, t: usize) -> Result<()> {
        let mut ctx = TaskCtx {
            task: t,
            stream: &self.stream,
            model: self.model.as_ref(),
            device: &self.device,
            rng: &mut self.algo_rng,
            interrupt: self.interrupt.as_deref(),
        };
        if let Some(m) = self.algorithm.memory() {
            m.after_task(t, ctx.stream, ctx.model, ctx.device, ctx.rng)?;
        }
        self.algorithm.after_task(&mut ctx)
    }

    /// Accuracy on every task, seen or not, of the model's current weights.
    pub fn evaluate_all(&mut self) -> Result<Vec<f64>> {
        let ctx = EvalCtx {
            stream: &self.stream,
            model: self.model.as_ref(),
            device: &self.device,
        };
        self.adapt_for_eval_hooks()?;
        self.algorithm.before_eval(&ctx)?;
        let row = (0..self.stream.len()).map(|j| self.evaluate(j)).collect();
        self.algorithm.after_eval(&ctx)?;
        row
    }

    /// Accuracy on task `j`'s evaluation split (after [`Algorithm::before_eval`]).
    fn evaluate(&self, j: usize) -> Result<f64> {
        let (refs, split) = self.stream.eval_refs(j);
        self.evaluate_refs(j, &refs, split)
    }

    /// Accuracy on samples `refs` of task `j` in `split` (after [`Algorithm::before_eval`]).
    fn evaluate_refs(&self, j: usize, refs: &[SampleRef], split: Split) -> Result<f64> {
        if refs.is_empty() {
            return Ok(0.0);
        }
        let mut buf = GatherBuf::default();
        let mut correct = 0usize;
        let ctx = EvalCtx {
            stream: &self.stream,
            model: self.model.as_ref(),
            device: &self.device,
        };
        self.adapt_for_evaluation(j)?;
        for chunk in refs.chunks(self.cfg.training.eval_batch_size) {
            let batch = self.stream.gather(chunk, split, &mut buf, &self.device)?;
            let out = self.model.forward(&batch.x, false)?;
            let scores = match self.algorithm.predict(&out, j, &ctx)? {
                Some(s) => s,
                None => out.logits,
            };
            let pred = self.predicted(&scores, j)?;
            correct += pred
                .iter()
                .zip(&batch.units)
                .filter(|(p, y)| p == y)
                .count();
        }
        Ok(correct as f64 / refs.len() as f64)
    }
}

impl Trainer {
    /// PaLoRA (`model.lora`): train stream task `t` through its own adapter, `λ = one-hot(t)`,
    /// with the backbone frozen once `freeze_backbone_after` stream tasks are done. In task-IL
    /// the adapters are in per-row mode: a forward pass that knows its rows' tasks
    /// ([`crate::algorithm::StepCtx::forward`], [`crate::model::forward_batch`]) sends each row,
    /// replayed ones included, through its own task's adapter; other forwards use `one-hot(t)`.
    /// In class-IL every forward of the task uses `one-hot(t)`, replayed rows included (the
    /// evaluated model is the merge, so each adapter trains on what the merge will see).
    /// Stateless (a function of `t`), so a resumed run sets the same. No-op without adapters.
    fn adapt_for_training(&mut self, t: usize) -> Result<()> {
        self.seen = t + 1;
        let Some(a) = self.model.adapters() else {
            return Ok(());
        };
        a.select(t)?;
        a.set_per_row(self.stream.mask_in_eval());
        let done = t.saturating_sub(self.stream.first());
        let frozen =
            t >= self.stream.first() && a.config().freeze_backbone_after.is_some_and(|n| done >= n);
        a.set_backbone_frozen(frozen);
        Ok(())
    }

    /// PaLoRA: evaluate task `j` through its adapter where the scenario gives the task at test
    /// time (task-IL), else through the merge of the adapters trained so far
    /// ([`crate::model::Adapters::merged`]). No-op without adapters.
    fn adapt_for_evaluation(&self, j: usize) -> Result<()> {
        let Some(a) = self.model.adapters() else {
            return Ok(());
        };
        if self.stream.mask_in_eval() {
            a.set_per_row(true);
            a.select(j)
        } else {
            a.set_per_row(false);
            a.merged(self.seen)
        }
    }

    /// PaLoRA: what [`Algorithm::before_eval`] sees (set before it is called). Task-IL: per-row
    /// mode, so a hook's [`crate::model::forward_batch`] over memory sends each row through its
    /// own task's adapter, as evaluation will; a plain `Model::forward` uses `one-hot` of the
    /// last trained task. Class-IL: the merge evaluation uses. No-op without adapters.
    fn adapt_for_eval_hooks(&self) -> Result<()> {
        if self.model.adapters().is_none() {
            return Ok(());
        }
        self.adapt_for_evaluation(self.seen.saturating_sub(1))
    }
}

fn snapshot_finite(s: &Snapshot) -> Result<bool> {
    for t in &s.tensors {
        let v = t
            .sum_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        if !v.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Trainer {
    /// The predicted unit of each row of `scores` (`N × U`) for task `j`: the argmax over task
    /// `j`'s units where evaluation masks them, else over every unit.
    fn predicted(&self, scores: &Tensor, j: usize) -> Result<Vec<u32>> {
        Ok(if self.stream.mask_in_eval() {
            let r = &self.stream.tasks[j].units;
            let p: Vec<u32> = scores
                .narrow(1, r.start, r.len())?
                .argmax(D::Minus1)?
                .to_vec1()?;
            p.into_iter().map(|u| u + r.start as u32).collect()
        } else {
            scores.argmax(D::Minus1)?.to_vec1::<u32>()?
        })
    }

    /// Training accuracy of a batch's incoming samples under the training mask (per sample in
    /// multi-head task-IL).
    fn batch_accuracy(&self, logits: &Tensor, batch: &crate::data::Batch) -> Result<f64> {
        let pred = if self.stream.mask_in_training() {
            let masked = logits.broadcast_add(&crate::loss::unit_mask(
                batch,
                &self.stream,
                logits.dim(D::Minus1)?,
            )?)?;
            crate::loss::predict_units(&masked, None)?
        } else {
            crate::loss::predict_units(logits, None)?
        };
        // Replayed samples are not part of the stream: they do not count.
        let n = batch.incoming;
        let ok = pred[..n]
            .iter()
            .zip(&batch.units[..n])
            .filter(|(p, y)| p == y)
            .count();
        Ok(ok as f64 / n.max(1) as f64)
    }
}
