//! Input curvature and input-gradient stability of a classifier (docs/metrics.md), the quantities
//! low-curvature networks (Srinivas, Matoba, Lakkaraju & Fleuret, NeurIPS 2022) are meant to
//! reduce; computed with first derivatives only (no double backward).
//!
//! For a sample `(x, y)` with loss `ℓ(x) = CE(f(x), y)` over all output units, evaluation mode:
//!
//! ```text
//! g(x)       = ∇ₓ ℓ(x)                          input gradient
//! u          = g(x) / ‖g(x)‖                     its direction
//! curvature  = ‖g(x + h·u) − g(x)‖ / h          ≈ ‖∇²ₓℓ(x)·u‖ (≤ the Hessian's spectral norm)
//! cosine     = cos(g(x), g(x + h·u))            input-gradient stability (1 = unchanged)
//! ```
//!
//! averaged over the samples (a sample whose gradient is exactly 0 is left out of the curvature
//! and cosine means).

use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::model::Model;

/// Means over a set of samples; see the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InputCurvature {
    /// Samples measured.
    pub samples: usize,
    /// Mean ‖∇ₓℓ‖.
    pub grad_norm: f64,
    /// Mean ‖g(x + h·u) − g(x)‖ / h.
    pub curvature: f64,
    /// Mean cos(g(x), g(x + h·u)).
    pub cosine: f64,
}

/// Per-sample input gradients of the summed cross-entropy (rows are independent in
/// evaluation mode), flattened to `N × D`.
fn input_grads(model: &dyn Model, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let v = Var::from_tensor(x)?;
    let logits = model.forward(v.as_tensor(), false)?.logits;
    let n = x.dim(0)?;
    let loss = (candle_nn::loss::cross_entropy(&logits, y)? * n as f64)?;
    let grads = loss.backward()?;
    let g = grads
        .get(&v)
        .ok_or_else(|| crate::error::Error::msg("the logits do not depend on the input"))?;
    Ok(g.flatten_from(1)?.to_dtype(candle_core::DType::F64)?)
}

/// [`InputCurvature`] of `model` on the batch `x` (`N × …`, f32) with targets `y` (`N`, u32),
/// finite-difference step `h` in input units.
pub fn input_curvature(
    model: &dyn Model,
    x: &Tensor,
    y: &Tensor,
    h: f64,
) -> Result<InputCurvature> {
    let g = input_grads(model, x, y)?;
    let norm = g.sqr()?.sum(1)?.sqrt()?;
    let norms: Vec<f64> = norm.to_vec1()?;
    let u = g.broadcast_div(&norm.maximum(f64::MIN_POSITIVE)?.unsqueeze(1)?)?;
    let shifted = (x + (u.to_dtype(x.dtype())?.reshape(x.shape())? * h)?)?;
    let g2 = input_grads(model, &shifted, y)?;
    let diff: Vec<f64> = (&g2 - &g)?.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
    let dot: Vec<f64> = (&g2 * &g)?.sum(1)?.to_vec1()?;
    let norms2: Vec<f64> = g2.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
    let mut out = InputCurvature {
        samples: norms.len(),
        ..Default::default()
    };
    let mut counted = 0usize;
    for i in 0..norms.len() {
        out.grad_norm += norms[i];
        if norms[i] > 0.0 && norms2[i] > 0.0 {
            counted += 1;
            out.curvature += diff[i] / h;
            out.cosine += dot[i] / (norms[i] * norms2[i]);
        }
    }
    out.grad_norm /= norms.len().max(1) as f64;
    out.curvature /= counted.max(1) as f64;
    out.cosine /= counted.max(1) as f64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ActivationKind;
    use crate::model::layers::Dropout;
    use crate::model::mlp::Mlp;
    use crate::rng::{SeededRng, Stream};
    use candle_core::Device;

    fn model(hidden: &[usize], act: ActivationKind) -> Mlp {
        Mlp::new(
            3,
            hidden,
            &[2],
            act,
            Dropout::new(0.0, SeededRng::new(0, Stream::Dropout)),
            &mut SeededRng::new(4, Stream::Init),
            &Device::Cpu,
        )
        .unwrap()
    }

    /// A linear softmax classifier `f(x) = Wx + b` with two classes has `ℓ(x)` depending on
    /// `x` through `d = (w₁ − w₀)·x` only: `g = (σ(d') − [y = 1])·(w₁ − w₀)`, so the Hessian is
    /// `σ′(d')·vvᵀ` with `v = w₁ − w₀`, and along `u = ±v/‖v‖` the finite difference is
    /// `|σ(d'(x + hu)) − σ(d'(x))|·‖v‖ / h`; the cosine is 1 (the gradient keeps its direction
    /// unless its sign flips, which it cannot cross here).
    #[test]
    fn a_linear_classifier_has_the_closed_form_curvature() {
        let m = model(&[], ActivationKind::Relu);
        let w: Vec<Vec<f32>> = m.params().iter().next().unwrap().var.to_vec2().unwrap();
        let b: Vec<f32> = m.params().iter().nth(1).unwrap().var.to_vec1().unwrap();
        let v: Vec<f64> = (0..3).map(|k| (w[1][k] - w[0][k]) as f64).collect();
        let vn = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let xs = [0.3f32, -0.2, 0.5];
        let x = Tensor::new(&[xs], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let h = 0.01;
        let c = input_curvature(&m, &x, &y, h).unwrap();
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let d = |t: f64| {
            (0..3)
                .map(|k| v[k] * (xs[k] as f64 + t * v[k] / vn))
                .sum::<f64>()
                + (b[1] - b[0]) as f64
        };
        // y = 0: g = σ(d)·v, so u = +v/‖v‖.
        assert!((c.grad_norm - sig(d(0.0)) * vn).abs() < 1e-5, "{c:?}");
        let want = (sig(d(h)) - sig(d(0.0))).abs() * vn / h;
        assert!(
            (c.curvature - want).abs() < 1e-3 * want.max(1.0),
            "{} vs {want}",
            c.curvature
        );
        assert!((c.cosine - 1.0).abs() < 1e-9);
    }

    /// On nonlinear MLPs (ReLU and centered softplus) the measures are finite and the
    /// curvature positive.
    #[test]
    fn curvature_is_finite_and_positive_on_nonlinear_models() {
        let mut rng = SeededRng::new(1, Stream::Init);
        let v: Vec<f32> = (0..64 * 3).map(|_| rng.normal() * 2.0).collect();
        let x = Tensor::from_vec(v, (64, 3), &Device::Cpu).unwrap();
        let y = Tensor::from_vec((0..64u32).map(|i| i % 2).collect(), 64, &Device::Cpu).unwrap();
        let relu = input_curvature(&model(&[32, 32], ActivationKind::Relu), &x, &y, 0.05).unwrap();
        let soft = input_curvature(
            &model(&[32, 32], ActivationKind::CenteredSoftplus),
            &x,
            &y,
            0.05,
        )
        .unwrap();
        assert_eq!(relu.samples, 64);
        for c in [relu, soft] {
            assert!(c.grad_norm.is_finite() && c.curvature.is_finite() && c.cosine <= 1.0 + 1e-9);
            assert!(c.curvature > 0.0);
        }
    }
}
