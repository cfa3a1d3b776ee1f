//! RWalk — Riemannian Walk (Chaudhry, Dokania, Ajanthan & Torr, "Riemannian Walk for Incremental
//! Learning: Understanding Forgetting and Intransigence", ECCV 2018).
//!
//! EWC++ (an online Fisher) plus an SI-like path score measured in the Fisher's metric. With `g`
//! the gradient of the task loss **without the penalty** (recovered as in [`crate::si`]) and
//! `Δθ` the change the optimizer actually made, training on task t:
//!
//! every step:          `ωᵢ ← ωᵢ − gᵢ·Δθᵢ`,  `Gᵢ ← Gᵢ + gᵢ²`
//! every Δt steps:      `Fᵢ ← α·Gᵢ/Δt + (1 − α)·Fᵢ`  (eq. 6, the empirical Fisher's moving average)
//!                      `sᵢ ← sᵢ + max(0, ωᵢ / (½·Fᵢ·(θᵢ − θᵢ(t₀))² + ε))`  (eq. 7, `θ(t₀)` the window's start)
//!                      `ω ← 0`, `G ← 0`, `θ(t₀) ← θ`
//! at task end:         `ŝ = s / max s`,  `S ← ŝ` (task 1) or `S ← ½(S + ŝ)`,  `F̂ = F / max F`,  `θ* ← θ`
//! loss:                `L(θ) = CE_t(θ) + λ·Σᵢ (F̂ᵢ + Sᵢ)(θᵢ − θ*ᵢ)²`  (eq. 8, no ½)
//!
//! **Normalisation.** Fisher and scores live on different scales, so both enter the penalty
//! normalised to `[0, 1]` by their largest element over the whole model (both are ≥ 0, so this is
//! the authors' min-max scaling up to the minimum, which is 0 or close to it). Each task's score is
//! normalised before it is averaged with the previous ones — the paper's `½(S + ŝ)` "to reduce the
//! rigidity" after each task, on commensurate terms (Avalanche averages the raw scores and
//! normalises the average instead). A task whose scores are all 0 contributes `ŝ = 0`.
//!
//! **Details.** `F` is never reset: it runs across tasks (EWC++); its first update is the first
//! window's mean `G/Δt` itself, not a blend with 0. A window's score uses `F` after that window's
//! update. A task's last, incomplete window (fewer than Δt steps) is closed at task end with its
//! own step count, so no step's path is dropped and nothing but `F`, `S` and the penalty crosses a
//! task boundary (the window restarts with the task). Negative window scores are clamped at 0
//! (the paper's "negative scores are set to zero"). `g` is the minibatch gradient after clipping,
//! as SI's. With `lambda: 0` nothing is tracked and training is bit-identical to `naive`.
//!
//! Defaults: α = 0.9 and Δt = 10 (the paper's MNIST values, supplementary B.3), ε = 10⁻³ (the
//! authors' code), λ = 0.1 (Avalanche's default and split-MNIST baseline).

use candle_core::{backprop::GradStore, Tensor};
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::model::{Model, ModelOutput, ParamSet};
use sequel_core::{Algorithm, AlgorithmConfig, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::ewc::scalar;
use crate::penalty::{PerParam, QuadraticPenalty};

/// YAML keys of `algorithm: { name: rwalk, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RwalkConfig {
    /// Penalty strength λ in `λ·Σ (F̂ + S)(θ − θ*)²` (no ½). Default 0.1.
    pub lambda: f64,
    /// α, weight of the new squared gradients in the Fisher's moving average, in [0, 1]. Default 0.9.
    pub alpha: f64,
    /// Δt, steps between Fisher and score updates. Default 10.
    pub delta_t: usize,
    /// ε of the score's denominator, > 0. Default 1e-3.
    pub epsilon: f64,
}

impl Default for RwalkConfig {
    fn default() -> Self {
        Self {
            lambda: 0.1,
            alpha: 0.9,
            delta_t: 10,
            epsilon: 1e-3,
        }
    }
}

impl AlgorithmConfig for RwalkConfig {
    const NAME: &'static str = "rwalk";
    const SUMMARY: &'static str =
        "RWalk: online Fisher + Fisher-metric path score, normalised (Chaudhry et al. 2018)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Rwalk::new(self)?))
    }
}

/// The Δt-step window in progress.
struct Window {
    steps: usize,
    /// θ(t₀), the weights when the window opened.
    start: PerParam,
    /// ω, `Σ −g·Δθ` over the window.
    omega: PerParam,
    /// G, `Σ g²` over the window.
    squares: PerParam,
}

