//! Lookahead (Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
//! NeurIPS 2019): the fast weights θ take `k` steps of any inner optimizer, then
//!
//! ```text
//! φ ← φ + α(θ − φ)        (computed as (1 − α)·φ + α·θ, so α = 1 gives φ = θ exactly)
//! θ ← φ
//! ```
//!
//! The inner optimizer's state (momentum buffers, Adam moments) is left untouched at a sync, as
//! in the paper's code. φ starts as a copy of θ at the first step after construction or
//! [`Optimizer::reset`]; so with `optimizer.reset_each_task: true` the slow weights restart from
//! the current weights at every task, and with `false` they and the step count carry across
//! tasks. Only trainable parameters (not normalisation statistics) have slow weights.
//!
//! The EMA modes ([`SlowMode`]) move φ after every inner step instead, φ ← φ + α(θ − φ), and
//! either never touch θ (`ema`: an exponential moving average of the weights, the temporal
//! ensemble of Soutif-Cormerais et al., CoLLAs 2023, when it is evaluated) or reset θ ← φ every
//! `k` steps (`ema-reset`: Hare & Tortoise, Lee et al., ICML 2024). Their φ is not reset with
//! the optimizer at a task boundary.

use candle_core::{backprop::GradStore, Tensor};

use super::kernels::{axpby, state_buffer};
use super::{load_slots, save_slots, Optimizer};
use crate::config::SlowMode;
use crate::error::Result;
use crate::model::ParamSet;
use crate::state::{put_prefixed, take_prefixed, StateDict};

pub struct Lookahead {
    inner: Box<dyn Optimizer>,
    mode: SlowMode,
    k: usize,
    alpha: f32,
    /// Inner steps taken since the slow weights were set.
    steps: u64,
    /// φ, one per trainable parameter; empty until the first step after a reset.
    slow: Vec<Tensor>,
}

impl Lookahead {
    pub fn new(inner: Box<dyn Optimizer>, k: usize, alpha: f32) -> Self {
        Self {
            inner,
            mode: SlowMode::Lookahead,
            k,
            alpha,
            steps: 0,
            slow: Vec::new(),
        }
    }

    /// The same wrapper with φ following θ by `mode`.
    pub fn with_mode(mut self, mode: SlowMode) -> Self {
        self.mode = mode;
        self
    }
}

