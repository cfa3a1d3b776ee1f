//! SI — Synaptic Intelligence (Zenke, Poole & Ganguli, "Continual Learning Through Synaptic
//! Intelligence", ICML 2017).
//!
//! Every step:      `ωᵢ ← ωᵢ − gᵢ·Δθᵢ`  (the path integral of the task loss; for plain SGD `lr·gᵢ² ≥ 0`)
//! At task end:     `Ωᵢ ← Ωᵢ + max(0, ωᵢ / ((θᵢ(end) − θᵢ(start))² + ξ))`,  `θ* ← θ(end)`,  `ω ← 0`
//! Loss:            `L(θ) = CE_t(θ) + c·Σᵢ Ωᵢ (θᵢ − θ*ᵢ)²`
//!
//! **½ convention:** none — `c·Σ Ω(θ − θ*)²`, as the paper's eq. 4 and Mammoth (Avalanche uses
//! `(λ/2)·Σ`).
//!
//! `g` is the gradient of the **task loss without the penalty** (the paper's and Mammoth's
//! choice). The penalty's gradient is analytic, `2cΩ(θ − θ*)`, so `edit_gradients` recovers
//! `g = ∇L − 2cΩ(θ − θ*)` from the full gradient the optimizer receives, without a second backward
//! pass (the subtraction is exact up to f32 rounding of the sum). `Δθ` is the *actual* change the
//! optimizer made in that step — `θ` copied before the step in `edit_gradients`, compared after it
//! in `after_step` — so the path integral is right for momentum and Adam too, where `−g·Δθ` is not
//! `lr·g²`. Even with plain SGD `−gᵢ·Δθᵢ = lr·gᵢ(gᵢ + pᵢ)` is negative where the penalty's
//! gradient `pᵢ` outweighs and opposes the task's, so a task's increment can be negative
//! element-wise. The paper and Mammoth add it unclamped; we clamp each task's increment at 0,
//! because a negative `Ωᵢ` makes the penalty unbounded below in `θᵢ`: measured on split FMNIST
//! task-IL (c = 10, seed 0), the loss fell to −3·10⁸ within task 4 while the parameters with
//! negative importance ran away — and without gradient clipping the same runaway is the "SI
//! diverges" failure of permuted class-IL. Clamping keeps the penalty convex; parameters whose
//! path integral is negative simply get no protection from that task.
//!
//! `θ(start)` is copied at each task's start, `Δ` is taken before the anchor moves, `Ω`
//! accumulates over tasks and `ω` restarts at every task. With `c: 0` nothing is tracked and
//! training is bit-identical to `naive`.

use candle_core::{backprop::GradStore, Tensor};
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::model::{Model, ModelOutput};
use sequel_core::{Algorithm, AlgorithmConfig, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::ewc::scalar;
use crate::penalty::{PerParam, QuadraticPenalty};

/// YAML keys of `algorithm: { name: si, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiConfig {
    /// Penalty strength c in `c·Σ Ω(θ − θ*)²` (no ½). Default 1.0 (SequeL's `si_lambda`).
    pub c: f64,
    /// Damping ξ of `ω / (Δ² + ξ)`, > 0. Default 0.1 (SequeL; continual-learning-baselines' `eps`).
    pub xi: f64,
}

impl Default for SiConfig {
    fn default() -> Self {
        Self { c: 1.0, xi: 0.1 }
    }
}

impl AlgorithmConfig for SiConfig {
    const NAME: &'static str = "si";
    const SUMMARY: &'static str =
        "Synaptic Intelligence: path-integral importance (Zenke et al. 2017)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Si::new(self)?))
    }
}

pub struct Si {
    c: f64,
    xi: f64,
    /// θ at the start of the current task.
    start: Option<PerParam>,
    /// ω, the current task's path integral.
    omega: Option<PerParam>,
    /// Ω, accumulated over tasks.
    importance: Option<PerParam>,
    /// θ and the task-loss gradient of the step in progress (between `edit_gradients` and
    /// `after_step`).
    pending: Option<(PerParam, Vec<Tensor>)>,
    penalty: QuadraticPenalty,
}

impl Si {
    pub fn new(cfg: SiConfig) -> Result<Self> {
        check::non_negative("c", cfg.c)?;
        check::positive("xi", cfg.xi)?;
        Ok(Self {
            c: cfg.c,
            xi: cfg.xi,
            start: None,
            omega: None,
            importance: None,
            pending: None,
            penalty: QuadraticPenalty::default(),
        })
    }

    /// Ω after the most recent task.
    pub fn importance(&self) -> Option<&PerParam> {
        self.importance.as_ref()
    }

    /// ω of the task in progress.
    pub fn path_integral(&self) -> Option<&PerParam> {
        self.omega.as_ref()
    }

    /// `Σᵢ Ωᵢ(θᵢ − θ*ᵢ)²` at the current weights (without c), if a task has ended.
    pub fn penalty(&self, model: &dyn Model) -> Result<Option<f64>> {
        scalar(self.penalty.value(model.params())?)
    }
}

