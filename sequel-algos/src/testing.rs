//! Test support: a probe that lets a test inspect an algorithm after the real trainer ran it, small
//! tasks on fmnist-mini, and tiny hand-checkable models with host-side (f64) reference gradients.

use std::sync::Arc;

use candle_core::{backprop::GradStore, Device, Tensor};
use sequel_core::algorithm::task_samples;
use sequel_core::config::{parse_config, ActivationKind, BenchmarkConfig};
use sequel_core::data::{Batch, Dataset, ImageSet, SampleRef, TaskStream};
use sequel_core::model::layers::Dropout;
use sequel_core::model::mlp::Mlp;
use sequel_core::model::{Model, ModelOutput};
use sequel_core::rng::{SeededRng, Stream};
use sequel_core::{Algorithm, EvalCtx, Memory, Result, StateIo, StepCtx, TaskCtx, Trainer};

/// What one training step forwarded: its task and each part's samples, in the order given to
/// [`StepCtx::forward`] (the incoming batch first, for every built-in method).
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub task: usize,
    pub parts: Vec<Vec<SampleRef>>,
    /// The incoming rows' training-mode logits.
    pub logits: Tensor,
}

/// Test code around the hooks of a probed algorithm: each method gets the algorithm and the
/// hook's arguments, calls the real hook itself (so it can compare state before and after, or
/// recompute what the hook computed) and records what the test reads after the run in `self`.
/// The defaults only call the hook; the probe forwards every other hook untouched, so an
/// observer cannot forget one.
pub trait Observer<A: Algorithm>: Send + 'static {
    fn before_task(&mut self, algo: &mut A, ctx: &mut TaskCtx) -> Result<()> {
        algo.before_task(ctx)
    }
    fn training_samples(&mut self, algo: &mut A, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        algo.training_samples(ctx)
    }
    fn loss(&mut self, algo: &mut A, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        algo.loss(batch, ctx)
    }
    fn edit_gradients(
        &mut self,
        algo: &mut A,
        grads: &mut GradStore,
        ctx: &mut StepCtx,
    ) -> Result<()> {
        algo.edit_gradients(grads, ctx)
    }
    fn after_step(
        &mut self,
        algo: &mut A,
        batch: &Batch,
        out: &ModelOutput,
        ctx: &mut StepCtx,
    ) -> Result<()> {
        algo.after_step(batch, out, ctx)
    }
    fn after_task(&mut self, algo: &mut A, ctx: &mut TaskCtx) -> Result<()> {
        algo.after_task(ctx)
    }
}

/// Observes nothing: [`probe_run`]'s probe only records steps and weights.
impl<A: Algorithm> Observer<A> for () {}

/// An algorithm plus the record of every step the trainer ran it for, and the test's
/// [`Observer`]. After a run, get it back with [`probed`] or [`observed`].
pub struct Probe<A, O = ()> {
    pub algo: A,
    pub observer: O,
    pub steps: Vec<StepRecord>,
    /// Per task, every parameter's values (flattened, in `ParamSet` order) before its
    /// `before_task` and after its `after_task`.
    pub weights_before: Vec<Vec<Vec<f32>>>,
    pub weights_after: Vec<Vec<Vec<f32>>>,
}

impl<A> Probe<A> {
    pub fn new(algo: A) -> Self {
        Self::observed_by(algo, ())
    }
}

impl<A, O> Probe<A, O> {
    pub fn observed_by(algo: A, observer: O) -> Self {
        Self {
            algo,
            observer,
            steps: Vec::new(),
            weights_before: Vec::new(),
            weights_after: Vec::new(),
        }
    }
}

fn all_weights(model: &dyn Model) -> Result<Vec<Vec<f32>>> {
    model
        .params()
        .iter()
        .map(|p| Ok(p.var.flatten_all()?.to_vec1::<f32>()?))
        .collect()
}

