//! SGD with momentum, Nesterov momentum and coupled L2 weight decay, with PyTorch's semantics:
//!
//! ```text
//! g ← ∇θ + wd·θ
//! b ← μ·b + g            (b₁ = g)
//! d ← g + μ·b  (Nesterov)   or   d ← b
//! θ ← θ − lr·d
//! ```

use candle_core::{backprop::GradStore, Tensor};

use super::kernels::{axpby, state_buffer};
use super::{load_slots, save_slots, Optimizer};
use crate::error::Result;
use crate::model::ParamSet;
use crate::state::StateDict;

#[derive(Debug)]
pub struct Sgd {
    lr: f32,
    momentum: f32,
    nesterov: bool,
    weight_decay: f32,
    buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    pub fn new(lr: f32, momentum: f32, nesterov: bool, weight_decay: f32) -> Self {
        Self {
            lr,
            momentum,
            nesterov,
            weight_decay,
            buffers: Vec::new(),
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &ParamSet, grads: &GradStore) -> Result<()> {
        let n = params.trainable().count();
        if self.buffers.len() != n {
            self.buffers = vec![None; n];
        }
        let (lr, mu) = (self.lr, self.momentum);
        for (i, (p, g)) in params.grads(grads).enumerate() {
            let Some(g) = g else { continue };
            let theta = p.var.as_tensor();
            let g = if self.weight_decay != 0.0 {
                (g + (theta * self.weight_decay as f64)?)?
            } else {
                g.clone()
            };
            if mu == 0.0 {
                axpby(theta, 1.0, -lr, &g)?;
                continue;
            }
            let b = match &self.buffers[i] {
                Some(b) => {
                    axpby(b, mu, 1.0, &g)?;
                    b.clone()
                }
                None => {
                    let b = state_buffer(&g)?;
                    self.buffers[i] = Some(b.clone());
                    b
                }
            };
            if self.nesterov {
                axpby(theta, 1.0, -lr, &g)?;
                axpby(theta, 1.0, -lr * mu, &b)?;
            } else {
                axpby(theta, 1.0, -lr, &b)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f32 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }

    fn reset(&mut self) {
        self.buffers.clear();
    }

    fn save_state(&self) -> Result<StateDict> {
        let mut out = StateDict::new();
        let slots: Vec<Option<&Tensor>> = self.buffers.iter().map(Option::as_ref).collect();
        save_slots(&mut out, "momentum", &slots)?;
        Ok(out)
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        self.buffers = load_slots(state, "momentum")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;
    use candle_core::{Device, Var};

    /// Momentum SGD on f(θ) = ½θ² against the recurrence written out by hand.
    #[test]
    fn momentum_nesterov_and_weight_decay_match_hand_recurrence() {
        for nesterov in [false, true] {
            let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
            let mut ps = ParamSet::new();
            ps.push("w", 1, Role::Body, var.clone());
            let (lr, mu, wd) = (0.1f32, 0.9f32, 0.01f32);
            let mut opt = Sgd::new(lr, mu, nesterov, wd);
            let (mut theta, mut b) = (1.0f32, None::<f32>);
            for _ in 0..5 {
                let loss = (var.as_tensor().sqr().unwrap() * 0.5)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                opt.step(&ps, &grads).unwrap();
                let g = theta + wd * theta;
                let nb = match b {
                    Some(b) => mu * b + g,
                    None => g,
                };
                let d = if nesterov { g + mu * nb } else { nb };
                b = Some(nb);
                theta -= lr * d;
                let got = var.to_vec1::<f32>().unwrap()[0];
                assert!(
                    (got - theta).abs() < 1e-6,
                    "nesterov={nesterov}: {got} vs {theta}"
                );
            }
        }
    }
}
