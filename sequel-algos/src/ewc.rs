//! EWC — Elastic Weight Consolidation, separate mode (Kirkpatrick et al., "Overcoming catastrophic
//! forgetting in neural networks", PNAS 2017):
//!
//! `L(θ) = CE_t(θ) + Σ_{k<t} (λ/2) Σᵢ F_{k,i} (θᵢ − θ*_{k,i})²`
//!
//! **½ convention:** the penalty is `(λ/2)·Σ F(θ − θ*)²`, as in the paper and SequeL; Avalanche
//! uses `λ·Σ F(θ − θ*)²`, so its λ is half of ours for the same run.
//!
//! One Fisher `F_k` and one anchor `θ*_k` per past task, both taken when task `k` ends. The past
//! pairs are kept in the exactly merged form of [`QuadraticPenalty`] (same value, same gradient,
//! `O(|θ|)` memory and per-step cost however many tasks have passed).
//!
//! **Fisher** (diagonal, at `θ*_k`, on task `k`'s training samples, from fresh gradients of the task
//! loss alone — never the penalty):
//! - `fisher: empirical` — `F = (1/N) Σₙ (∇θ log p_θ(yₙ|xₙ))²` with the dataset label `yₙ`.
//! - `fisher: true` — `F = (1/N) Σₙ Σ_c p_θ(c|xₙ) (∇θ log p_θ(c|xₙ))²`, the exact expectation over the
//!   units the softmax runs over (one forward and one backward per unit with `p > 0` per sample).
//! - `fisher_mode: per-sample` (default) squares per-sample gradients (a batch-1 loop, see
//!   [`crate::importance`]); `fisher_mode: minibatch` squares the gradient of the minibatch-mean loss
//!   over minibatches of `fisher_batch_size` (Avalanche's estimator; its scale depends on the batch
//!   size, so λ is not comparable across the two). With `fisher: true` in minibatch mode each
//!   sample's label is drawn from `p_θ(·|x)` with the algorithm's seeded stream.
//!
//! Probabilities are those of the training loss: softmax over all units, or in multi-head task-IL
//! over the task's units. Forward passes run in evaluation mode (no dropout, batch-norm running
//! statistics). With `lambda: 0` nothing is computed and training is bit-identical to `naive`.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::algorithm::task_samples;
use sequel_core::data::{Batch, SampleRef};
use sequel_core::model::{Model, ModelOutput};
use sequel_core::rng::SeededRng;
use sequel_core::{Algorithm, AlgorithmConfig, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::importance::{mean_gradient_statistic, subset, training_log_probs, Granularity, Reduce};
use crate::penalty::{PerParam, QuadraticPenalty};

/// Which Fisher information is estimated. In YAML `fisher: true` is read as a boolean; it is
/// accepted as the `true` variant (and written back as the string `'true'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FisherKind {
    /// Squared gradients of the log-likelihood of the dataset label.
    Empirical,
    /// Expectation over the model's own predictive distribution.
    True,
}

impl<'de> Deserialize<'de> for FisherKind {
    fn deserialize<De: serde::Deserializer<'de>>(d: De) -> std::result::Result<Self, De::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Name(String),
        }
        const VARIANTS: &[&str] = &["empirical", "true"];
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(FisherKind::True),
            Raw::Name(s) if s == "true" => Ok(FisherKind::True),
            Raw::Name(s) if s == "empirical" => Ok(FisherKind::Empirical),
            Raw::Bool(false) => Err(serde::de::Error::unknown_variant("false", VARIANTS)),
            Raw::Name(s) => Err(serde::de::Error::unknown_variant(&s, VARIANTS)),
        }
    }
}

/// Settings of the Fisher estimate, shared by `ewc` and `ewc-online`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FisherSpec {
    pub kind: FisherKind,
    pub mode: Granularity,
    pub batch_size: usize,
    pub samples: Option<usize>,
}

/// YAML keys of `algorithm: { name: ewc, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EwcConfig {
    /// Penalty strength λ in `(λ/2)·Σ F(θ − θ*)²`. Default 1.0 (SequeL's `ewc_lambda`;
    /// continual-learning-baselines' permuted MNIST).
    pub lambda: f64,
    /// `empirical` (default, as Avalanche, Mammoth and SequeL) or `true`.
    pub fisher: FisherKind,
    /// `per-sample` (default) or `minibatch`.
    pub fisher_mode: Granularity,
    /// Minibatch size of `fisher_mode: minibatch`. Default 10 (the default `training.batch_size`).
    pub fisher_batch_size: usize,
    /// Estimate the Fisher on at most this many of the task's training samples (a seeded random
    /// subset). Default: all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fisher_samples: Option<usize>,
}

impl Default for EwcConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            fisher: FisherKind::Empirical,
            fisher_mode: Granularity::PerSample,
            fisher_batch_size: 10,
            fisher_samples: None,
        }
    }
}

