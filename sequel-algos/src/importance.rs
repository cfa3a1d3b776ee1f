//! Gradient statistics over a task's data, shared by the importance estimators of EWC (squared
//! gradients: the diagonal Fisher) and MAS (absolute gradients).
//!
//! candle has no vmap. Where every trainable tensor belongs to a dense layer (the MLP), a per-sample
//! statistic is computed for 256 samples at once from the layers' inputs and output gradients
//! ([`per_sample_statistic`]); other backbones run a loop of batch-1 forward/backward passes
//! ([`mean_gradient_statistic`]): samples are gathered 256 at a time and each row is then run on
//! its own. Both give the same values up to summation order (tests). The minibatch variant runs one backward per minibatch of the requested size and squares
//! (or takes |·| of) the minibatch gradient — a different, batch-size-dependent quantity, offered
//! because some libraries use it.
//!
//! Every forward here runs in evaluation mode (`train = false`): no dropout, batch-norm running
//! statistics used and left untouched. The statistic is therefore a function of the weights alone,
//! and computing it draws nothing from the dropout stream — training afterwards is unaffected.

use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor, TensorId, D};
use serde::{Deserialize, Serialize};

use sequel_core::data::{Batch, GatherBuf, SampleRef, Split, TaskStream};
use sequel_core::model::{Model, ModelOutput};
use sequel_core::rng::SeededRng;
use sequel_core::Result;

use crate::penalty::PerParam;

/// Whether a gradient statistic is taken per sample or per minibatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    /// `(1/N) Σₙ φ(∇ℓ(xₙ))`: the definition; one batch-1 backward per sample.
    PerSample,
    /// `(1/M) Σₘ φ(∇ (1/B) Σ_{n∈m} ℓ(xₙ))`: a cheaper approximation whose scale depends on the
    /// minibatch size `B`.
    Minibatch,
}

/// `importance: { mode, batch_size, samples }` of `mas`: how a gradient-based importance is
/// estimated at the end of a task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImportanceSpec {
    /// `per-sample` (default) or `minibatch`.
    pub mode: Granularity,
    /// Minibatch size of `mode: minibatch`. Default 10.
    pub batch_size: usize,
    /// Estimate on at most this many training samples (a seeded random subset). Default: all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
}

impl Default for ImportanceSpec {
    fn default() -> Self {
        Self {
            mode: Granularity::PerSample,
            batch_size: 10,
            samples: None,
        }
    }
}

impl ImportanceSpec {
    /// Errors name `algorithm.importance.<key>`.
    pub fn check(&self) -> Result<()> {
        crate::check::at_least_one("importance.batch_size", self.batch_size)?;
        if let Some(n) = self.samples {
            crate::check::at_least_one("importance.samples", n)?;
        }
        Ok(())
    }
}

/// What is applied to each gradient before averaging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// `g²` (Fisher information).
    Square,
    /// `|g|` (MAS).
    Abs,
}

/// Samples per gather when the statistic is per sample.
const GATHER_CHUNK: usize = 256;

/// `(1/U) Σ_units Σⱼ wⱼ·φ(∇θ ℓⱼ)` where a *unit* is one sample (`batch_size = 1`) or one
/// minibatch, and `objective` returns the weighted scalar losses `(wⱼ, ℓⱼ)` of a unit from the
/// model's (evaluation-mode) output. Terms with weight 0 are skipped (they contribute exactly 0).
pub fn mean_gradient_statistic(
    model: &dyn Model,
    stream: &TaskStream,
    device: &Device,
    samples: &[SampleRef],
    batch_size: usize,
    reduce: Reduce,
    mut objective: impl FnMut(&ModelOutput, &Batch) -> Result<Vec<(f64, Tensor)>>,
) -> Result<PerParam> {
    let params = model.params();
    let mut acc = PerParam::zeros(params)?;
    let bs = batch_size.max(1);
    let chunk = if bs == 1 { GATHER_CHUNK } else { bs };
    let mut buf = GatherBuf::default();
    let mut units = 0usize;
    for refs in samples.chunks(chunk) {
        let gathered = stream.gather(refs, Split::Train, &mut buf, device)?;
        let parts = if bs == 1 {
            (0..gathered.len())
                .map(|i| row(&gathered, i))
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![gathered]
        };
        for batch in parts {
            let out = sequel_core::model::forward_batch(model, &batch, false)?;
            for (w, loss) in objective(&out, &batch)? {
                if w == 0.0 {
                    continue;
                }
                let grads = loss.backward()?;
                for (a, p) in acc.0.iter_mut().zip(params.trainable()) {
                    let Some(g) = grads.get(p.var.as_tensor()) else {
                        continue;
                    };
                    // candle's parameter gradients can stay attached to the graph (a conv kernel's
                    // gradient is computed from tracked activations): detach, or a penalty built on
                    // this statistic would back-propagate into it.
                    let g = g.detach();
                    let v = match reduce {
                        Reduce::Square => g.sqr()?,
                        Reduce::Abs => g.abs()?,
                    };
                    *a = if w == 1.0 {
                        (&*a + v)?
                    } else {
                        (&*a + (v * w)?)?
                    };
                }
            }
            units += 1;
        }
    }
    if units > 0 {
        let inv = 1.0 / units as f64;
        for a in acc.0.iter_mut() {
            *a = (&*a * inv)?;
        }
    }
    Ok(acc)
}

/// The terms of a chunk of samples for [`per_sample_statistic`]: for each, the weights `wₙ` and
/// the losses `ℓₙ` of the chunk's `N` samples (two `N`-vectors).
pub type SampleTerms = Vec<(Tensor, Tensor)>;

