//! Small layers with seeded initialisation and named, depth-tagged parameters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var, D};

use super::init;
use super::kernels;
use super::params::{ParamSet, Role};
use crate::config::ActivationKind;
use crate::error::Result;
use crate::rng::SeededRng;

/// `y = x·Wᵀ + b`, `W: out × in`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Var,
    pub bias: Var,
}

impl Linear {
    pub fn new(
        params: &mut ParamSet,
        name: &str,
        depth: usize,
        role: Role,
        (fan_in, fan_out): (usize, usize),
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let weight = init::uniform((fan_out, fan_in), bound, rng, device)?;
        let bias = init::uniform(fan_out, bound, rng, device)?;
        params.push(format!("{name}.weight"), depth, role, weight.clone());
        params.push(format!("{name}.bias"), depth, role, bias.clone());
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

/// The classifier: one linear layer, or — for multi-head task-IL — one per task, whose outputs
/// are concatenated in task order. Separate heads are separate parameters, so the trainer can
/// drop the gradients of heads a batch does not use and the optimizer leaves them untouched
/// (no weight decay or momentum drift on other tasks' heads).
#[derive(Debug, Clone)]
pub struct Head {
    heads: Vec<Linear>,
}

impl Head {
    /// `sizes[t]` = output units of head `t`; a single entry is an ordinary shared head.
    pub fn new(
        params: &mut ParamSet,
        depth: usize,
        fan_in: usize,
        sizes: &[usize],
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let mut heads = Vec::with_capacity(sizes.len());
        for (t, &k) in sizes.iter().enumerate() {
            if sizes.len() == 1 {
                heads.push(Linear::new(
                    params,
                    "head",
                    depth,
                    Role::Head,
                    (fan_in, k),
                    rng,
                    device,
                )?);
            } else {
                heads.push(Linear::new(
                    params,
                    &format!("head.{t}"),
                    depth,
                    Role::Head,
                    (fan_in, k),
                    rng,
                    device,
                )?);
                params.tag_last_as_head(2, t);
            }
        }
        Ok(Self { heads })
    }

    /// The linear layer of each head, in task order.
    pub fn layers(&self) -> &[Linear] {
        &self.heads
    }

    /// Output units of each head.
    pub fn sizes(&self) -> Vec<usize> {
        self.heads.iter().map(|h| h.weight.dims()[0]).collect()
    }

    pub fn device(&self) -> &Device {
        self.heads[0].weight.device()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let [one] = self.heads.as_slice() {
            return one.forward(x);
        }
        let outs = self
            .heads
            .iter()
            .map(|h| h.forward(x))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 1)?)
    }
}

/// 2-D convolution, `W: out × in × k × k`, optional bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Var,
    pub bias: Option<Var>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        params: &mut ParamSet,
        name: &str,
        depth: usize,
        (c_in, c_out, k): (usize, usize, usize),
        stride: usize,
        padding: usize,
        bias: bool,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / ((c_in * k * k) as f32).sqrt();
        let weight = init::uniform((c_out, c_in, k, k), bound, rng, device)?;
        params.push(format!("{name}.weight"), depth, Role::Body, weight.clone());
        let bias = if bias {
            let b = init::uniform(c_out, bound, rng, device)?;
            params.push(format!("{name}.bias"), depth, Role::Body, b.clone());
            Some(b)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::conv2d(
            x,
            self.weight.as_tensor(),
            self.bias.as_ref().map(|b| b.as_tensor()),
            self.stride,
            self.padding,
        )
    }
}

/// Batch normalisation over `N × C × H × W` with running statistics (momentum 0.1, unbiased
/// running variance, ε = 1e-5, as PyTorch).
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    pub scale: BnScale,
    pub beta: Var,
    pub running_mean: Var,
    pub running_var: Var,
    momentum: f64,
    eps: f64,
    /// `model.freeze` on this layer: normalise with the running statistics, never update them.
    frozen: Arc<AtomicBool>,
}

/// How a [`BatchNorm2d`] scales the normalised channels.
#[derive(Debug, Clone)]
pub enum BnScale {
    /// A learned per-channel γ (`<name>.weight`, initially 1): PyTorch's affine batch norm.
    Affine(Var),
    /// γ-Lipschitz mode ([`BatchNorm2d::lipschitz`]): one learned `log γ` (`<name>.log_gamma`).
    Lipschitz(Var),
}

impl BatchNorm2d {
    pub fn new(
        params: &mut ParamSet,
        name: &str,
        depth: usize,
        c: usize,
        device: &Device,
    ) -> Result<Self> {
        let gamma = init::constant(c, 1.0, device)?;
        Self::with_scale(params, name, depth, c, BnScale::Affine(gamma), device)
    }

