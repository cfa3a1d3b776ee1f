//! The diagonal Fisher information of EWC and online EWC (Kirkpatrick et al. 2017; Schwarz et
//! al. 2018), estimated at the end of a task on its training samples, from fresh gradients of the
//! task loss alone — never a penalty:
//!
//! - `kind: empirical` — `F = (1/N) Σₙ (∇θ log p_θ(yₙ|xₙ))²` with the dataset label `yₙ`.
//! - `kind: true` — `F = (1/N) Σₙ Σ_c p_θ(c|xₙ) (∇θ log p_θ(c|xₙ))²`, the exact expectation over the
//!   units the softmax runs over (one forward and one backward per unit with `p > 0` per sample).
//! - `mode: per-sample` (default) squares per-sample gradients (all samples at once on dense
//!   backbones, a batch-1 loop on others: see [`crate::importance`]); `mode: minibatch` squares the gradient of the minibatch-mean loss
//!   over minibatches of `batch_size` (Avalanche's estimator; its scale depends on the batch
//!   size, so λ is not comparable across the two). With `kind: true` in minibatch mode each
//!   sample's label is drawn from `p_θ(·|x)` with the algorithm's seeded stream.
//!
//! In YAML these are the nested keys of `fisher:`, e.g. `fisher: { kind: true, mode: minibatch }`.
//!
//! Probabilities are those of the training loss: softmax over all units, or in multi-head task-IL
//! over the task's units. Forward passes run in evaluation mode (no dropout, batch-norm running
//! statistics).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::algorithm::task_samples;
use sequel_core::data::{Batch, SampleRef};
use sequel_core::model::ModelOutput;
use sequel_core::rng::SeededRng;
use sequel_core::{Result, TaskCtx};

use crate::check;
use crate::importance::{
    mean_gradient_statistic, per_sample_statistic, subset, training_log_probs, Granularity, Reduce,
};
use crate::penalty::PerParam;

/// Which Fisher information is estimated. In YAML `kind: true` is read as a boolean; it is
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

/// `fisher: { kind, mode, batch_size, samples }` of `ewc` and `ewc-online`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FisherSpec {
    /// `empirical` (default, as Avalanche, Mammoth and SequeL) or `true`.
    pub kind: FisherKind,
    /// `per-sample` (default) or `minibatch`.
    pub mode: Granularity,
    /// Minibatch size of `mode: minibatch`. Default 10 (the default `training.batch_size`).
    pub batch_size: usize,
    /// Estimate on at most this many of the task's training samples (a seeded random subset).
    /// Default: all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
}

impl Default for FisherSpec {
    fn default() -> Self {
        Self {
            kind: FisherKind::Empirical,
            mode: Granularity::PerSample,
            batch_size: 10,
            samples: None,
        }
    }
}

impl FisherSpec {
    /// Errors name `algorithm.fisher.<key>`.
    pub(crate) fn check(&self) -> Result<()> {
        check::at_least_one("fisher.batch_size", self.batch_size)?;
        if let Some(n) = self.samples {
            check::at_least_one("fisher.samples", n)?;
        }
        Ok(())
    }
}

/// The diagonal Fisher of `model` on `samples` (module docs). `rng` is used only by the sampled
/// labels of `kind: true` in minibatch mode.
pub fn fisher_diagonal(
    ctx: &mut TaskCtx,
    samples: &[SampleRef],
    spec: &FisherSpec,
) -> Result<PerParam> {
    let stream = ctx.stream;
    if spec.mode == Granularity::PerSample {
        // All samples at once where the backbone allows it (the MLP); the loop below otherwise.
        let vectorised = per_sample_statistic(
            ctx.model,
            stream,
            ctx.device,
            samples,
            Reduce::Square,
            |logits, batch| {
                let logp = training_log_probs(logits, batch, stream)?;
                Ok(match spec.kind {
                    FisherKind::Empirical => {
                        let picked = logp.gather(&batch.y.unsqueeze(1)?, D::Minus1)?.squeeze(1)?;
                        vec![(picked.ones_like()?, picked)]
                    }
                    // Σ_c p_c (∇ log p_c)²: one term per unit, weighted by p_c per sample.
                    FisherKind::True => {
                        let p = logp.exp()?.detach();
                        (0..logp.dim(1)?)
                            .map(|c| {
                                Ok((
                                    p.narrow(1, c, 1)?.squeeze(1)?,
                                    logp.narrow(1, c, 1)?.squeeze(1)?,
                                ))
                            })
                            .collect::<Result<Vec<_>>>()?
                    }
                })
            },
        )?;
        if let Some(f) = vectorised {
            return Ok(f);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::linear_model_task;

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
}