impl Window {
    fn open(params: &ParamSet) -> Result<Self> {
        Ok(Self {
            steps: 0,
            start: PerParam::values(params)?,
            omega: PerParam::zeros(params)?,
            squares: PerParam::zeros(params)?,
        })
    }
}

pub struct Rwalk {
    lambda: f64,
    alpha: f64,
    delta_t: usize,
    epsilon: f64,
    /// F, the running empirical Fisher.
    fisher: Option<PerParam>,
    /// S, the averaged normalised scores of the past tasks.
    score: Option<PerParam>,
    /// s, the current task's score.
    task_score: Option<PerParam>,
    window: Option<Window>,
    /// θ before the step in progress and its task-loss gradient.
    pending: Option<(PerParam, Vec<Tensor>)>,
    penalty: QuadraticPenalty,
}

/// `p / max p`, or zeros where the largest element is not positive.
fn normalised(p: &PerParam) -> Result<PerParam> {
    let m = p.max()?;
    let k = if m > 0.0 { 1.0 / m } else { 0.0 };
    Ok(PerParam(
        p.0.iter()
            .map(|t| t * k)
            .collect::<candle_core::Result<_>>()?,
    ))
}

impl Rwalk {
    pub fn new(cfg: RwalkConfig) -> Result<Self> {
        check::non_negative("lambda", cfg.lambda)?;
        check::unit_interval("alpha", cfg.alpha)?;
        check::at_least_one("delta_t", cfg.delta_t)?;
        check::positive("epsilon", cfg.epsilon)?;
        Ok(Self {
            lambda: cfg.lambda,
            alpha: cfg.alpha,
            delta_t: cfg.delta_t,
            epsilon: cfg.epsilon,
            fisher: None,
            score: None,
            task_score: None,
            window: None,
            pending: None,
            penalty: QuadraticPenalty::default(),
        })
    }

    /// F, the running Fisher (unnormalised).
    pub fn fisher(&self) -> Option<&PerParam> {
        self.fisher.as_ref()
    }

    /// S after the most recent task, in [0, 1].
    pub fn score(&self) -> Option<&PerParam> {
        self.score.as_ref()
    }

    /// `Σᵢ (F̂ᵢ + Sᵢ)(θᵢ − θ*ᵢ)²` at the current weights (without λ), if a task has ended.
    pub fn penalty(&self, model: &dyn Model) -> Result<Option<f64>> {
        scalar(self.penalty.value(model.params())?)
    }

    /// Fold the window into F and s, and open the next one at the current weights.
    fn close_window(&mut self, params: &ParamSet) -> Result<()> {
        let Some(w) = self.window.take() else {
            return Ok(());
        };
        if w.steps > 0 {
            let mean = PerParam(
                w.squares
                    .0
                    .iter()
                    .map(|g| g / w.steps as f64)
                    .collect::<candle_core::Result<_>>()?,
            );
            let f = match &self.fisher {
                Some(old) => mean.axpby(self.alpha, old, 1.0 - self.alpha)?,
                None => mean,
            };
            let now = PerParam::values(params)?;
            let mut add = Vec::with_capacity(f.0.len());
            for ((om, fi), (a, b)) in w.omega.0.iter().zip(&f.0).zip(now.0.iter().zip(&w.start.0)) {
                let walk = ((fi * (a - b)?.sqr()?)? * 0.5)?;
                add.push((om / (walk + self.epsilon)?)?.relu()?);
            }
            let add = PerParam(add);
            self.task_score = Some(match &self.task_score {
                Some(s) => s.axpby(1.0, &add, 1.0)?,
                None => add,
            });
            self.fisher = Some(f);
        }
        self.window = Some(Window::open(params)?);
        Ok(())
    }
}