    /// γ-Lipschitz batch normalisation (Srinivas et al., NeurIPS 2022): with the per-channel
    /// standard deviations `σ_c` (batch or running) and `σ_min = min_c σ_c`,
    ///
    /// ```text
    /// y_c = (x_c − μ_c) · (σ_min / σ_c) · min(1/σ_min, γ) + b_c
    /// ```
    ///
    /// Each channel's factor `σ_min/σ_c ≤ 1` makes the normalisation 1-Lipschitz, and the one
    /// scalar `min(1/σ_min, γ)` bounds the layer's Lipschitz constant by γ (it is plain batch
    /// norm without per-channel scales wherever γ ≥ 1/σ_min). γ = exp(`<name>.log_gamma`),
    /// learned, initially 1; the per-channel `weight` is not a parameter in this mode.
    pub fn lipschitz(
        params: &mut ParamSet,
        name: &str,
        depth: usize,
        c: usize,
        device: &Device,
    ) -> Result<Self> {
        let log_gamma = init::constant(1, 0.0, device)?;
        Self::with_scale(
            params,
            name,
            depth,
            c,
            BnScale::Lipschitz(log_gamma),
            device,
        )
    }

    /// The layer with `scale`, its shift and running statistics registered under
    /// `name.<suffix>` with one frozen flag for the layer: freezing any of them by name freezes
    /// it all alike.
    fn with_scale(
        params: &mut ParamSet,
        name: &str,
        depth: usize,
        c: usize,
        scale: BnScale,
        device: &Device,
    ) -> Result<Self> {
        let beta = init::constant(c, 0.0, device)?;
        let running_mean = init::constant(c, 0.0, device)?;
        let running_var = init::constant(c, 1.0, device)?;
        let (scale_name, scale_var) = match &scale {
            BnScale::Affine(g) => ("weight", g),
            BnScale::Lipschitz(g) => ("log_gamma", g),
        };
        let frozen = Arc::new(AtomicBool::new(false));
        for (suffix, role, var) in [
            (scale_name, Role::Body, scale_var),
            ("bias", Role::Body, &beta),
            ("running_mean", Role::NormStat, &running_mean),
            ("running_var", Role::NormStat, &running_var),
        ] {
            params.push_with_flag(
                format!("{name}.{suffix}"),
                depth,
                role,
                var.clone(),
                frozen.clone(),
            );
        }
        Ok(Self {
            scale,
            beta,
            running_mean,
            running_var,
            momentum: 0.1,
            eps: 1e-5,
            frozen,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// [`Self::forward`], followed by a ReLU if `relu` (fused into one kernel in CPU training).
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let train = train && !self.frozen.load(Ordering::Relaxed);
        let c = self.beta.dim(0)?;
        let (mean, var) = if train {
            let n = x.elem_count() / c;
            if n < 2 {
                return Err(crate::error::Error::msg(
                    "batch normalisation needs more than one value per channel in training; raise training.batch_size",
                ));
            }
            let fused = match &self.scale {
                BnScale::Affine(gamma) => [x, gamma.as_tensor(), self.beta.as_tensor()]
                    .into_iter()
                    .all(kernels::supported)
                    .then_some(gamma),
                BnScale::Lipschitz(_) => None,
            };
            let (y, mean, var) = if let Some(gamma) = fused {
                let (y, s) = kernels::batch_norm_train(
                    x,
                    gamma.as_tensor(),
                    self.beta.as_tensor(),
                    self.eps,
                    relu,
                )?;
                (Some(y), s.mean, s.var)
            } else {
                let xt = x.transpose(0, 1)?.reshape((c, n))?;
                let mean = xt.mean(D::Minus1)?;
                let centered = xt.broadcast_sub(&mean.unsqueeze(1)?)?;
                let var = centered.sqr()?.mean(D::Minus1)?;
                (None, mean, var)
            };
            let m = self.momentum;
            let unbiased = (var.detach() * (n as f64 / (n - 1) as f64))?;
            self.running_mean
                .set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach() * m)?)?)?;
            self.running_var
                .set(&((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?)?;
            if let Some(y) = y {
                return Ok(y);
            }
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().clone(),
                self.running_var.as_tensor().clone(),
            )
        };
        let shape = (1, c, 1, 1);
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        let scale = match &self.scale {
            BnScale::Affine(gamma) => (inv * gamma.as_tensor())?.reshape(shape)?,
            BnScale::Lipschitz(log_gamma) => {
                // 1/σ_min = max_c 1/σ_c; factor σ_min/σ_c · min(1/σ_min, γ).
                let inv_min = inv.max_keepdim(0)?;
                let k = inv_min.minimum(&log_gamma.as_tensor().exp()?)?;
                (inv.broadcast_div(&inv_min)?.broadcast_mul(&k))?.reshape(shape)?
            }
        };
        let shift = mean.reshape(shape)?;
        let y = x
            .broadcast_sub(&shift)?
            .broadcast_mul(&scale)?
            .broadcast_add(&self.beta.as_tensor().reshape(shape)?)?;
        Ok(if relu { y.relu()? } else { y })
    }
}

