//! Training-mode batch normalisation over `N × C × H × W`, optionally followed by a ReLU, as one
//! op: one pass for the statistics and one to normalise; backward one pass for the two channel
//! sums and one for the input gradient (candle's composition costs a dozen full-size passes).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{for_sample_chunks, par_map, slice, threads};
use crate::error::Result;

/// What the forward pass saves for the backward pass and reports to the caller.
#[derive(Debug, Clone, Default)]
struct Saved {
    mean: Vec<f32>,
    /// Biased batch variance.
    var: Vec<f32>,
    inv_std: Vec<f32>,
    gamma: Vec<f32>,
}

/// Batch statistics of one training-mode forward pass, per channel.
#[derive(Debug, Clone)]
pub struct BatchStats {
    /// Mean over `N × H × W`.
    pub mean: Tensor,
    /// Biased variance (divided by `N·H·W`) — the one used to normalise.
    pub var: Tensor,
}

struct BatchNormOp {
    eps: f64,
    relu: bool,
    saved: Arc<Mutex<Saved>>,
}

/// `(n, c, hw)` of a 4-D layout.
fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    Ok((n, c, h * w))
}

/// `f(channel)` for every channel, channels split between the threads, results in channel order.
fn per_channel<R: Send>(c: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    par_map(c, threads(), |channels| {
        channels.map(&f).collect::<Vec<R>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

/// The element ranges of channel `ch`'s planes, one per sample.
fn planes(n: usize, c: usize, hw: usize, ch: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).map(move |k| (k * c + ch) * hw..(k * c + ch + 1) * hw)
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "sequel-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice("batch_norm", s1, l1)?;
        let gamma = slice("batch_norm", s2, l2)?;
        let beta = slice("batch_norm", s3, l3)?;
        let (n, c, hw) = dims(l1)?;
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!(
                "batch_norm: {c} channels but {} / {} affine entries",
                gamma.len(),
                beta.len()
            );
        }
        let m = (n * hw) as f64;
        // Two-pass mean and variance in f64: exact enough for any batch, fixed order.
        let stats = per_channel(c, |ch| {
            let mut sum = 0f64;
            for r in planes(n, c, hw, ch) {
                sum += x[r].iter().map(|&v| v as f64).sum::<f64>();
            }
            let mean = sum / m;
            let mut sq = 0f64;
            for r in planes(n, c, hw, ch) {
                sq += x[r]
                    .iter()
                    .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                    .sum::<f64>();
            }
            let var = sq / m;
            (
                mean as f32,
                var as f32,
                (1.0 / (var + self.eps).sqrt()) as f32,
            )
        });
        let mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
        let inv_std: Vec<f32> = stats.iter().map(|s| s.2).collect();
        let scale: Vec<f32> = inv_std.iter().zip(gamma).map(|(i, g)| i * g).collect();
        let mut y = vec![0f32; x.len()];
        for_sample_chunks(&mut y, c * hw, n, threads(), |samples, out| {
            for (k, yk) in samples.zip(out.chunks_exact_mut(c * hw)) {
                for (ch, yp) in yk.chunks_exact_mut(hw.max(1)).enumerate() {
                    let xp = &x[(k * c + ch) * hw..][..hw];
                    let (mu, s, b) = (mean[ch], scale[ch], beta[ch]);
                    if self.relu {
                        for (o, &v) in yp.iter_mut().zip(xp) {
                            *o = ((v - mu) * s + b).max(0.0);
                        }
                    } else {
                        for (o, &v) in yp.iter_mut().zip(xp) {
                            *o = (v - mu) * s + b;
                        }
                    }
                }
            }
        });
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Saved {
            mean,
            var: stats.iter().map(|s| s.1).collect(),
            inv_std,
            gamma: gamma.to_vec(),
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let op = BatchNormGrad {
            relu: self.relu,
            saved,
        };
        let packed = x.apply_op3_no_bwd(y, &dy.contiguous()?, &op)?;
        let (total, c) = (x.elem_count(), x.dim(1)?);
        let dx = packed.narrow(0, 0, total)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, total, c)?;
        let dbeta = packed.narrow(0, total + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(x, y, dy) → [dx (flattened), dγ, dβ]` in one buffer (a custom op has one output).
struct BatchNormGrad {
    relu: bool,
    saved: Saved,
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "sequel-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice("batch_norm grad", s1, l1)?;
        let y = slice("batch_norm grad", s2, l2)?;
        let dy = slice("batch_norm grad", s3, l3)?;
        let (n, c, hw) = dims(l1)?;
        let s = &self.saved;
        if s.mean.len() != c {
            candle_core::bail!("batch_norm grad: no saved statistics for {c} channels");
        }
        let relu = self.relu;
        // The upstream gradient after the ReLU's mask.
        let g = |i: usize| if relu && y[i] <= 0.0 { 0.0 } else { dy[i] };
        let sums = per_channel(c, |ch| {
            let (mu, inv) = (s.mean[ch], s.inv_std[ch]);
            let (mut sg, mut sgx) = (0f64, 0f64);
            for i in planes(n, c, hw, ch).flatten() {
                let gi = g(i) as f64;
                sg += gi;
                sgx += gi * ((x[i] - mu) * inv) as f64;
            }
            (sg, sgx)
        });
        let m = (n * hw) as f64;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, dgb) = out.split_at_mut(x.len());
        for (ch, &(sg, sgx)) in sums.iter().enumerate() {
            dgb[ch] = sgx as f32;
            dgb[c + ch] = sg as f32;
        }
        for_sample_chunks(dx, c * hw, n, threads(), |samples, out| {
            for (k, dk) in samples.zip(out.chunks_exact_mut(c * hw)) {
                for (ch, dp) in dk.chunks_exact_mut(hw.max(1)).enumerate() {
                    let base = (k * c + ch) * hw;
                    let (mu, inv) = (s.mean[ch], s.inv_std[ch]);
                    let k1 = s.gamma[ch] * inv;
                    let mg = (sums[ch].0 / m) as f32;
                    let mgx = (sums[ch].1 / m) as f32;
                    for (j, d) in dp.iter_mut().enumerate() {
                        let i = base + j;
                        *d = k1 * (g(i) - mg - (x[i] - mu) * inv * mgx);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

/// Training-mode batch normalisation of `x: N × C × H × W` with the batch's own statistics:
/// `y = (x − mean)·γ / √(var + eps) + β` per channel, then `max(y, 0)` if `relu`. `gamma`, `beta`:
/// `C`. Returns `y` (differentiable in `x`, `gamma`, `beta`) and the detached batch statistics,
/// from which the caller updates its running averages.
///
/// CPU and f32 only: the caller keeps candle's composition for other devices (see
/// [`super::supported`]).
///
/// # Errors
/// `x` not 4-D, `gamma`/`beta` not of length `C`, tensors not on the CPU or not f32.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let saved = Arc::new(Mutex::new(Saved::default()));
    let op = BatchNormOp {
        eps,
        relu,
        saved: saved.clone(),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let s = saved.lock().unwrap_or_else(|e| e.into_inner());
    let c = s.mean.len();
    let stats = BatchStats {
        mean: Tensor::from_slice(&s.mean, c, x.device())?,
        var: Tensor::from_slice(&s.var, c, x.device())?,
    };
    Ok((y, stats))
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, D};

    use super::super::testing::{check_fd, flat, randn, rel_err, var};
    use super::*;

    /// candle's composition, as `BatchNorm2d` used before these kernels.
    fn reference(x: &Tensor, gamma: &Tensor, beta: &Tensor, relu: bool) -> Tensor {
        let c = gamma.dim(0).unwrap();
        let n = x.elem_count() / c;
        let xt = x.transpose(0, 1).unwrap().reshape((c, n)).unwrap();
        let mean = xt.mean(D::Minus1).unwrap();
        let centered = xt.broadcast_sub(&mean.unsqueeze(1).unwrap()).unwrap();
        let var = centered.sqr().unwrap().mean(D::Minus1).unwrap();
        let shape = (1, c, 1, 1);
        let inv = (var + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
        let scale = (inv * gamma).unwrap().reshape(shape).unwrap();
        let y = x
            .broadcast_sub(&mean.reshape(shape).unwrap())
            .unwrap()
            .broadcast_mul(&scale)
            .unwrap()
            .broadcast_add(&beta.reshape(shape).unwrap())
            .unwrap();
        if relu {
            y.relu().unwrap()
        } else {
            y
        }
    }

    #[test]
    fn matches_candle_composition_forward_and_backward() {
        for (t, dims) in [[4, 3, 5, 5], [1, 2, 3, 7], [3, 5, 1, 1], [2, 4, 6, 3]]
            .into_iter()
            .enumerate()
        {
            for relu in [false, true] {
                let seed = 50 + 10 * t as u64;
                let x = var(&dims, seed);
                let x3 = (x.as_tensor() * 3.0).unwrap().affine(1.0, 2.0).unwrap();
                let gamma = var(&[dims[1]], seed + 1);
                let beta = var(&[dims[1]], seed + 2);
                let (ours, stats) =
                    batch_norm_train(&x3, gamma.as_tensor(), beta.as_tensor(), 1e-5, relu).unwrap();
                let theirs = reference(&x3, gamma.as_tensor(), beta.as_tensor(), relu);
                assert!(rel_err(&ours, &theirs) < 1e-5, "forward {dims:?} {relu}");
                let c = dims[1];
                let mean = x3
                    .transpose(0, 1)
                    .unwrap()
                    .reshape((c, ()))
                    .unwrap()
                    .mean(1);
                assert!(rel_err(&stats.mean, &mean.unwrap()) < 1e-5);
                let r = randn(&dims, seed + 3);
                let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (&theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for v in [&x, &gamma, &beta] {
                    let e = rel_err(g1.get(v).unwrap(), g2.get(v).unwrap());
                    assert!(e < 1e-4, "gradient {dims:?} {relu} {:?}: {e}", v.dims());
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = var(&[3, 2, 4, 3], 1);
        let (gamma, beta) = (randn(&[2], 2), randn(&[2], 3));
        let r = randn(&[3, 2, 4, 3], 4);
        let loss = |x: &Tensor| {
            let (y, _) = batch_norm_train(x, &gamma, &beta, 1e-5, true).unwrap();
            (y.sqr().unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let (y, _) = batch_norm_train(x.as_tensor(), &gamma, &beta, 1e-5, true).unwrap();
        let g = (y.sqr().unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        check_fd(
            x.as_tensor(),
            g.get(&x).unwrap(),
            loss,
            &(0..72).step_by(5).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn same_inputs_give_bit_identical_results() {
        let run = || {
            let x = var(&[4, 6, 5, 5], 9);
            let (g, b) = (var(&[6], 10), var(&[6], 11));
            let (y, s) =
                batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor(), 1e-5, true).unwrap();
            let gr = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            [
                flat(&y),
                flat(&s.var),
                flat(gr.get(&x).unwrap()),
                flat(gr.get(&g).unwrap()),
                flat(gr.get(&b).unwrap()),
            ]
        };
        let a = run();
        assert_eq!(run(), a);
    }
}
