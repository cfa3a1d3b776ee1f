//! Adam (Kingma & Ba, 2015) with coupled L2 weight decay, and AdamW (Loshchilov & Hutter, 2019)
//! with decoupled decay:
//!
//! ```text
//! g ← ∇θ (+ wd·θ for Adam)         θ ← θ·(1 − lr·wd) for AdamW
//! m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²
//! θ ← θ − lr · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)
//! ```

use candle_core::{backprop::GradStore, Tensor};

use super::kernels::{adam_update, state_buffer};
use super::{load_slots, save_slots, Optimizer};
use crate::error::Result;
use crate::model::ParamSet;
use crate::state::StateDict;

#[derive(Debug)]
pub struct Adam {
    lr: f32,
    betas: [f32; 2],
    eps: f32,
    weight_decay: f32,
    decoupled: bool,
    t: u64,
    moments: Vec<Option<(Tensor, Tensor)>>,
}

impl Adam {
    pub fn new(lr: f32, betas: [f32; 2], eps: f32, weight_decay: f32, decoupled: bool) -> Self {
        Self {
            lr,
            betas,
            eps,
            weight_decay,
            decoupled,
            t: 0,
            moments: Vec::new(),
        }
    }
}

impl Optimizer for Adam {
    fn step(&mut self, params: &ParamSet, grads: &GradStore) -> Result<()> {
        let n = params.trainable().count();
        if self.moments.len() != n {
            self.moments = vec![None; n];
        }
        self.t += 1;
        let c1 = 1.0 - (self.betas[0] as f64).powi(self.t as i32);
        let c2 = 1.0 - (self.betas[1] as f64).powi(self.t as i32);
        for (i, (p, g)) in params.grads(grads).enumerate() {
            let Some(g) = g else { continue };
            let theta = p.var.as_tensor();
            let g = if self.weight_decay != 0.0 && !self.decoupled {
                (g + (theta * self.weight_decay as f64)?)?
            } else {
                g.clone()
            };
            let decay = if self.decoupled {
                1.0 - self.lr * self.weight_decay
            } else {
                1.0
            };
            let (m, v) = match &self.moments[i] {
                Some(mv) => mv.clone(),
                None => {
                    let z = g.zeros_like()?;
                    let mv = (state_buffer(&z)?, state_buffer(&z)?);
                    self.moments[i] = Some(mv.clone());
                    mv
                }
            };
            adam_update(
                theta,
                decay,
                &m,
                &v,
                &g,
                self.betas,
                self.lr,
                (c1 as f32, c2 as f32),
                self.eps,
            )?;
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
        self.t = 0;
        self.moments.clear();
    }

    fn save_state(&self) -> Result<StateDict> {
        let mut out = StateDict::new();
        let m: Vec<Option<&Tensor>> = self
            .moments
            .iter()
            .map(|x| x.as_ref().map(|p| &p.0))
            .collect();
        let v: Vec<Option<&Tensor>> = self
            .moments
            .iter()
            .map(|x| x.as_ref().map(|p| &p.1))
            .collect();
        save_slots(&mut out, "m", &m)?;
        save_slots(&mut out, "v", &v)?;
        out.insert(
            "t".into(),
            Tensor::new(&[self.t as i64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let m = load_slots(state, "m")?;
        let v = load_slots(state, "v")?;
        if m.len() != v.len() {
            return Err(crate::error::Error::msg(
                "Adam state: first and second moments differ in length",
            ));
        }
        self.moments = m.into_iter().zip(v).map(|(a, b)| a.zip(b)).collect();
        self.t = match state.get("t") {
            Some(t) => t.to_vec1::<i64>()?.first().copied().unwrap_or(0) as u64,
            None => 0,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;
    use candle_core::{Device, Var};

    #[test]
    fn first_adam_step_moves_by_lr_times_sign() {
        let var = Var::new(&[2.0f32, -3.0], &Device::Cpu).unwrap();
        let mut ps = ParamSet::new();
        ps.push("w", 1, Role::Body, var.clone());
        let mut opt = Adam::new(0.1, [0.9, 0.999], 1e-8, 0.0, false);
        let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&ps, &loss.backward().unwrap()).unwrap();
        let v = var.to_vec1::<f32>().unwrap();
        assert!(
            (v[0] - 1.9).abs() < 1e-5 && (v[1] + 2.9).abs() < 1e-5,
            "{v:?}"
        );
    }

    #[test]
    fn adamw_decay_is_decoupled_from_the_adaptive_step() {
        // Loss = θ, so ∇ = 1 and Adam's first step is exactly lr; AdamW first shrinks θ by lr·wd.
        let var = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut ps = ParamSet::new();
        ps.push("w", 1, Role::Body, var.clone());
        let mut opt = Adam::new(0.1, [0.9, 0.999], 1e-8, 0.5, true);
        let loss = var.as_tensor().sum_all().unwrap();
        opt.step(&ps, &loss.backward().unwrap()).unwrap();
        let got = var.to_vec1::<f32>().unwrap()[0];
        assert!((got - (0.95 - 0.1)).abs() < 1e-6, "{got}");
    }
}