/// 2×2 max pooling with stride 2 (floor mode: an odd last row/column is dropped).
///
/// Written as a reshape and two max-reductions because candle 0.11.1's `max_pool2d` backward is
/// wrong: it scales the gradient of each window's maximum by 1/4 (and mis-assigns it on odd map
/// sizes), so every pooling layer silently divides the learning rate of the layers below it.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (h2, w2) = (h / 2, w / 2);
    let x = if h % 2 != 0 || w % 2 != 0 {
        x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?
    } else {
        x.clone()
    };
    Ok(x.reshape((n, c, h2, 2, w2, 2))?.max(5)?.max(3)?)
}

/// `kind` applied element-wise. `CenteredSoftplus` here has the default β = 5
/// ([`crate::config::DEFAULT_SOFTPLUS_BETA`]); a layer with another or a learned β calls
/// [`centered_softplus`] itself, as the MLP does.
pub fn activate(x: &Tensor, kind: ActivationKind) -> Result<Tensor> {
    Ok(match kind {
        ActivationKind::Relu => x.relu()?,
        ActivationKind::Tanh => x.tanh()?,
        ActivationKind::Sigmoid => candle_nn::ops::sigmoid(x)?,
        ActivationKind::Gelu => x.gelu_erf()?,
        ActivationKind::CenteredSoftplus => {
            centered_softplus(x, &Beta::Fixed(crate::config::DEFAULT_SOFTPLUS_BETA as f64))?
        }
    })
}

/// β of a centered softplus: a constant, or learned as `log β` (a one-element parameter).
#[derive(Debug, Clone)]
pub enum Beta {
    Fixed(f64),
    Log(Var),
}