impl<A: Algorithm, O: Observer<A>> Algorithm for Probe<A, O> {
    fn check_stream(&mut self, stream: &TaskStream) -> Result<()> {
        self.algo.check_stream(stream)
    }
    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.weights_before.push(all_weights(ctx.model)?);
        self.observer.before_task(&mut self.algo, ctx)
    }
    fn training_samples(&mut self, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        self.observer.training_samples(&mut self.algo, ctx)
    }
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        self.observer.loss(&mut self.algo, batch, ctx)
    }
    fn edit_gradients(&mut self, grads: &mut GradStore, ctx: &mut StepCtx) -> Result<()> {
        self.observer.edit_gradients(&mut self.algo, grads, ctx)
    }
    fn after_step(&mut self, batch: &Batch, out: &ModelOutput, ctx: &mut StepCtx) -> Result<()> {
        self.steps.push(StepRecord {
            task: ctx.task,
            parts: ctx.forwarded_parts().to_vec(),
            logits: out.logits.clone(),
        });
        self.observer.after_step(&mut self.algo, batch, out, ctx)
    }
    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.observer.after_task(&mut self.algo, ctx)?;
        self.weights_after.push(all_weights(ctx.model)?);
        Ok(())
    }
    fn before_eval(&mut self, ctx: &EvalCtx) -> Result<()> {
        self.algo.before_eval(ctx)
    }
    fn predict(&self, out: &ModelOutput, task: usize, ctx: &EvalCtx) -> Result<Option<Tensor>> {
        self.algo.predict(out, task, ctx)
    }
    fn after_eval(&mut self, ctx: &EvalCtx) -> Result<()> {
        self.algo.after_eval(ctx)
    }
    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        self.algo.state(io)
    }
    fn memory(&mut self) -> Option<&mut Memory> {
        self.algo.memory()
    }
    fn own_params(&self) -> Option<&sequel_core::model::ParamSet> {
        self.algo.own_params()
    }
    fn trains_on_the_stream(&self) -> bool {
        self.algo.trains_on_the_stream()
    }
}

/// Run `algo` wrapped in a [`Probe`] on [`mini_trainer`] with `overrides`; returns the trainer
/// (model, outcome-independent state) and the probe.
pub fn probe_run<A: Algorithm>(algo: A, overrides: &[&str]) -> (Trainer, sequel_core::RunOutcome) {
    let mut t = mini_trainer(Box::new(Probe::new(algo)), overrides);
    let outcome = t.run(&mut sequel_core::trainer::Silent).expect("run");
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    (t, outcome)
}

/// Run `algo` on [`mini_trainer`] with `overrides`, every hook going through `observer`;
/// read the observer back with [`observed`].
pub fn observe_run<A: Algorithm, O: Observer<A>>(
    algo: A,
    observer: O,
    overrides: &[&str],
) -> (Trainer, sequel_core::RunOutcome) {
    let mut t = mini_trainer(Box::new(Probe::observed_by(algo, observer)), overrides);
    let outcome = t.run(&mut sequel_core::trainer::Silent).expect("run");
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    (t, outcome)
}

/// The probe of a trainer built by [`observe_run`].
pub fn observed<A: Algorithm, O: Observer<A>>(t: &Trainer) -> &Probe<A, O> {
    t.algorithm::<Probe<A, O>>()
        .expect("the trainer runs a Probe<A, O>")
}

/// The probe of a trainer built by [`probe_run`].
pub fn probed<A: Algorithm>(t: &Trainer) -> &Probe<A> {
    t.algorithm::<Probe<A>>()
        .expect("the trainer runs a Probe<A>")
}

/// The probe of a trainer built by [`probe_run`], mutably (for [`Algorithm::memory`]).
pub fn probed_mut<A: Algorithm>(t: &mut Trainer) -> &mut Probe<A> {
    t.algorithm_mut::<Probe<A>>()
        .expect("the trainer runs a Probe<A>")
}