/// `(1/N) Σₙ Σⱼ wⱼₙ·φ(∇θ ℓⱼₙ)` over all `N` samples at once, without a batch-1 loop: the
/// per-sample statistic of [`mean_gradient_statistic`] with `batch_size = 1`, equal to it up to
/// summation order. For a dense layer `z = a·Wᵀ + b`, sample `n`'s gradients are `gₙaₙᵀ` and `gₙ`
/// (`gₙ = ∂ℓₙ/∂zₙ`), and `φ(gₙaₙᵀ) = φ(gₙ)φ(aₙ)ᵀ` for `φ` = square or absolute value, so
/// `Σₙ wₙφ(gₙaₙᵀ) = (w ⊙ φ(G))ᵀφ(A)`: one backward pass of `Σₙ ℓₙ` per term and chunk, and one
/// matrix product per layer. `objective` maps evaluation-mode logits to the terms.
///
/// `None` when the backbone has trainable tensors outside dense layers
/// ([`sequel_core::model::Model::dense_forward`]); callers then use the loop.
pub fn per_sample_statistic(
    model: &dyn Model,
    stream: &TaskStream,
    device: &Device,
    samples: &[SampleRef],
    reduce: Reduce,
    mut objective: impl FnMut(&Tensor, &Batch) -> Result<SampleTerms>,
) -> Result<Option<PerParam>> {
    let params = model.params();
    let index: HashMap<TensorId, usize> = params
        .trainable()
        .enumerate()
        .map(|(i, p)| (p.var.as_tensor().id(), i))
        .collect();
    let phi = |t: &Tensor| -> Result<Tensor> {
        Ok(match reduce {
            Reduce::Square => t.sqr()?,
            Reduce::Abs => t.abs()?,
        })
    };
    let mut acc = PerParam::zeros(params)?;
    let mut buf = GatherBuf::default();
    let mut n = 0usize;
    for refs in samples.chunks(GATHER_CHUNK) {
        let batch = stream.gather(refs, Split::Train, &mut buf, device)?;
        let Some(f) = model.dense_forward(&batch.x)? else {
            return Ok(None);
        };
        let covered: HashSet<TensorId> = f
            .layers
            .iter()
            .flat_map(|l| [l.weight.as_tensor().id(), l.bias.as_tensor().id()])
            .collect();
        if index.keys().any(|id| !covered.contains(id)) {
            return Ok(None);
        }
        for (w, loss) in objective(&f.logits, &batch)? {
            let w = w.detach();
            if w.abs()?.sum_all()?.to_scalar::<f32>()? == 0.0 {
                continue;
            }
            let grads = loss.sum_all()?.backward()?;
            for l in &f.layers {
                let (Some(&wi), Some(&bi)) = (
                    index.get(&l.weight.as_tensor().id()),
                    index.get(&l.bias.as_tensor().id()),
                ) else {
                    continue; // frozen
                };
                let Some(g) = grads.get(l.tap.as_tensor()) else {
                    continue; // the loss does not reach this layer
                };
                let wg = phi(&g.detach())?.broadcast_mul(&w.unsqueeze(1)?)?;
                let dw = wg.t()?.matmul(&phi(&l.input.detach())?)?;
                acc.0[wi] = (&acc.0[wi] + dw)?;
                acc.0[bi] = (&acc.0[bi] + wg.sum(0)?)?;
            }
        }
        n += batch.len();
    }
    if n > 0 {
        let inv = 1.0 / n as f64;
        for a in acc.0.iter_mut() {
            *a = (&*a * inv)?;
        }
    }
    Ok(Some(acc))
}

/// Row `i` of a batch as a batch of one.
pub fn row(batch: &Batch, i: usize) -> Result<Batch> {
    Ok(Batch {
        x: batch.x.narrow(0, i, 1)?,
        y: batch.y.narrow(0, i, 1)?,
        units: batch.units[i..i + 1].to_vec(),
        tasks: batch.tasks[i..i + 1].to_vec(),
        refs: batch.refs[i..i + 1].to_vec(),
        incoming: usize::from(i < batch.incoming),
    })
}

/// Log-probabilities over the output units the training loss uses: every unit, or in multi-head
/// task-IL each sample's own task's units (the others get probability exactly 0).
pub fn training_log_probs(logits: &Tensor, batch: &Batch, stream: &TaskStream) -> Result<Tensor> {
    let z = if stream.mask_in_training() {
        logits.broadcast_add(&sequel_core::loss::unit_mask(
            batch,
            stream,
            logits.dim(D::Minus1)?,
        )?)?
    } else {
        logits.clone()
    };
    Ok(candle_nn::ops::log_softmax(&z, D::Minus1)?)
}

/// The logits the training loss sees: all of them, or in multi-head task-IL only each sample's
/// task's units (the others multiplied by 0, which also zeroes their gradient).
pub fn training_logits(logits: &Tensor, batch: &Batch, stream: &TaskStream) -> Result<Tensor> {
    if !stream.mask_in_training() {
        return Ok(logits.clone());
    }
    let u = logits.dim(D::Minus1)?;
    let mut keep = vec![0f32; batch.len() * u];
    for (r, &t) in batch.tasks.iter().enumerate() {
        let range = &stream.tasks[t as usize].units;
        keep[r * u + range.start..r * u + range.end].fill(1.0);
    }
    let keep = Tensor::from_vec(keep, (batch.len(), u), logits.device())?;
    Ok((logits * keep)?)
}

/// The samples an importance is estimated on: all of `samples`, or a seeded random subset of
/// `cap` of them (drawn from the algorithm's stream).
pub fn subset(
    mut samples: Vec<SampleRef>,
    cap: Option<usize>,
    rng: &mut SeededRng,
) -> Vec<SampleRef> {
    if let Some(n) = cap {
        if n < samples.len() {
            rng.shuffle(&mut samples);
            samples.truncate(n);
        }
    }
    samples
}