impl AlgorithmConfig for EwcConfig {
    const NAME: &'static str = "ewc";
    const SUMMARY: &'static str =
        "Elastic Weight Consolidation, one Fisher + anchor per past task (Kirkpatrick et al. 2017)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Ewc::new(self)?))
    }
}

impl EwcConfig {
    pub(crate) fn fisher_spec(&self) -> FisherSpec {
        FisherSpec {
            kind: self.fisher,
            mode: self.fisher_mode,
            batch_size: self.fisher_batch_size,
            samples: self.fisher_samples,
        }
    }
}

pub(crate) fn check_fisher(spec: &FisherSpec) -> Result<()> {
    check::at_least_one("fisher_batch_size", spec.batch_size)?;
    if let Some(n) = spec.samples {
        check::at_least_one("fisher_samples", n)?;
    }
    Ok(())
}

/// Separate-mode EWC.
pub struct Ewc {
    lambda: f64,
    fisher: FisherSpec,
    penalty: QuadraticPenalty,
    /// The Fisher of the most recent task (for inspection).
    last_fisher: Option<PerParam>,
}

impl Ewc {
    pub fn new(cfg: EwcConfig) -> Result<Self> {
        check::non_negative("lambda", cfg.lambda)?;
        let fisher = cfg.fisher_spec();
        check_fisher(&fisher)?;
        Ok(Self {
            lambda: cfg.lambda,
            fisher,
            penalty: QuadraticPenalty::default(),
            last_fisher: None,
        })
    }

    /// The Fisher estimated at the end of the most recent task.
    pub fn last_fisher(&self) -> Option<&PerParam> {
        self.last_fisher.as_ref()
    }

    /// `Σ_k Σᵢ F_{k,i}(θᵢ − θ*_{k,i})²` at the current weights (without λ/2), if a task has ended.
    pub fn penalty(&self, model: &dyn Model) -> Result<Option<f64>> {
        scalar(self.penalty.value(model.params())?)
    }
}

pub(crate) fn scalar(t: Option<Tensor>) -> Result<Option<f64>> {
    t.map(|t| Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?))
        .transpose()
}

/// The diagonal Fisher of `model` on `samples` (module docs). `rng` is used only by the sampled
/// labels of `fisher: true` in minibatch mode.
pub fn fisher_diagonal(
    ctx: &mut TaskCtx,
    samples: &[SampleRef],
    spec: &FisherSpec,
) -> Result<PerParam> {
    let stream = ctx.stream;
    let rng: &mut SeededRng = ctx.rng;
    let batch_size = match spec.mode {
        Granularity::PerSample => 1,
        Granularity::Minibatch => spec.batch_size,
    };
    let objective = |out: &ModelOutput, batch: &Batch| -> Result<Vec<(f64, Tensor)>> {
        match (spec.kind, spec.mode) {
            // −log p(y|x) (mean over the minibatch); the sign disappears when squared.
            (FisherKind::Empirical, _) => Ok(vec![(
                1.0,
                sequel_core::loss::task_loss(&out.logits, batch, stream)?,
            )]),
            (FisherKind::True, Granularity::PerSample) => {
                let logp = training_log_probs(&out.logits, batch, stream)?.squeeze(0)?;
                let p: Vec<f32> = logp.exp()?.to_vec1()?;
                p.iter()
                    .enumerate()
                    .filter(|(_, &pc)| pc > 0.0)
                    .map(|(c, &pc)| Ok((pc as f64, logp.get(c)?)))
                    .collect()
            }
            (FisherKind::True, Granularity::Minibatch) => {
                let logp = training_log_probs(&out.logits, batch, stream)?;
                let p: Vec<Vec<f32>> = logp.exp()?.to_vec2()?;
                let labels: Vec<u32> = p.iter().map(|row| sample_unit(row, rng)).collect();
                let y = Tensor::from_vec(labels, batch.len(), out.logits.device())?;
                let picked = logp.gather(&y.unsqueeze(1)?, D::Minus1)?;
                Ok(vec![(1.0, picked.mean_all()?)])
            }
        }
    };
    mean_gradient_statistic(
        ctx.model,
        stream,
        ctx.device,
        samples,
        batch_size,
        Reduce::Square,
        objective,
    )
}

/// Draw a unit from a probability row (inverse CDF; the last positive unit absorbs rounding).
fn sample_unit(p: &[f32], rng: &mut SeededRng) -> u32 {
    let u = rng.uniform_f64();
    let mut acc = 0.0f64;
    let mut last = 0u32;
    for (c, &pc) in p.iter().enumerate() {
        if pc > 0.0 {
            acc += pc as f64;
            last = c as u32;
            if u < acc {
                return last;
            }
        }
    }
    last
}

