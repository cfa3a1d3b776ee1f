//! Latency-aware ("real-time") evaluation, `training.realtime` (Ghunaim et al., CVPR 2023), and
//! the deterministic step cost it charges ([`sequel_core::StepCost`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use sequel_algos::naive::Naive;
use sequel_algos::testing::{mini_trainer, observe_run, probe_run, probed, Observer};
use sequel_algos::Registry;
use sequel_core::data::{Batch, GatherBuf, SampleRef, Split};
use sequel_core::model::{DenseForward, ParamSet};
use sequel_core::rng::RngState;
use sequel_core::{Model, ModelOutput, Result, RunOutcome, StepCtx};

/// The incoming samples of every step, per task, in training order.
fn trained(steps: &[sequel_algos::testing::StepRecord], task: usize) -> Vec<Vec<SampleRef>> {
    steps
        .iter()
        .filter(|s| s.task == task)
        .map(|s| s.parts[0].clone())
        .collect()
}

fn realtime(cost: &str, delay: usize) -> Vec<String> {
    vec![format!(
        "training.realtime={{ cost: {cost}, label_delay: {delay} }}"
    )]
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Counts the rows of every incoming batch the weights at its arrival predict right, from
/// inside the step (before the update), as ordinary online accuracy is defined.
#[derive(Default)]
struct OnlineAccuracy {
    correct: Vec<usize>,
}

impl Observer<Naive> for OnlineAccuracy {
    fn loss(&mut self, algo: &mut Naive, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let pred: Vec<u32> = ctx
            .model
            .forward(&batch.x, false)?
            .logits
            .argmax(1)?
            .to_vec1()?;
        if self.correct.len() <= ctx.task {
            self.correct.resize(ctx.task + 1, 0);
        }
        self.correct[ctx.task] += pred
            .iter()
            .zip(&batch.units)
            .filter(|(p, y)| p == y)
            .count();
        sequel_core::Algorithm::loss(algo, batch, ctx)
    }
}

#[test]
fn cost_one_is_ordinary_online_accuracy_and_trains_exactly_as_without_it() {
    let (plain, _) = probe_run(Naive, &[]);
    let plain_rows = plain_rows(&[]);
    let rt = realtime("1", 0);
    let (t, out) = observe_run(Naive, OnlineAccuracy::default(), &args(&rt));
    // Predicting each batch on arrival changes nothing in training.
    assert_eq!(out.matrix.rows, plain_rows);
    assert_eq!(
        probed::<Naive>(&plain).steps.len(),
        out.realtime.iter().map(|r| r.trained).sum::<usize>()
    );
    let hand = &sequel_algos::testing::observed::<Naive, OnlineAccuracy>(&t)
        .observer
        .correct;
    assert_eq!(out.realtime.len(), 5);
    for (task, r) in out.realtime.iter().enumerate() {
        assert_eq!((r.batches, r.trained, r.samples), (5, 5, 50), "task {task}");
        assert_eq!(r.correct, hand[task], "task {task}");
        assert_eq!(r.cost_sum, 5.0);
    }
    // After task 1 the weights predict something right.
    assert!(out.online_acc(5).unwrap() > 0.0);
}

fn plain_rows(overrides: &[&str]) -> Vec<Vec<f64>> {
    sequel_algos::testing::mini_run(Box::new(Naive), overrides).0
}

#[test]
fn cost_two_trains_on_exactly_every_other_batch_and_a_label_delay_shifts_them() {
    let (all, _) = probe_run(Naive, &args(&realtime("1", 0)));
    let (half, out) = probe_run(Naive, &args(&realtime("2", 0)));
    let (late, delayed) = probe_run(Naive, &args(&realtime("1", 1)));
    let (slow_late, _) = probe_run(Naive, &args(&realtime("1.5", 2)));
    for task in 0..5 {
        // The arrival order does not depend on what is trained.
        let every = trained(&probed::<Naive>(&all).steps, task);
        assert_eq!(every.len(), 5);
        let every_other: Vec<_> = every.iter().step_by(2).cloned().collect();
        assert_eq!(trained(&probed::<Naive>(&half).steps, task), every_other);
        assert_eq!(out.realtime[task].trained, 3);
        assert_eq!(out.realtime[task].batches, 5);
        // Δ = 1: at arrival i the labelled batch is i − 1; the last batch is never trained on.
        assert_eq!(trained(&probed::<Naive>(&late).steps, task), every[..4]);
        assert_eq!(delayed.realtime[task].trained, 4);
        // C = 1.5 trains at arrivals 2 and 4 (⌈C⌉ = 2 apart, the first once Δ = 2 labels
        // exist): batches 0 and 2.
        assert_eq!(
            trained(&probed::<Naive>(&slow_late).steps, task),
            [every[0].clone(), every[2].clone()]
        );
    }
}

/// Counts every row any copy of the model forwards (forks share the counter).
struct Counting {
    inner: Box<dyn Model>,
    rows: Arc<AtomicUsize>,
}

impl Model for Counting {
    fn forward(&self, x: &Tensor, train: bool) -> Result<ModelOutput> {
        self.rows.fetch_add(x.dim(0)?, Ordering::Relaxed);
        self.inner.forward(x, train)
    }
    fn params(&self) -> &ParamSet {
        self.inner.params()
    }
    fn dense_forward(&self, x: &Tensor) -> Result<Option<DenseForward>> {
        self.rows.fetch_add(x.dim(0)?, Ordering::Relaxed);
        self.inner.dense_forward(x)
    }
    fn fork(&self) -> Result<Box<dyn Model>> {
        Ok(Box::new(Counting {
            inner: self.inner.fork()?,
            rows: self.rows.clone(),
        }))
    }
    fn rng_states(&self) -> Vec<RngState> {
        self.inner.rng_states()
    }
    fn set_rng_states(&self, states: &[RngState]) -> Result<()> {
        self.inner.set_rng_states(states)
    }
}

/// A step's counted forward rows are exactly the rows the model (and every copy of it) forwarded
/// during the step, for every registered algorithm: an algorithm that forwards a teacher, a
/// reference batch or a virtual update without charging it would rank too cheap.
#[test]
fn every_algorithms_counted_forward_rows_are_the_rows_it_forwarded() {
    let reg = Registry::builtin();
    for (name, _) in reg.algorithms() {
        let spec: serde_yaml::Value = serde_yaml::from_str(&format!(
            "{{ name: {name}{} }}",
            if reg.algorithm_defaults(name).unwrap()["buffer_size"].is_null() {
                ""
            } else {
                ", buffer_size: 20"
            }
        ))
        .unwrap();
        let (algo, _) = reg.build_algorithm(&spec, "test.yaml").unwrap();
        let mut t = mini_trainer(algo, &[]);
        let rows = Arc::new(AtomicUsize::new(0));
        let placeholder = t.model.fork().unwrap();
        let inner = std::mem::replace(&mut t.model, placeholder);
        t.model = Box::new(Counting {
            inner,
            rows: rows.clone(),
        });
        for task in 0..3 {
            let order = t.begin_task(task).unwrap();
            let mut buf = GatherBuf::default();
            for (i, chunk) in order.chunks(10).enumerate() {
                let batch = t
                    .stream
                    .gather(chunk, Split::Train, &mut buf, &candle_core::Device::Cpu)
                    .unwrap();
                let before = rows.load(Ordering::Relaxed);
                t.step(task, 0, i, &batch).unwrap();
                let cost = t.last_step_cost();
                assert_eq!(
                    cost.forward,
                    rows.load(Ordering::Relaxed) - before,
                    "{name}: task {task} step {i}"
                );
                assert!(cost.backward >= batch.len(), "{name}");
            }
            t.end_task(task).unwrap();
        }
    }
}

/// The counted cost itself: a naive step costs exactly one naive step; ER with a full memory
/// forwards and back-propagates twice the rows, so under `cost: counted` it trains less often.
#[test]
fn counted_cost_is_one_for_naive_and_more_for_replay() {
    let (_, naive) = probe_run(Naive, &args(&realtime("counted", 0)));
    for r in &naive.realtime {
        assert_eq!(r.trained, r.batches);
        assert_eq!(r.mean_cost(), Some(1.0));
    }
    let er = run_registry(
        "{ name: er, buffer_size: 20 }",
        &args(&realtime("counted", 0)),
    );
    let later = &er.realtime[1..];
    assert!(
        later.iter().all(|r| r.trained < r.batches),
        "{:?}",
        er.realtime
    );
    assert!(later.iter().all(|r| r.mean_cost() == Some(2.0)));
}

fn run_registry(spec: &str, overrides: &[&str]) -> RunOutcome {
    let spec: serde_yaml::Value = serde_yaml::from_str(spec).unwrap();
    let (algo, _) = Registry::builtin()
        .build_algorithm(&spec, "test.yaml")
        .unwrap();
    let mut t = mini_trainer(algo, overrides);
    let out = t.run(&mut sequel_core::trainer::Silent).unwrap();
    assert!(out.failure.is_none(), "{:?}", out.failure);
    out
}

/// A 2-task fmnist-mini config writing under `dir`, with `training` and `algorithm` given.
fn small_config(dir: &std::path::Path, training: &str, algorithm: &str) -> String {
    format!(
        "name: rt\nseed: 0\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 2, classes_per_task: 2, scenario: class-il, train_subset: 20 }}\n\
         model: {{ kind: mlp, hidden: [8] }}\n\
         training: {training}\n\
         algorithm: {algorithm}\n\
         output: {{ dir: {} }}\n",
        dir.display()
    )
}

#[test]
fn bad_realtime_settings_are_one_line_naming_the_key_before_a_run_folder_exists() {
    let tmp = tempfile::tempdir().unwrap();
    for (training, key) in [
        ("{ epochs: 2, realtime: {} }", "training.realtime"),
        ("{ realtime: { cost: 0.5 } }", "training.realtime.cost"),
        ("{ realtime: { cost: fast } }", "training.realtime.cost"),
        ("{ realtime: { delay: 1 } }", "training.realtime"),
    ] {
        let text = small_config(tmp.path(), training, "naive");
        let e = sequel_algos::run::prepare(&text, "t.yaml", &[], &Registry::builtin())
            .err()
            .unwrap_or_else(|| panic!("{training} was accepted"))
            .to_string();
        assert!(e.starts_with(&format!("t.yaml: {key}")), "{training}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(!tmp.path().join("rt").exists(), "a run folder was created");
    }
}

/// Predicts, inside each trained step and before the update, the step's batch and the next
/// arrival (which under C = 2 comes while the step still runs): what the stale weights predict.
struct StaleWeights {
    arrivals: Vec<Vec<Vec<SampleRef>>>,
    correct: Vec<usize>,
}

impl StaleWeights {
    fn count(&self, refs: &[SampleRef], ctx: &StepCtx) -> Result<usize> {
        let b = ctx
            .stream
            .gather(refs, Split::Train, &mut GatherBuf::default(), ctx.device)?;
        let pred: Vec<u32> = ctx
            .model
            .forward(&b.x, false)?
            .logits
            .argmax(1)?
            .to_vec1()?;
        Ok(pred.iter().zip(&b.units).filter(|(p, y)| p == y).count())
    }
}

impl Observer<Naive> for StaleWeights {
    fn loss(&mut self, algo: &mut Naive, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let arrivals = &self.arrivals[ctx.task];
        let i = arrivals.iter().position(|a| a == &batch.refs).unwrap();
        let mut n = self.count(&batch.refs, ctx)?;
        if let Some(next) = arrivals.get(i + 1) {
            n += self.count(next, ctx)?;
        }
        if self.correct.len() <= ctx.task {
            self.correct.resize(ctx.task + 1, 0);
        }
        self.correct[ctx.task] += n;
        sequel_core::Algorithm::loss(algo, batch, ctx)
    }
}

#[test]
fn arrivals_while_a_step_runs_are_predicted_with_the_weights_from_before_it() {
    let (all, _) = probe_run(Naive, &args(&realtime("1", 0)));
    let arrivals = (0..5)
        .map(|t| trained(&probed::<Naive>(&all).steps, t))
        .collect();
    let observer = StaleWeights {
        arrivals,
        correct: Vec::new(),
    };
    let (t, out) = observe_run(Naive, observer, &args(&realtime("2", 0)));
    let expected = &sequel_algos::testing::observed::<Naive, StaleWeights>(&t)
        .observer
        .correct;
    let got: Vec<usize> = out.realtime.iter().map(|r| r.correct).collect();
    assert_eq!(&got, expected);
}

/// A method that trains on its own sample list rather than the stream is refused in one line.
#[test]
fn methods_that_do_not_train_on_the_stream_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for algo in ["icarl", "lucir", "bic", "gdumb", "joint"] {
        let text = small_config(tmp.path(), "{ realtime: {} }", algo);
        let p = sequel_algos::run::prepare(&text, "t.yaml", &[], &Registry::builtin()).unwrap();
        let e = sequel_algos::run::execute(p, &mut sequel_core::trainer::Silent, None)
            .err()
            .unwrap_or_else(|| panic!("{algo} was accepted"))
            .to_string();
        assert!(e.starts_with("t.yaml: training.realtime"), "{algo}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(!tmp.path().join("rt").exists(), "a run folder was created");
    }
}

/// A label delay as long as a task's stream would train on nothing: refused before the run.
#[test]
fn a_label_delay_longer_than_a_task_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let text = small_config(
        tmp.path(),
        "{ batch_size: 10, realtime: { label_delay: 2 } }",
        "naive",
    );
    let p = sequel_algos::run::prepare(&text, "t.yaml", &[], &Registry::builtin()).unwrap();
    let e = sequel_algos::run::execute(p, &mut sequel_core::trainer::Silent, None)
        .err()
        .expect("a delay of 2 on 2-batch tasks was accepted")
        .to_string();
    assert!(
        e.starts_with("t.yaml: training.realtime.label_delay"),
        "{e}"
    );
    assert!(!tmp.path().join("rt").exists());
    let ok = text.replace("label_delay: 2", "label_delay: 1");
    let p = sequel_algos::run::prepare(&ok, "t.yaml", &[], &Registry::builtin()).unwrap();
    sequel_algos::run::execute(p, &mut sequel_core::trainer::Silent, None).unwrap();
}