impl Algorithm for Rwalk {
    /// F, S and the penalty cross task boundaries; the window and the task's score restart.
    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.scope("penalty", |io| self.penalty.state(io))?;
        io.field("fisher", &mut self.fisher)?;
        io.field("score", &mut self.score)
    }

    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.lambda == 0.0 {
            return Ok(());
        }
        self.window = Some(Window::open(ctx.model.params())?);
        self.task_score = None;
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let ce = ctx.ce(batch)?;
        match self.penalty.value(ctx.model.params())? {
            Some(r) if self.lambda > 0.0 => Ok((ce + (r * self.lambda)?)?),
            _ => Ok(ce),
        }
    }

    fn edit_gradients(&mut self, grads: &mut GradStore, ctx: &mut StepCtx) -> Result<()> {
        if self.lambda == 0.0 {
            return Ok(());
        }
        let params = ctx.model.params();
        let g_task = self.penalty.task_gradient(grads, params, self.lambda)?;
        self.pending = Some((PerParam::values(params)?, g_task));
        Ok(())
    }

    fn after_step(&mut self, _batch: &Batch, _out: &ModelOutput, ctx: &mut StepCtx) -> Result<()> {
        let (Some((before, g)), Some(w)) = (self.pending.take(), self.window.as_mut()) else {
            return Ok(());
        };
        let params = ctx.model.params();
        for (((om, sq), p), (b, g)) in w
            .omega
            .0
            .iter_mut()
            .zip(w.squares.0.iter_mut())
            .zip(params.trainable())
            .zip(before.0.iter().zip(&g))
        {
            let delta = (p.var.as_tensor().detach() - b)?;
            *om = (&*om - (g * delta)?)?;
            *sq = (&*sq + g.sqr()?)?;
        }
        w.steps += 1;
        if w.steps == self.delta_t {
            self.close_window(params)?;
        }
        Ok(())
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if self.lambda == 0.0 {
            return Ok(());
        }
        let params = ctx.model.params();
        self.close_window(params)?;
        self.window = None;
        let (Some(s), Some(f)) = (self.task_score.take(), self.fisher.as_ref()) else {
            return Ok(());
        };
        let s = normalised(&s)?;
        let score = match &self.score {
            Some(old) => old.axpby(0.5, &s, 0.5)?,
            None => s,
        };
        let weight = normalised(f)?.axpby(1.0, &score, 1.0)?;
        tracing::info!(
            task = ctx.task + 1,
            fisher_max = f.max()?,
            score_sum = score.sum()?,
            "RWalk importance updated"
        );
        self.penalty.replace(weight, PerParam::values(params)?);
        self.score = Some(score);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mini_run, observe_run, observed, probe_run, probed, Observer};

    fn rwalk(lambda: f64, delta_t: usize) -> Rwalk {
        Rwalk::new(RwalkConfig {
            lambda,
            delta_t,
            ..RwalkConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn lambda_zero_is_naive_bit_for_bit_and_lambda_positive_is_not() {
        let over = ["benchmark.tasks=3"];
        let naive = mini_run(Box::new(crate::naive::Naive), &over);
        assert_eq!(mini_run(Box::new(rwalk(0.0, 10)), &over), naive);
        assert_ne!(mini_run(Box::new(rwalk(10.0, 10)), &over), naive);
    }

    /// One task's record: (S before, host ŝ, S after, F, host F).
    type TaskRecord = (Option<Vec<f32>>, Vec<f64>, Vec<f32>, Vec<f32>, Vec<f64>);

    /// RWalk plus a host-side (f64) replay of its bookkeeping from each step's task gradient and
    /// weights: the windows, the Fisher's moving average and the task's score.
    struct Recorder {
        /// The current task's steps: (g, θ before, θ after), flattened.
        steps: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)>,
        fisher: Option<Vec<f64>>,
        history: Vec<TaskRecord>,
    }

    fn flat(ts: &[Tensor]) -> Vec<f64> {
        ts.iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(f64::from)
            .collect()
    }

    impl Recorder {
        /// The host's ŝ of the task from the recorded steps, updating the host Fisher.
        fn host_task_score(&mut self, dt: usize, alpha: f64, eps: f64) -> Vec<f64> {
            let n = self.steps[0].0.len();
            let mut s = vec![0.0; n];
            for window in self.steps.chunks(dt) {
                let mut g2 = vec![0.0; n];
                let mut omega = vec![0.0; n];
                for (g, b, a) in window {
                    for i in 0..n {
                        g2[i] += g[i] * g[i];
                        omega[i] -= g[i] * (a[i] - b[i]);
                    }
                }
                let mean: Vec<f64> = g2.iter().map(|v| v / window.len() as f64).collect();
                let f: Vec<f64> = match &self.fisher {
                    Some(old) => (0..n)
                        .map(|i| alpha * mean[i] + (1.0 - alpha) * old[i])
                        .collect(),
                    None => mean,
                };
                let (start, end) = (&window[0].1, &window.last().unwrap().2);
                for i in 0..n {
                    let walk = 0.5 * f[i] * (end[i] - start[i]).powi(2);
                    s[i] += (omega[i] / (walk + eps)).max(0.0);
                }
                self.fisher = Some(f);
            }
            let m = s.iter().copied().fold(0.0, f64::max);
            s.iter()
                .map(|v| if m > 0.0 { v / m } else { 0.0 })
                .collect()
        }
    }

    impl Observer<Rwalk> for Recorder {
        fn before_task(&mut self, rw: &mut Rwalk, ctx: &mut TaskCtx) -> Result<()> {
            self.steps.clear();
            rw.before_task(ctx)
        }
        fn after_step(
            &mut self,
            rw: &mut Rwalk,
            b: &Batch,
            o: &ModelOutput,
            ctx: &mut StepCtx,
        ) -> Result<()> {
            let (before, g) = rw.pending.as_ref().unwrap();
            let after = PerParam::values(ctx.model.params())?;
            self.steps.push((flat(g), flat(&before.0), flat(&after.0)));
            rw.after_step(b, o, ctx)
        }
        fn after_task(&mut self, rw: &mut Rwalk, ctx: &mut TaskCtx) -> Result<()> {
            let before = rw.score().map(|s| s.flat().unwrap());
            let host = self.host_task_score(rw.delta_t, rw.alpha, rw.epsilon);
            rw.after_task(ctx)?;
            let after = rw.score().unwrap().flat()?;
            let fisher = rw.fisher().unwrap().flat()?;
            let host_f = self.fisher.clone().unwrap();
            self.history.push((before, host, after, fisher, host_f));
            Ok(())
        }
    }

    #[test]
    fn scores_and_fisher_follow_the_update_rule_are_non_negative_and_normalised() {
        // Δt = 3 with 5 steps per task: one full window and a partial one per task.
        let rec = Recorder {
            steps: Vec::new(),
            fisher: None,
            history: Vec::new(),
        };
        let (t, _) = observe_run(rwalk(1.0, 3), rec, &["benchmark.tasks=3"]);
        let rec = &observed::<Rwalk, Recorder>(&t).observer;
        assert_eq!(rec.history.len(), 3);
        for (task, (before, host, after, fisher, host_f)) in rec.history.iter().enumerate() {
            // The running Fisher matches the host's moving average.
            let fmax = host_f.iter().copied().fold(0.0, f64::max);
            assert!(fmax > 0.0);
            for (a, b) in fisher.iter().zip(host_f) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * fmax,
                    "task {task}: F {a} vs {b}"
                );
            }
            // S ∈ [0, 1]; ŝ = S (task 1) or 2S − S_before, and it is the host's normalised score.
            assert!(
                after.iter().all(|&v| (0.0..=1.0 + 1e-6).contains(&v)),
                "task {task}"
            );
            let got: Vec<f64> = match before {
                None => after.iter().map(|&v| v as f64).collect(),
                Some(b) => after
                    .iter()
                    .zip(b)
                    .map(|(a, b)| 2.0 * *a as f64 - *b as f64)
                    .collect(),
            };
            assert!((host.iter().copied().fold(0.0, f64::max) - 1.0).abs() < 1e-9);
            for (g, h) in got.iter().zip(host) {
                assert!((g - h).abs() < 2e-3, "task {task}: ŝ {g} vs {h}");
            }
        }
    }

    #[test]
    fn the_penalty_weight_is_the_normalised_fisher_plus_the_score() {
        let (t, _) = probe_run(rwalk(1.0, 10), &["benchmark.tasks=2"]);
        let rw = &probed::<Rwalk>(&t).algo;
        let f = normalised(rw.fisher().unwrap()).unwrap();
        let weight = f.axpby(1.0, rw.score().unwrap(), 1.0).unwrap();
        let w = weight.flat().unwrap();
        assert!(w.iter().all(|&v| (0.0..=2.0 + 1e-6).contains(&v)));
        assert!((f.max().unwrap() - 1.0).abs() < 1e-6);
        let at_anchor = rw.penalty(t.model.as_ref()).unwrap().unwrap();
        assert!(at_anchor.abs() < 1e-9, "{at_anchor}");
        // Moving every weight by 0.01 from the anchor costs Σ (F̂ + S)·10⁻⁴.
        for p in t.model.params().trainable() {
            p.var.set(&(p.var.as_tensor() + 0.01).unwrap()).unwrap();
        }
        let moved = rw.penalty(t.model.as_ref()).unwrap().unwrap();
        let want: f64 = w.iter().map(|&v| v as f64 * 1e-4).sum();
        assert!((moved - want).abs() < 1e-3 * want, "{moved} vs {want}");
    }
}