impl Algorithm for Si {
    /// At a task boundary SI holds Ω and the penalty; θ_start and ω are rebuilt by `before_task`.
    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.scope("penalty", |io| self.penalty.state(io))?;
        io.field("accumulator", &mut self.importance)
    }

    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.c == 0.0 {
            return Ok(());
        }
        let params = ctx.model.params();
        self.start = Some(PerParam::values(params)?);
        self.omega = Some(PerParam::zeros(params)?);
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let ce = ctx.ce(batch)?;
        match self.penalty.value(ctx.model.params())? {
            Some(r) if self.c > 0.0 => Ok((ce + (r * self.c)?)?),
            _ => Ok(ce),
        }
    }

    fn edit_gradients(&mut self, grads: &mut GradStore, ctx: &mut StepCtx) -> Result<()> {
        if self.c == 0.0 {
            return Ok(());
        }
        let params = ctx.model.params();
        let g_task = self.penalty.task_gradient(grads, params, self.c)?;
        self.pending = Some((PerParam::values(params)?, g_task));
        Ok(())
    }

    fn after_step(&mut self, _batch: &Batch, _out: &ModelOutput, ctx: &mut StepCtx) -> Result<()> {
        let (Some((before, g)), Some(omega)) = (self.pending.take(), self.omega.as_mut()) else {
            return Ok(());
        };
        for ((w, p), (b, g)) in omega
            .0
            .iter_mut()
            .zip(ctx.model.params().trainable())
            .zip(before.0.iter().zip(&g))
        {
            let delta = (p.var.as_tensor().detach() - b)?;
            *w = (&*w - (g * delta)?)?;
        }
        Ok(())
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        let (Some(start), Some(omega)) = (self.start.take(), self.omega.take()) else {
            return Ok(());
        };
        let end = PerParam::values(ctx.model.params())?;
        let mut add = Vec::with_capacity(end.0.len());
        for ((w, s), e) in omega.0.iter().zip(&start.0).zip(&end.0) {
            let d2 = (e - s)?.sqr()?;
            add.push((w / (d2 + self.xi)?)?.relu()?);
        }
        let add = PerParam(add);
        let importance = match &self.importance {
            Some(old) => old.axpby(1.0, &add, 1.0)?,
            None => add,
        };
        tracing::info!(
            task = ctx.task + 1,
            omega_sum = importance.sum()?,
            omega_max = importance.max()?,
            "SI importance updated"
        );
        self.penalty.replace(importance.clone(), end);
        self.importance = Some(importance);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mini_trainer, observe_run, observed, Observer};

    /// Runs SI and, at every task end, recomputes the expected increment ω/(Δ² + ξ) from SI's
    /// own ω and θ(start) and the model's weights, then records Ω before and after.
    struct Recorder {
        /// (Ω before, expected increment, Ω after) per task.
        history: Vec<(Option<PerParam>, PerParam, PerParam)>,
    }

    impl Observer<Si> for Recorder {
        fn after_task(&mut self, si: &mut Si, ctx: &mut TaskCtx) -> Result<()> {
            let before = si.importance().cloned();
            let omega = si.path_integral().unwrap().clone();
            let start = si.start.clone().unwrap();
            let end = PerParam::values(ctx.model.params())?;
            let mut inc = Vec::new();
            for ((w, s), e) in omega.0.iter().zip(&start.0).zip(&end.0) {
                let shape = w.shape().clone();
                let w: Vec<f32> = w.flatten_all()?.to_vec1()?;
                let s: Vec<f32> = s.flatten_all()?.to_vec1()?;
                let e: Vec<f32> = e.flatten_all()?.to_vec1()?;
                let v: Vec<f32> = (0..w.len())
                    .map(|j| (w[j] / ((e[j] - s[j]).powi(2) + 0.1)).max(0.0))
                    .collect();
                inc.push(Tensor::new(v, &candle_core::Device::Cpu)?.reshape(shape)?);
            }
            si.after_task(ctx)?;
            let after = si.importance().unwrap().clone();
            self.history.push((before, PerParam(inc), after));
            Ok(())
        }
    }

    #[test]
    fn negative_path_integrals_never_make_a_negative_importance() {
        // With momentum, or where the penalty's gradient opposes the task's, ω can be negative
        // element-wise; the importance that weighs the penalty must not be.
        let t = mini_trainer(Box::new(crate::naive::Naive), &[]);
        let mut si = Si::new(SiConfig { c: 1.0, xi: 0.1 }).unwrap();
        let mut rng = sequel_core::rng::SeededRng::new(0, sequel_core::rng::Stream::Algorithm);
        let mut ctx = TaskCtx {
            task: 0,
            stream: &t.stream,
            model: t.model.as_ref(),
            device: &candle_core::Device::Cpu,
            rng: &mut rng,
            interrupt: None,
        };
        si.before_task(&mut ctx).unwrap();
        // ω alternating −1, +1 over every weight.
        let omega = si.omega.as_ref().unwrap();
        let signed: Vec<Tensor> = omega
            .0
            .iter()
            .map(|w| {
                let n = w.elem_count();
                let v: Vec<f32> = (0..n)
                    .map(|i| if i % 2 == 0 { -1.0 } else { 1.0 })
                    .collect();
                Tensor::from_vec(v, w.shape(), w.device()).unwrap()
            })
            .collect();
        si.omega = Some(PerParam(signed));
        si.after_task(&mut ctx).unwrap();
        let omega_big = si.importance().unwrap().flat().unwrap();
        let min = omega_big.iter().copied().fold(f32::INFINITY, f32::min);
        assert_eq!(min, 0.0, "negative entries are clamped to 0");
        // Positive entries: 1 / (Δ² + ξ) with Δ = 0 (no training happened) = 10.
        let max = omega_big.iter().copied().fold(0.0f32, f32::max);
        assert!((max - 10.0).abs() < 1e-4, "{max}");
        // Exactly the entries with negative ω (even positions of each tensor) are zero.
        let negatives: usize = t
            .model
            .params()
            .trainable()
            .map(|p| p.var.elem_count().div_ceil(2))
            .sum();
        let zeros = omega_big.iter().filter(|&&v| v == 0.0).count();
        assert_eq!(zeros, negatives);
    }

    #[test]
    fn importances_are_non_zero_non_negative_in_sum_and_accumulate_across_tasks() {
        let recorder = Recorder {
            history: Vec::new(),
        };
        let (t, _) = observe_run(
            Si::new(SiConfig::default()).unwrap(),
            recorder,
            &["benchmark.tasks=3", "benchmark.train_subset=30"],
        );
        let rec = &observed::<Si, Recorder>(&t).observer;
        assert_eq!(rec.history.len(), 3);
        for (task, (before, inc, after)) in rec.history.iter().enumerate() {
            let inc_sum = inc.sum().unwrap();
            assert!(
                inc_sum > 0.0,
                "task {}: ω/(Δ²+ξ) sums to {inc_sum}",
                task + 1
            );
            let nonzero = inc.flat().unwrap().iter().filter(|v| **v != 0.0).count();
            assert!(nonzero > 0, "task {}", task + 1);
            // Ω(after) = Ω(before) + increment, element by element: accumulated, not replaced.
            let want = match before {
                Some(b) => b.axpby(1.0, inc, 1.0).unwrap(),
                None => inc.clone(),
            };
            for (a, w) in after.flat().unwrap().iter().zip(want.flat().unwrap()) {
                assert!((a - w).abs() <= 1e-6 * w.abs().max(1.0), "{a} vs {w}");
            }
            assert!(after.sum().unwrap() > 0.0);
            // Element-wise non-negative: a negative Ωᵢ would make the penalty unbounded below.
            let min = after
                .flat()
                .unwrap()
                .into_iter()
                .fold(f32::INFINITY, f32::min);
            assert!(min >= 0.0, "task {}: Ω has an entry {min}", task + 1);
            if let Some(b) = before {
                assert!(after.sum().unwrap() > b.sum().unwrap());
            }
        }
    }

    #[test]
    fn task_gradient_excludes_the_penalty() {
        // After task 1, at a step of task 2: the stored g must equal the gradient of the
        // cross-entropy alone, although the optimizer received CE + penalty.
        struct Check {
            batch: Option<Batch>,
            checked: usize,
        }
        impl Observer<Si> for Check {
            fn loss(&mut self, si: &mut Si, b: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
                self.batch = Some(b.clone());
                si.loss(b, ctx)
            }
            fn edit_gradients(
                &mut self,
                si: &mut Si,
                g: &mut GradStore,
                ctx: &mut StepCtx,
            ) -> Result<()> {
                si.edit_gradients(g, ctx)?;
                if ctx.task == 1 && ctx.step == 2 {
                    let penalty = si.penalty(ctx.model)?.unwrap();
                    assert!(penalty > 0.0);
                    // Recompute the CE gradient on the same batch (no dropout in this model).
                    let (_, g_task) = si.pending.as_ref().unwrap();
                    let batch = self.batch.take().unwrap();
                    let out = ctx.model.forward(&batch.x, true)?;
                    let ce = ctx.task_loss(&out.logits, &batch)?.backward()?;
                    for (p, gt) in ctx.model.params().trainable().zip(g_task) {
                        let want = ce.get(p.var.as_tensor()).unwrap();
                        let d = (gt - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                        let m = want.abs()?.max_all()?.to_scalar::<f32>()?;
                        assert!(d <= 1e-5 * m.max(1e-3), "{}: {d} vs max {m}", p.name);
                    }
                    self.checked += 1;
                }
                Ok(())
            }
        }
        let check = Check {
            batch: None,
            checked: 0,
        };
        let si = Si::new(SiConfig { c: 50.0, xi: 0.1 }).unwrap();
        let (t, _) = observe_run(si, check, &["benchmark.tasks=2"]);
        assert_eq!(observed::<Si, Check>(&t).observer.checked, 1);
    }
}