/// A trainer on fmnist-mini (split, 5 tasks, class-IL, 50 samples per task, MLP 784-32-10, one epoch
/// of batch 10) with `overrides` applied.
pub fn mini_trainer(algorithm: Box<dyn Algorithm>, overrides: &[&str]) -> Trainer {
    let text = "name: unit\nseed: 0\n\
        benchmark: { dataset: fmnist-mini, kind: split, tasks: 5, classes_per_task: 2, scenario: class-il, train_subset: 50 }\n\
        model: { kind: mlp, hidden: [32] }\n\
        optimizer: { kind: sgd, lr: 0.03 }\n\
        training: { epochs: 1, batch_size: 10, log_every: 0 }\n";
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let mut cfg = parse_config(text, "unit.yaml", &o).expect("test config parses");
    cfg.validate("unit.yaml").expect("test config is valid");
    cfg.resolve_defaults();
    sequel_core::experiment::build_trainer(&cfg, "unit.yaml", algorithm, None)
        .expect("trainer builds")
}

/// A 3-class, 1×2×2 toy dataset of 8 seeded random images, as one class-IL task.
fn toy_stream() -> TaskStream {
    let mut rng = SeededRng::new(7, Stream::Subset);
    let n = 8;
    let images: Vec<u8> = (0..n * 4).map(|_| rng.below(256) as u8).collect();
    let labels: Vec<u16> = (0..n).map(|i| (i % 3) as u16).collect();
    let set = ImageSet {
        images,
        labels,
        shape: [1, 2, 2],
    };
    let ds = Dataset {
        name: "toy".into(),
        train: set.clone(),
        test: set,
        num_classes: 3,
        mean: vec![0.5],
        std: vec![0.25],
    };
    let cfg: BenchmarkConfig =
        serde_yaml::from_str("{ dataset: toy, kind: split, tasks: 1, scenario: class-il }")
            .expect("toy benchmark");
    TaskStream::build(Arc::new(ds), &cfg, 0).expect("toy stream")
}

fn mlp(hidden: &[usize], scale: f32) -> Box<dyn Model> {
    let m = Mlp::new(
        4,
        hidden,
        &[3],
        ActivationKind::Tanh,
        Dropout::new(0.0, SeededRng::new(0, Stream::Dropout)),
        &mut SeededRng::new(3, Stream::Init),
        &Device::Cpu,
    )
    .expect("mlp");
    // Larger weights make the probabilities far from uniform, a sharper check.
    for p in m.params().iter() {
        p.var
            .set(&(p.var.as_tensor() * scale as f64).expect("scale"))
            .expect("set");
    }
    Box::new(m)
}

/// A linear softmax classifier (4 inputs, 3 classes) and the toy task.
pub fn linear_model_task() -> (Box<dyn Model>, TaskStream, Vec<SampleRef>) {
    let s = toy_stream();
    let samples = task_samples(&s, 0);
    (mlp(&[], 3.0), s, samples)
}

/// A 4-3-3 tanh MLP and the toy task.
pub fn tiny_mlp_task() -> (Box<dyn Model>, TaskStream, Vec<SampleRef>) {
    let s = toy_stream();
    let samples = task_samples(&s, 0);
    (mlp(&[3], 3.0), s, samples)
}

/// Host-side f64 forward of the 4-3-3 tanh MLP (or the linear model) given flattened parameters in
/// `ParamSet` order.
fn host_logits(params: &[Vec<f64>], shapes: &[Vec<usize>], x: &[f64]) -> Vec<f64> {
    let mut h = x.to_vec();
    let layers = params.len() / 2;
    for l in 0..layers {
        let (w, b) = (&params[2 * l], &params[2 * l + 1]);
        let (out, inp) = (shapes[2 * l][0], shapes[2 * l][1]);
        let mut z: Vec<f64> = (0..out)
            .map(|o| b[o] + (0..inp).map(|i| w[o * inp + i] * h[i]).sum::<f64>())
            .collect();
        if l + 1 < layers {
            z.iter_mut().for_each(|v| *v = v.tanh());
        }
        h = z;
    }
    h
}