/// Centered softplus (Srinivas, Matoba, Lakkaraju & Fleuret, "Efficient Training of
/// Low-Curvature Neural Networks", NeurIPS 2022):
///
/// ```text
/// s_β(x) = (softplus(βx) − ln 2) / β,   softplus(z) = max(z, 0) + ln(1 + e^(−|z|))
/// ```
///
/// `s(0) = 0`, `s′(x) = σ(βx)` (1-Lipschitz), `|s″| ≤ β/4`. The softplus form never
/// exponentiates a positive number, so it is finite for any `βx`; candle's derivatives of `max`
/// and `|·|` at 0 (both taken as 1) give exactly `s′(0) = 1 − ½ = σ(0)`.
pub fn centered_softplus(x: &Tensor, beta: &Beta) -> Result<Tensor> {
    let softplus = |z: &Tensor| -> Result<Tensor> {
        Ok((z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
    };
    Ok(match beta {
        Beta::Fixed(b) => ((softplus(&(x * *b)?)? - std::f64::consts::LN_2)? / *b)?,
        Beta::Log(log_beta) => {
            let b = log_beta.as_tensor().exp()?;
            let sp = softplus(&x.broadcast_mul(&b)?)?;
            (sp - std::f64::consts::LN_2)?.broadcast_div(&b)?
        }
    })
}

/// Inverted dropout with masks drawn from our seeded stream (candle's CPU masks are unseeded).
#[derive(Debug)]
pub struct Dropout {
    p: f32,
    rng: Mutex<SeededRng>,
}

impl Dropout {
    pub fn new(p: f32, rng: SeededRng) -> Self {
        Self {
            p,
            rng: Mutex::new(rng),
        }
    }

    /// The same dropout with its own copy of the mask stream at its current position.
    pub fn fork(&self) -> Self {
        let rng = self.rng.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Self::new(self.p, rng)
    }

    /// The mask stream's position (checkpoints).
    pub fn rng_state(&self) -> crate::rng::RngState {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).state()
    }

    pub fn set_rng_state(&self, state: crate::rng::RngState) {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = SeededRng::from(state);
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.uniform_f32() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(DType::F32)?;
        Ok(x.mul(&mask)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward equals the window maxima; the gradient of Σ pool(x) is 1 at each window's maximum
    /// and 0 elsewhere (including the dropped odd row and column).
    #[test]
    fn max_pool_forward_and_gradient_are_exact() {
        let dev = Device::Cpu;
        // 5×5 map with distinct values so every window has a unique maximum.
        let vals: Vec<f32> = (0..25).map(|i| ((i * 7) % 25) as f32).collect();
        let x =
            Var::from_tensor(&Tensor::from_vec(vals.clone(), (1, 1, 5, 5), &dev).unwrap()).unwrap();
        let y = max_pool2x2(x.as_tensor()).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        let out = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut expected_grad = vec![0f32; 25];
        for (k, (wy, wx)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
            let idx = [
                (2 * wy) * 5 + 2 * wx,
                (2 * wy) * 5 + 2 * wx + 1,
                (2 * wy + 1) * 5 + 2 * wx,
                (2 * wy + 1) * 5 + 2 * wx + 1,
            ];
            let best = *idx
                .iter()
                .max_by(|&&a, &&b| vals[a].total_cmp(&vals[b]))
                .unwrap();
            assert_eq!(out[k], vals[best]);
            expected_grad[best] = 1.0;
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        let grad = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(grad, expected_grad);
    }

    fn sigmoid(z: f64) -> f64 {
        1.0 / (1.0 + (-z).exp())
    }

    /// s(0) = 0; the autograd derivative is σ(βx), and so is a central finite difference of the
    /// forward pass (f64, h = 1e-5), for fixed and learned β, at several β.
    #[test]
    fn centered_softplus_is_zero_at_zero_with_derivative_sigmoid_beta_x() {
        let dev = Device::Cpu;
        let xs = [-3.0f64, -0.7, -0.01, 0.0, 0.02, 0.5, 2.5];
        for b in [0.5f64, 1.0, 5.0, 40.0] {
            let log_beta = Var::from_tensor(&Tensor::new(&[b.ln()], &dev).unwrap()).unwrap();
            for beta in [Beta::Fixed(b), Beta::Log(log_beta)] {
                let s = |v: &[f64]| -> Vec<f64> {
                    let t = Tensor::new(v, &dev).unwrap();
                    centered_softplus(&t, &beta).unwrap().to_vec1().unwrap()
                };
                assert_eq!(s(&[0.0])[0], 0.0, "β {b}");
                let x = Var::from_tensor(&Tensor::new(&xs, &dev).unwrap()).unwrap();
                let y = centered_softplus(x.as_tensor(), &beta).unwrap();
                let g = y.sum_all().unwrap().backward().unwrap();
                let grad: Vec<f64> = g.get(&x).unwrap().to_vec1().unwrap();
                let h = 1e-5;
                let plus: Vec<f64> = xs.iter().map(|x| x + h).collect();
                let minus: Vec<f64> = xs.iter().map(|x| x - h).collect();
                let (sp, sm) = (s(&plus), s(&minus));
                for (k, &x) in xs.iter().enumerate() {
                    let want = sigmoid(b * x);
                    assert!((grad[k] - want).abs() < 1e-12, "β {b} x {x}: {}", grad[k]);
                    let fd = (sp[k] - sm[k]) / (2.0 * h);
                    assert!((fd - want).abs() < 1e-6, "β {b} x {x}: fd {fd} vs {want}");
                }
            }
        }
    }

    /// |βx| far beyond exp's range: s(x) = x − ln2/β above, −ln2/β below, derivatives 1 and 0,
    /// all finite (f32, as models run).
    #[test]
    fn centered_softplus_is_stable_for_large_inputs() {
        let dev = Device::Cpu;
        let b = 5.0f64;
        let x = Var::from_tensor(&Tensor::new(&[1e4f32, -1e4], &dev).unwrap()).unwrap();
        let y = centered_softplus(x.as_tensor(), &Beta::Fixed(b)).unwrap();
        let v: Vec<f32> = y.to_vec1().unwrap();
        let c = (std::f64::consts::LN_2 / b) as f32;
        assert!((v[0] - (1e4 - c)).abs() <= 1e-3 && v[1] == -c, "{v:?}");
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 0.0]);
    }

    /// A learned β gets the gradient ∂s/∂log β = β·∂s/∂β = x·σ(βx) − s(x).
    #[test]
    fn a_learned_beta_receives_its_gradient() {
        let dev = Device::Cpu;
        let b = 5.0f64;
        let log_beta = Var::from_tensor(&Tensor::new(&[b.ln()], &dev).unwrap()).unwrap();
        let xs = [-0.4f64, 0.1, 0.8];
        let x = Tensor::new(&xs, &dev).unwrap();
        let y = centered_softplus(&x, &Beta::Log(log_beta.clone())).unwrap();
        let s: Vec<f64> = y.to_vec1().unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let got = g.get(&log_beta).unwrap().to_vec1::<f64>().unwrap()[0];
        let want: f64 = xs.iter().zip(&s).map(|(x, s)| x * sigmoid(b * x) - s).sum();
        assert!(
            want.abs() > 1e-3 && (got - want).abs() < 1e-12,
            "{got} vs {want}"
        );
    }
}