/// The Fisher of the task that just ended, on its (possibly capped) training samples.
pub(crate) fn task_fisher(ctx: &mut TaskCtx, spec: &FisherSpec) -> Result<PerParam> {
    let samples = subset(task_samples(ctx.stream, ctx.task), spec.samples, ctx.rng);
    let start = std::time::Instant::now();
    let f = fisher_diagonal(ctx, &samples, spec)?;
    tracing::info!(
        task = ctx.task + 1,
        samples = samples.len(),
        seconds = start.elapsed().as_secs_f64(),
        mean = f.sum()? / f.0.iter().map(|t| t.elem_count()).sum::<usize>().max(1) as f64,
        max = f.max()?,
        "fisher estimated"
    );
    Ok(f)
}

impl Algorithm for Ewc {
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let ce = ctx.ce(batch)?;
        match self.penalty.value(ctx.model.params())? {
            Some(r) if self.lambda > 0.0 => Ok((ce + (r * (self.lambda / 2.0))?)?),
            _ => Ok(ce),
        }
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.lambda == 0.0 {
            return Ok(());
        }
        let fisher = task_fisher(ctx, &self.fisher)?;
        let anchor = PerParam::values(ctx.model.params())?;
        self.penalty.add(fisher.clone(), anchor)?;
        self.last_fisher = Some(fisher);
        Ok(())
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.scope("penalty", |io| self.penalty.state(io))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{linear_model_task, probe_run, probed};