/// `(1/N) Σₙ φ(∂ loss(f(xₙ), yₙ)/∂θᵢ)` for every parameter element, with the derivative taken by
/// central finite differences of a host-side f64 forward (step 1e-6): an estimate that shares no
/// code with candle's autograd.
pub fn finite_difference_statistic(
    model: &dyn Model,
    stream: &TaskStream,
    samples: &[SampleRef],
    loss: impl Fn(&[f64], usize) -> f64,
    phi: impl Fn(f64) -> f64,
) -> Vec<f64> {
    let params: Vec<Vec<f64>> = model
        .params()
        .trainable()
        .map(|p| {
            p.var
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("param")
                .into_iter()
                .map(f64::from)
                .collect()
        })
        .collect();
    let shapes: Vec<Vec<usize>> = model
        .params()
        .trainable()
        .map(|p| p.var.dims().to_vec())
        .collect();
    let mut buf = Default::default();
    let batch = stream
        .gather(
            samples,
            sequel_core::data::Split::Train,
            &mut buf,
            &Device::Cpu,
        )
        .expect("gather");
    let xs: Vec<Vec<f64>> = batch
        .x
        .flatten_from(1)
        .and_then(|t| t.to_vec2::<f32>())
        .expect("x")
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect();
    let h = 1e-6;
    let mut out = Vec::new();
    for pi in 0..params.len() {
        for e in 0..params[pi].len() {
            let mut acc = 0.0;
            for (x, &y) in xs.iter().zip(&batch.units) {
                let mut plus = params.clone();
                plus[pi][e] += h;
                let mut minus = params.clone();
                minus[pi][e] -= h;
                let g = (loss(&host_logits(&plus, &shapes, x), y as usize)
                    - loss(&host_logits(&minus, &shapes, x), y as usize))
                    / (2.0 * h);
                acc += phi(g);
            }
            out.push(acc / xs.len() as f64);
        }
    }
    out
}

/// The trainable weights of `model`, flattened in `ParamSet` order (host f64).
pub fn host_weights(model: &dyn Model) -> Vec<f64> {
    model
        .params()
        .trainable()
        .flat_map(|p| {
            p.var
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("weights")
        })
        .map(f64::from)
        .collect()
}

/// A gradient store flattened in `ParamSet` order on the host (zeros where a parameter has none),
/// independently of `crate::flat`.
pub fn host_gradient(model: &dyn Model, grads: &GradStore) -> Vec<f64> {
    let mut out = Vec::new();
    for p in model.params().trainable() {
        match grads.get(p.var.as_tensor()) {
            Some(g) => out.extend(
                g.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("gradient")
                    .into_iter()
                    .map(f64::from),
            ),
            None => out.extend(std::iter::repeat_n(0.0, p.var.elem_count())),
        }
    }
    out
}

/// The host-flattened gradient of the training loss of `batch` (forward in training mode).
pub fn host_loss_gradient(model: &dyn Model, stream: &TaskStream, batch: &Batch) -> Vec<f64> {
    let out = model.forward(&batch.x, true).expect("forward");
    let loss = sequel_core::loss::task_loss(&out.logits, batch, stream).expect("loss");
    host_gradient(model, &loss.backward().expect("backward"))
}

pub fn host_dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Run `algorithm` on the mini stream with `overrides`: the outcome's rows and the final weights.
pub fn mini_run(algorithm: Box<dyn Algorithm>, overrides: &[&str]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut t = mini_trainer(algorithm, overrides);
    let outcome = t.run(&mut sequel_core::trainer::Silent).expect("run");
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    (outcome.results.matrix.rows, host_weights(t.model.as_ref()))
}

/// The scenarios every replay method must run in: class-IL, task-IL with a masked single head,
/// task-IL with one head per task.
pub const SCENARIOS: [&[&str]; 3] = [
    &[],
    &["benchmark.scenario=task-il"],
    &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"],
];