impl Optimizer for Lookahead {
    fn step(&mut self, params: &ParamSet, grads: &GradStore) -> Result<()> {
        if self.slow.len() != params.trainable().count() {
            self.slow = params
                .trainable()
                .map(|p| state_buffer(p.var.as_tensor()))
                .collect::<Result<_>>()?;
            self.steps = 0;
        }
        self.inner.step(params, grads)?;
        self.steps += 1;
        let period = self.steps % self.k as u64 == 0;
        let (average, reset) = match self.mode {
            SlowMode::Lookahead => (period, period),
            SlowMode::Ema => (true, false),
            SlowMode::EmaReset => (true, period),
        };
        for (p, phi) in params.trainable().zip(&self.slow) {
            if average {
                axpby(phi, 1.0 - self.alpha, self.alpha, p.var.as_tensor())?;
            }
            if reset {
                p.var.set(phi)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f32 {
        self.inner.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f32) {
        self.inner.set_learning_rate(lr);
    }

    /// The inner optimizer's state always; Lookahead's slow weights too, so each task is its own
    /// Lookahead run. The EMA modes keep φ and the step count: their average spans the whole
    /// stream, as in the temporal-ensemble and Hare & Tortoise papers.
    fn reset(&mut self) {
        self.inner.reset();
        if self.mode == SlowMode::Lookahead {
            self.slow.clear();
            self.steps = 0;
        }
    }

    fn slow_weights(&self) -> Option<&[Tensor]> {
        (!self.slow.is_empty()).then_some(self.slow.as_slice())
    }

    fn save_state(&self) -> Result<StateDict> {
        let mut out = StateDict::new();
        put_prefixed(&mut out, "inner.", self.inner.save_state()?);
        let slots: Vec<Option<&Tensor>> = self.slow.iter().map(Some).collect();
        save_slots(&mut out, "slow", &slots)?;
        out.insert(
            "steps".into(),
            Tensor::new(&[self.steps as i64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    fn load_state(&mut self, state: &StateDict) -> Result<()> {
        self.inner.load_state(&take_prefixed(state, "inner."))?;
        self.slow = load_slots(state, "slow")?
            .into_iter()
            .collect::<Option<_>>()
            .ok_or_else(|| crate::error::Error::msg("Lookahead state: a slow weight is missing"))?;
        self.steps = match state.get("steps") {
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
    use crate::optim::Sgd;
    use candle_core::{Device, Var};

    fn one_param(init: &[f32]) -> (Var, ParamSet) {
        let var = Var::new(init, &Device::Cpu).unwrap();
        let mut ps = ParamSet::new();
        ps.push("w", 1, Role::Body, var.clone());
        (var, ps)
    }

    /// A gradient step on f(θ) = ½‖θ − c‖², whose gradient θ − c moves every coordinate differently.
    fn step(opt: &mut dyn Optimizer, var: &Var, ps: &ParamSet, c: &[f32]) {
        let c = Tensor::new(c, &Device::Cpu).unwrap();
        let loss = ((var.as_tensor() - c).unwrap().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step(ps, &loss.backward().unwrap()).unwrap();
    }

    /// The slow weights after every k steps equal φ + α(θ_k − φ) computed on the host from the
    /// recorded fast weights, where θ_k is plain SGD's step from the recorded θ_{k−1}; the fast
    /// weights are then set to φ.
    #[test]
    fn slow_weights_match_a_hand_computation_from_the_recorded_fast_weights() {
        let (k, alpha, lr) = (3usize, 0.3f32, 0.2f32);
        let target = [0.5f32, -1.0, 2.0];
        let (var, ps) = one_param(&[1.0, 2.0, -3.0]);
        let mut opt = Lookahead::new(Box::new(Sgd::new(lr, 0.0, false, 0.0)), k, alpha);
        let mut phi = var.to_vec1::<f32>().unwrap();
        let mut fast = phi.clone();
        for s in 1..=3 * k {
            step(&mut opt, &var, &ps, &target);
            // Plain SGD from the recorded fast weights: θ ← θ − lr(θ − c).
            let theta: Vec<f32> = fast
                .iter()
                .zip(&target)
                .map(|(t, c)| t - lr * (t - c))
                .collect();
            let got = var.to_vec1::<f32>().unwrap();
            let want = if s % k == 0 {
                phi = phi
                    .iter()
                    .zip(&theta)
                    .map(|(p, t)| p + alpha * (t - p))
                    .collect();
                let slow = opt.slow_weights().unwrap()[0].to_vec1::<f32>().unwrap();
                for (a, b) in slow.iter().zip(&phi) {
                    assert!((a - b).abs() < 1e-6, "step {s}: φ = {slow:?}, hand {phi:?}");
                }
                phi.clone()
            } else {
                theta
            };
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "step {s}: θ = {got:?}, hand {want:?}");
            }
            fast = got;
        }
    }

    /// `ema`: θ is the inner optimizer's trajectory bit for bit, and φ after every step equals
    /// the host's φ + α(θ − φ) from the recorded fast weights (φ starts as θ₀). `ema-reset`: the
    /// same φ, and every k-th step θ is set to it.
    #[test]
    fn ema_modes_match_a_hand_computation() {
        let (k, alpha) = (3usize, 0.2f32);
        let target = [0.5f32, -1.0, 2.0];
        for mode in [SlowMode::Ema, SlowMode::EmaReset] {
            let (var, ps) = one_param(&[1.0, 2.0, -3.0]);
            let (plain_var, plain_ps) = one_param(&[1.0, 2.0, -3.0]);
            let mut plain = Sgd::new(0.1, 0.9, false, 0.0);
            let inner = Box::new(Sgd::new(0.1, 0.9, false, 0.0));
            let mut opt = Lookahead::new(inner, k, alpha).with_mode(mode);
            let mut phi = var.to_vec1::<f32>().unwrap();
            for s in 1..=3 * k {
                step(&mut opt, &var, &ps, &target);
                step(&mut plain, &plain_var, &plain_ps, &target);
                let theta = plain_var.to_vec1::<f32>().unwrap();
                phi = phi
                    .iter()
                    .zip(&theta)
                    .map(|(p, t)| p + alpha * (t - p))
                    .collect();
                let slow = opt.slow_weights().unwrap()[0].to_vec1::<f32>().unwrap();
                for (a, b) in slow.iter().zip(&phi) {
                    assert!(
                        (a - b).abs() < 1e-6,
                        "{mode:?} step {s}: φ {slow:?} vs {phi:?}"
                    );
                }
                let got = var.to_vec1::<f32>().unwrap();
                if mode == SlowMode::EmaReset && s % k == 0 {
                    assert_eq!(got, slow, "{mode:?} step {s}: θ ← φ");
                    // The reset is the new starting point of the plain twin too.
                    plain_var.set(var.as_tensor()).unwrap();
                } else {
                    assert_eq!(got, theta, "{mode:?} step {s}: θ is the inner optimizer's");
                }
            }
        }
    }

    /// With α = 1 the sync sets φ = θ and θ = φ exactly: the trajectory is the inner optimizer's,
    /// bit for bit, and the inner state (momentum) is the same as without the wrapper.
    #[test]
    fn alpha_one_is_the_inner_optimizer_bit_for_bit() {
        let target = [0.3f32, -0.7, 1.9, 4.0];
        let (a, pa) = one_param(&[1.0, 2.0, -3.0, 0.1]);
        let (b, pb) = one_param(&[1.0, 2.0, -3.0, 0.1]);
        let mut plain = Sgd::new(0.1, 0.9, true, 0.01);
        let mut la = Lookahead::new(Box::new(Sgd::new(0.1, 0.9, true, 0.01)), 2, 1.0);
        for _ in 0..7 {
            step(&mut plain, &a, &pa, &target);
            step(&mut la, &b, &pb, &target);
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
        let m = |d: &StateDict| d["momentum.0"].to_vec1::<f32>().unwrap();
        let inner = take_prefixed(&la.save_state().unwrap(), "inner.");
        assert_eq!(m(&plain.save_state().unwrap()), m(&inner));
    }

    /// A reset forgets φ: the next step starts the slow weights from the current weights.
    /// Saved and loaded state continues bit-identically.
    #[test]
    fn reset_restarts_the_slow_weights_and_state_round_trips() {
        let target = [0.5f32, -1.0];
        let (var, ps) = one_param(&[1.0, 2.0]);
        let mut opt = Lookahead::new(Box::new(Sgd::new(0.1, 0.5, false, 0.0)), 4, 0.5);
        for _ in 0..6 {
            step(&mut opt, &var, &ps, &target);
        }
        let saved = opt.save_state().unwrap();
        let before = var.as_tensor().copy().unwrap();
        let mut again = Lookahead::new(Box::new(Sgd::new(0.1, 0.5, false, 0.0)), 4, 0.5);
        again.load_state(&saved).unwrap();
        let (twin, twin_ps) = one_param(&before.to_vec1::<f32>().unwrap());
        for _ in 0..5 {
            step(&mut opt, &var, &ps, &target);
            step(&mut again, &twin, &twin_ps, &target);
            assert_eq!(
                var.to_vec1::<f32>().unwrap(),
                twin.to_vec1::<f32>().unwrap()
            );
        }
        opt.reset();
        assert!(opt.slow_weights().is_none());
        let now = var.to_vec1::<f32>().unwrap();
        step(&mut opt, &var, &ps, &target);
        assert_eq!(
            opt.slow_weights().unwrap()[0].to_vec1::<f32>().unwrap(),
            now
        );
    }
}