    /// Per-sample Fisher of a linear softmax classifier, `F = mean_n ((p − e_y) ⊗ x)²` (weights) and
    /// `mean_n (p − e_y)²` (bias) for the empirical Fisher, `Σ_c p_c ((e_c − p) ⊗ x)²` for the true
    /// one — computed on the host in f64, independently of candle's autograd.
    fn linear_fisher_by_hand(
        w: &[Vec<f64>],
        b: &[f64],
        xs: &[Vec<f64>],
        ys: &[usize],
        kind: FisherKind,
    ) -> (Vec<Vec<f64>>, Vec<f64>) {
        let (k, d) = (w.len(), w[0].len());
        let mut fw = vec![vec![0.0; d]; k];
        let mut fb = vec![0.0; k];
        for (x, &y) in xs.iter().zip(ys) {
            let z: Vec<f64> = (0..k)
                .map(|c| b[c] + (0..d).map(|j| w[c][j] * x[j]).sum::<f64>())
                .collect();
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| v / s).collect();
            let labels: Vec<(usize, f64)> = match kind {
                FisherKind::Empirical => vec![(y, 1.0)],
                FisherKind::True => (0..k).map(|c| (c, p[c])).collect(),
            };
            for (label, weight) in labels {
                for c in 0..k {
                    let dz = p[c] - if c == label { 1.0 } else { 0.0 };
                    fb[c] += weight * dz * dz;
                    for j in 0..d {
                        fw[c][j] += weight * (dz * x[j]).powi(2);
                    }
                }
            }
        }
        let n = xs.len() as f64;
        for row in fw.iter_mut() {
            row.iter_mut().for_each(|v| *v /= n);
        }
        fb.iter_mut().for_each(|v| *v /= n);
        (fw, fb)
    }

    #[test]
    fn per_sample_fisher_of_a_linear_model_matches_the_hand_computed_value() {
        for kind in [FisherKind::Empirical, FisherKind::True] {
            let (model, stream, samples) = linear_model_task();
            let mut rng = SeededRng::new(0, sequel_core::rng::Stream::Algorithm);
            let dev = candle_core::Device::Cpu;
            let mut ctx = TaskCtx {
                task: 0,
                stream: &stream,
                model: model.as_ref(),
                device: &dev,
                rng: &mut rng,
                interrupt: None,
            };
            let spec = FisherSpec {
                kind,
                mode: Granularity::PerSample,
                batch_size: 1,
                samples: None,
            };
            let got = fisher_diagonal(&mut ctx, &samples, &spec).unwrap();
            // The same quantities on the host.
            let ps: Vec<_> = model.params().trainable().collect();
            let w: Vec<Vec<f64>> = ps[0]
                .var
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(f64::from).collect())
                .collect();
            let b: Vec<f64> = ps[1]
                .var
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let mut buf = Default::default();
            let batch = stream
                .gather(&samples, sequel_core::data::Split::Train, &mut buf, &dev)
                .unwrap();
            let xs: Vec<Vec<f64>> = batch
                .x
                .flatten_from(1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|r| r.into_iter().map(f64::from).collect())
                .collect();
            let ys: Vec<usize> = batch.units.iter().map(|&u| u as usize).collect();
            let (fw, fb) = linear_fisher_by_hand(&w, &b, &xs, &ys, kind);
            let gw = got.0[0].to_vec2::<f32>().unwrap();
            let gb = got.0[1].to_vec1::<f32>().unwrap();
            for c in 0..fw.len() {
                assert!((gb[c] as f64 - fb[c]).abs() < 1e-5, "{kind:?} bias {c}");
                for j in 0..fw[c].len() {
                    assert!(
                        (gw[c][j] as f64 - fw[c][j]).abs() < 1e-5,
                        "{kind:?} w[{c}][{j}]: {} vs {}",
                        gw[c][j],
                        fw[c][j]
                    );
                }
            }
            assert!(got.sum().unwrap() > 0.0);
        }
    }

    #[test]
    fn per_sample_fisher_equals_squared_finite_difference_gradients_on_an_mlp() {
        use crate::testing::tiny_mlp_task;
        let (model, stream, samples) = tiny_mlp_task();
        let dev = candle_core::Device::Cpu;
        let mut rng = SeededRng::new(0, sequel_core::rng::Stream::Algorithm);
        let mut ctx = TaskCtx {
            task: 0,
            stream: &stream,
            model: model.as_ref(),
            device: &dev,
            rng: &mut rng,
            interrupt: None,
        };
        let spec = FisherSpec {
            kind: FisherKind::Empirical,
            mode: Granularity::PerSample,
            batch_size: 1,
            samples: None,
        };
        let got = fisher_diagonal(&mut ctx, &samples, &spec)
            .unwrap()
            .flat()
            .unwrap();
        let want = crate::testing::finite_difference_statistic(
            model.as_ref(),
            &stream,
            &samples,
            |logits, y| {
                // −log softmax(z)_y in f64.
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let lse = m + logits.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                lse - logits[y]
            },
            |g| g * g,
        );
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn minibatch_fisher_is_the_square_of_minibatch_gradients_and_differs_from_per_sample() {
        let (model, stream, samples) = linear_model_task();
        let dev = candle_core::Device::Cpu;
        let mut rng = SeededRng::new(0, sequel_core::rng::Stream::Algorithm);
        let mut ctx = TaskCtx {
            task: 0,
            stream: &stream,
            model: model.as_ref(),
            device: &dev,
            rng: &mut rng,
            interrupt: None,
        };
        let mut spec = FisherSpec {
            kind: FisherKind::Empirical,
            mode: Granularity::Minibatch,
            batch_size: samples.len(),
            samples: None,
        };
        let mb = fisher_diagonal(&mut ctx, &samples, &spec).unwrap();
        // One minibatch: F = (∇ mean CE)².
        let mut buf = Default::default();
        let batch = stream
            .gather(&samples, sequel_core::data::Split::Train, &mut buf, &dev)
            .unwrap();
        let out = model.forward(&batch.x, false).unwrap();
        let g = sequel_core::loss::task_loss(&out.logits, &batch, &stream)
            .unwrap()
            .backward()
            .unwrap();
        for (p, f) in model.params().trainable().zip(&mb.0) {
            let want = g.get(p.var.as_tensor()).unwrap().sqr().unwrap();
            let d = (f - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-7);
        }
        spec.mode = Granularity::PerSample;
        let ps = fisher_diagonal(&mut ctx, &samples, &spec).unwrap();
        assert!(ps.sum().unwrap() > mb.sum().unwrap());
        // The sampled true Fisher runs and is positive.
        spec.kind = FisherKind::True;
        spec.mode = Granularity::Minibatch;
        spec.batch_size = 2;
        assert!(
            fisher_diagonal(&mut ctx, &samples, &spec)
                .unwrap()
                .sum()
                .unwrap()
                > 0.0
        );
    }

    #[test]
    fn fisher_respects_the_multi_head_mask() {
        // In multi-head task-IL a task's Fisher lives on its own head rows and the shared body.
        let (t, _) = probe_run(
            Ewc::new(EwcConfig::default()).unwrap(),
            &[
                "benchmark.scenario=task-il",
                "benchmark.task_il_head=multi",
                "benchmark.tasks=2",
                "benchmark.train_subset=20",
            ],
        );
        let ewc = &probed::<Ewc>(&t).algo;
        let f = ewc.last_fisher().unwrap();
        // Multi-head: the trainable tensors end with head.0.{weight,bias} (task 1) and
        // head.1.{weight,bias} (task 2). Task 2's Fisher lives on its own head only.
        let n = f.0.len();
        let mass = |i: usize| f.0[i].sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(mass(n - 4), 0.0, "task 1's head weight gets no Fisher");
        assert_eq!(mass(n - 3), 0.0, "task 1's head bias gets no Fisher");
        assert!(
            mass(n - 2) > 0.0 && mass(n - 1) > 0.0,
            "task 2's head has Fisher mass"
        );
        assert_eq!(f.0[n - 2].dims()[0], 2, "per-task head of 2 units");
    }
}
