//! PaLoRA low-rank adapters (Dimitriadis, Frossard & Fleuret, "Pareto Low-Rank Adapters:
//! Efficient Multi-Task Learning with Preferences", ICLR 2025).
//!
//! A dense layer `y = x·Wᵀ + b` carries `T` adapters `Aₜ ∈ ℝ^{r×in}`, `Bₜ ∈ ℝ^{out×r}`; for a
//! preference `λ` over them
//!
//! ```text
//! y = x·Wᵀ + b + s·Σₜ λₜ (x·Aₜᵀ)·Bₜᵀ,   i.e.   W(λ) = W + s·Σₜ λₜ BₜAₜ,   s = lora_alpha / r.
//! ```
//!
//! `Aₜ` is Kaiming-uniform with `a = √5` (U(±1/√in)), `Bₜ = 0`, so a fresh adapter leaves the
//! layer as it was. In a stream the adapter of task `t` is `(Aₜ, Bₜ)`: the trainer selects
//! `λ = one-hot(t)` while training task `t` and, in task-IL, while evaluating task `t`; without
//! task identity at test time it evaluates the merge `λ` uniform over the tasks trained so far
//! ([`Adapters::merged`]).
//!
//! **Per-row selection.** One `λ` for a whole forward pass would send a replayed sample of task
//! `j`, forwarded together with the incoming batch of task `t`, through adapter `t`. In
//! *per-row* mode ([`Adapters::set_per_row`], which the trainer switches on in task-IL) a
//! forward pass whose rows' tasks are known ([`crate::model::forward_batch`], used by
//! [`crate::algorithm::StepCtx::forward`]) adds `s·(x·Aⱼᵀ)·Bⱼᵀ` to the rows of task `j` only,
//! for every task `j` present (a 0/1 row mask per adapter; a row whose task has no adapter gets
//! none): each row sees `λ = one-hot(its task)`, and only its own adapter gets its gradient. A
//! forward pass without row tasks (a plain `Model::forward`) uses the shared `λ`. Adapter tensors are ordinary model parameters (`fc<i>.lora_a.<t>`,
//! `fc<i>.lora_b.<t>`, at the depth of `fc<i>`, tagged [`crate::model::Param::adapter`]), so
//! optimizers, checkpoints and consolidation see them like any other tensor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use candle_core::{Device, Tensor, Var};

use super::init;
use super::params::{ParamSet, Role};
use crate::config::LoraConfig;
use crate::consolidation::TaskVector;
use crate::error::{Error, Result};
use crate::rng::{RngState, SeededRng};

/// The adapters of one layer: `a[t]` is `Aₜ` (`r × in`), `b[t]` is `Bₜ` (`out × r`).
#[derive(Debug, Clone)]
pub struct LayerAdapters {
    /// The name of the adapted weight `W` (`fc<i>.weight`).
    pub weight: String,
    pub a: Vec<Var>,
    pub b: Vec<Var>,
}

/// Every adapter of a model, the preference `λ` its forward passes use, and whether the
/// backbone is frozen. A model exposes it through [`crate::model::Model::adapters`].
#[derive(Debug)]
pub struct Adapters {
    config: LoraConfig,
    layers: Vec<LayerAdapters>,
    lambda: RwLock<Vec<f32>>,
    frozen: AtomicBool,
    /// Per-row mode: forwards given their rows' tasks use `one-hot(row task)` per row.
    per_row: AtomicBool,
    /// The task of each row of the forward pass under way ([`Adapters::with_rows`]).
    rows: RwLock<Option<Vec<u32>>>,
}

/// The stream the adapters' `A` are drawn from: a sub-stream of `init` (same seed, stream id
/// `id << 32 | 1`, as [`SeededRng::derived`] numbers them), started fresh, so adding adapters
/// shifts no draw of `init` itself: every other tensor has the values of the plain model.
pub fn adapter_stream(init: &SeededRng) -> SeededRng {
    let s = init.state();
    SeededRng::from(RngState {
        seed: s.seed,
        stream: (s.stream << 32) | 1,
        word_pos: 0,
    })
}

impl Adapters {
    /// No layers yet; `tasks` adapters per layer, `λ = one-hot(0)`.
    pub fn new(config: LoraConfig, tasks: usize) -> Self {
        let mut lambda = vec![0.0; tasks];
        if let Some(l) = lambda.first_mut() {
            *l = 1.0;
        }
        Self {
            config,
            layers: Vec::new(),
            lambda: RwLock::new(lambda),
            frozen: AtomicBool::new(false),
            per_row: AtomicBool::new(false),
            rows: RwLock::new(None),
        }
    }

    /// Create the `T` adapters of the layer whose weight is `W: out × in`, registered after the
    /// layer's own tensors as `<name>.lora_a.<t>` and `<name>.lora_b.<t>` at its depth. `A` is
    /// drawn from `rng` ([`adapter_stream`]).
    #[allow(clippy::too_many_arguments)]
    pub fn add_layer(
        &mut self,
        params: &mut ParamSet,
        name: &str,
        depth: usize,
        (fan_in, fan_out): (usize, usize),
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<usize> {
        let r = self.config.rank;
        let bound = 1.0 / (fan_in as f32).sqrt(); // Kaiming-uniform, a = √5
        let tasks = self.tasks();
        let (mut a, mut b) = (Vec::with_capacity(tasks), Vec::with_capacity(tasks));
        for t in 0..tasks {
            let at = init::uniform((r, fan_in), bound, rng, device)?;
            let bt = init::constant((fan_out, r), 0.0, device)?;
            params.push(format!("{name}.lora_a.{t}"), depth, Role::Body, at.clone());
            params.tag_last_as_adapter(1, t);
            params.push(format!("{name}.lora_b.{t}"), depth, Role::Body, bt.clone());
            params.tag_last_as_adapter(1, t);
            a.push(at);
            b.push(bt);
        }
        self.layers.push(LayerAdapters {
            weight: format!("{name}.weight"),
            a,
            b,
        });
        Ok(self.layers.len() - 1)
    }

    pub fn config(&self) -> LoraConfig {
        self.config
    }

    /// `T`, the adapters per layer.
    pub fn tasks(&self) -> usize {
        self.lambda.read().map_or(0, |l| l.len())
    }

    /// `s = lora_alpha / r`.
    pub fn scale(&self) -> f64 {
        f64::from(self.config.lora_alpha) / self.config.rank as f64
    }

    pub fn layers(&self) -> &[LayerAdapters] {
        &self.layers
    }

    /// The preference the next forward passes use.
    pub fn preference(&self) -> Vec<f32> {
        self.lambda.read().map(|l| l.clone()).unwrap_or_default()
    }

    /// Set `λ` (one weight per task; any finite values, the simplex is not enforced).
    pub fn set_preference(&self, lambda: &[f32]) -> Result<()> {
        if lambda.len() != self.tasks() || lambda.iter().any(|l| !l.is_finite()) {
            return Err(Error::msg(format!(
                "a preference over {} adapters needs {} finite weights, got {lambda:?}",
                self.tasks(),
                self.tasks()
            )));
        }
        let mut l = self
            .lambda
            .write()
            .map_err(|_| Error::msg("the adapters' preference lock is poisoned"))?;
        l.copy_from_slice(lambda);
        Ok(())
    }

    /// `λ = one-hot(t)`: adapter `t` alone.
    pub fn select(&self, t: usize) -> Result<()> {
        let mut l = vec![0.0; self.tasks()];
        *l.get_mut(t)
            .ok_or_else(|| Error::msg(format!("no adapter for task {t}")))? = 1.0;
        self.set_preference(&l)
    }

    /// The class-IL (no task identity) rule: `λ` uniform over adapters `0..seen`, i.e.
    /// `W + s·(1/seen)·Σ_{t<seen} BₜAₜ`, the average of the adapted tasks' weights; all zero (the
    /// backbone alone) for `seen = 0`.
    pub fn merged(&self, seen: usize) -> Result<()> {
        let n = seen.min(self.tasks());
        let l: Vec<f32> = (0..self.tasks())
            .map(|t| if t < n { 1.0 / n as f32 } else { 0.0 })
            .collect();
        self.set_preference(&l)
    }

    /// Whether the backbone gets no gradient ([`LoraConfig::freeze_backbone_after`]).
    pub fn backbone_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    pub fn set_backbone_frozen(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::Relaxed);
    }

    /// Whether forwards given their rows' tasks select each row's own adapter.
    pub fn per_row(&self) -> bool {
        self.per_row.load(Ordering::Relaxed)
    }

    /// Switch per-row selection on or off (see the module documentation).
    pub fn set_per_row(&self, per_row: bool) {
        self.per_row.store(per_row, Ordering::Relaxed);
    }

    /// Run `f` (a forward pass over rows of tasks `tasks`) with each row through its own
    /// adapter when in per-row mode; otherwise (or for a pass of another number of rows) `f`
    /// uses the shared `λ`. The rows are forgotten afterwards, on error too.
    pub fn with_rows<R>(&self, tasks: &[u32], f: impl FnOnce() -> R) -> Result<R> {
        if !self.per_row() {
            return Ok(f());
        }
        let set = |rows: Option<Vec<u32>>| -> Result<()> {
            *self
                .rows
                .write()
                .map_err(|_| Error::msg("the adapters' row lock is poisoned"))? = rows;
            Ok(())
        };
        set(Some(tasks.to_vec()))?;
        let r = f();
        set(None)?;
        Ok(r)
    }

    /// Copy `λ`, the per-row mode and the frozen flag from `other` (a fork keeps the model's
    /// state).
    pub fn copy_state(&self, other: &Adapters) -> Result<()> {
        self.set_preference(&other.preference())?;
        self.set_backbone_frozen(other.backbone_frozen());
        self.set_per_row(other.per_row());
        Ok(())
    }

    /// `z + s·Σₜ λₜ (x·Aₜᵀ)·Bₜᵀ` for layer `layer` with input `x` and output `z = x·Wᵀ + b`.
    /// Adapters with `λₜ = 0` are skipped: they cost nothing and get no gradient. Inside
    /// [`Adapters::with_rows`] in per-row mode, each row's own adapter instead.
    pub fn forward(&self, layer: usize, x: &Tensor, z: Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let rows = self
            .rows
            .read()
            .ok()
            .and_then(|r| r.clone())
            .filter(|r| r.len() == n);
        if let Some(rows) = rows {
            return self.forward_rows(layer, x, z, &rows);
        }
        let l = &self.layers[layer];
        let mut out = z;
        for (t, &w) in self.preference().iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let d = x
                .matmul(&l.a[t].as_tensor().t()?)?
                .matmul(&l.b[t].as_tensor().t()?)?;
            out = (out + (d * (self.scale() * f64::from(w)))?)?;
        }
        Ok(out)
    }

    /// `z + s·(x·Aⱼᵀ)·Bⱼᵀ` on the rows of task `j`, for each task `j` in `rows`. A pass of one
    /// task computes exactly what `λ = one-hot(j)` does; with several, adapter `j`'s term is
    /// multiplied by the 0/1 mask of its rows (exact: the other rows add zeros and send no
    /// gradient to it).
    fn forward_rows(&self, layer: usize, x: &Tensor, z: Tensor, rows: &[u32]) -> Result<Tensor> {
        let l = &self.layers[layer];
        let mut present: Vec<u32> = rows.to_vec();
        present.sort_unstable();
        present.dedup();
        let mut out = z;
        for &j in &present {
            let t = j as usize;
            if t >= self.tasks() {
                continue;
            }
            let d = x
                .matmul(&l.a[t].as_tensor().t()?)?
                .matmul(&l.b[t].as_tensor().t()?)?;
            let d = (d * self.scale())?;
            out = if present.len() == 1 {
                (out + d)?
            } else {
                let mask: Vec<f32> = rows.iter().map(|&r| f32::from(r == j)).collect();
                let mask =
                    Tensor::from_vec(mask, (rows.len(), 1), x.device())?.to_dtype(d.dtype())?;
                (out + d.broadcast_mul(&mask)?)?
            };
        }
        Ok(out)
    }

    /// `s·BₜAₜ` of layer `layer`, `out × in` like its weight.
    pub fn delta(&self, layer: usize, t: usize) -> Result<Tensor> {
        let l = &self.layers[layer];
        let ba = l.b[t].as_tensor().matmul(l.a[t].as_tensor())?;
        Ok((ba * self.scale())?)
    }

    /// Adapter `t` as a task vector over `params` (the model's): `s·BₜAₜ` at each adapted
    /// weight, zero at every other tensor consolidation touches (the adapters themselves
    /// included), so that LiNeS and every merging strategy apply to it as to a full
    /// fine-tune's `θₜ − θ₀`. Adding it to the backbone with adapter `t` switched off gives the
    /// weights of the model with `λ = one-hot(t)`.
    pub fn task_vector(&self, params: &ParamSet, t: usize) -> Result<TaskVector> {
        if t >= self.tasks() {
            return Err(Error::msg(format!("no adapter for task {t}")));
        }
        let values = params
            .iter()
            .map(|p| {
                if let Some(i) = self.layers.iter().position(|l| l.weight == p.name) {
                    return Ok(Some(self.delta(i, t)?.flatten_all()?.to_vec1::<f32>()?));
                }
                Ok(crate::consolidation::consolidates(p).then(|| vec![0.0; p.var.elem_count()]))
            })
            .collect::<Result<_>>()?;
        Ok(TaskVector { values })
    }

    /// Adapter tensors per task (`Σ_layers r·(in + out)`), the memory a task adds.
    pub fn params_per_task(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.a[0].elem_count() + l.b[0].elem_count())
            .sum()
    }
}

/// PaLoRA's preference-annealing schedule: the grid point `p` (on the simplex) becomes the ray
/// `p^{mul·τ} / Σ p^{mul·τ}` (elementwise power), with `τ = (step + 1) / total` the training
/// progress. At `τ → 0` every ray is the centre (shared training); as `τ → 1` the rays move
/// towards the simplex's vertices and the adapters specialise. The paper uses `mul = 5`.
/// Not yet wired into training (docs/EXTENSIONS.md).
pub fn annealed_preference(p: &[f32], step: usize, total: usize, mul: f32) -> Vec<f32> {
    let tau = (step + 1) as f64 / total.max(1) as f64;
    let powered: Vec<f64> = p
        .iter()
        .map(|&x| f64::from(x).powf(f64::from(mul) * tau))
        .collect();
    let sum: f64 = powered.iter().sum();
    powered.iter().map(|x| (x / sum) as f32).collect()
}

/// The two-objective grid of the annealing sampler: `n` points `(a, 1 − a)` with `a` evenly
/// spaced over `[ε, 1 − ε]` (the paper's ε = 0.01); `n ≥ 2`.
pub fn preference_grid(n: usize, eps: f32) -> Vec<[f32; 2]> {
    let n = n.max(2);
    (0..n)
        .map(|i| {
            let a = eps + (1.0 - 2.0 * eps) * i as f32 / (n - 1) as f32;
            [a, 1.0 - a]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Stream;

    #[test]
    fn the_adapter_stream_is_not_the_init_stream_and_does_not_move_it() {
        let init = SeededRng::new(4, Stream::Init);
        let mut side = adapter_stream(&init);
        let mut a = init.clone();
        let mut b = SeededRng::new(4, Stream::Init);
        assert_eq!(a.next_u32(), b.next_u32());
        assert_eq!(side.state(), SeededRng::derived(4, Stream::Init, 0).state());
        let x: Vec<u32> = (0..4).map(|_| side.next_u32()).collect();
        let y: Vec<u32> = (0..4).map(|_| b.next_u32()).collect();
        assert_ne!(x, y);
    }

    /// The annealing schedule: the centre at the start, the paper's (0.7, 0.3) → ≈ (0.986, 0.014)
    /// at the end (0.7⁵ / (0.7⁵ + 0.3⁵)), on the simplex, moving monotonically to the vertex.
    #[test]
    fn annealed_preferences_go_from_the_centre_to_the_vertices() {
        let p = [0.7f32, 0.3];
        let start = annealed_preference(&p, 0, 1_000_000, 5.0);
        assert!((start[0] - 0.5).abs() < 1e-4, "{start:?}");
        let end = annealed_preference(&p, 99, 100, 5.0);
        let hand = 0.7f64.powi(5) / (0.7f64.powi(5) + 0.3f64.powi(5));
        assert!((f64::from(end[0]) - hand).abs() < 1e-6, "{end:?}");
        assert!((end[0] - 0.986).abs() < 1e-3 && (end[1] - 0.014).abs() < 1e-3);
        let mut last = 0.0;
        for step in 0..100 {
            let r = annealed_preference(&p, step, 100, 5.0);
            assert!((r[0] + r[1] - 1.0).abs() < 1e-6);
            assert!(r[0] > last);
            last = r[0];
        }
        // The centre of the grid stays the centre; three objectives work alike.
        assert_eq!(
            annealed_preference(&[0.5, 0.5], 99, 100, 5.0),
            vec![0.5, 0.5]
        );
        let r = annealed_preference(&[0.2, 0.3, 0.5], 9, 10, 5.0);
        assert!(r[2] > 0.5 && r[0] < r[1] && (r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let g = preference_grid(3, 0.01);
        assert_eq!(g.len(), 3);
        assert!((g[0][0] - 0.01).abs() < 1e-7 && (g[2][0] - 0.99).abs() < 1e-6);
        assert!((g[1][0] - 0.5).abs() < 1e-6 && (g[1][1] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn preferences_one_hot_merged_and_checked() {
        let a = Adapters::new(LoraConfig::default(), 3);
        assert_eq!(a.preference(), vec![1.0, 0.0, 0.0]);
        a.select(2).unwrap();
        assert_eq!(a.preference(), vec![0.0, 0.0, 1.0]);
        a.merged(2).unwrap();
        assert_eq!(a.preference(), vec![0.5, 0.5, 0.0]);
        a.merged(0).unwrap();
        assert_eq!(a.preference(), vec![0.0; 3]);
        assert!(a.select(3).is_err());
        assert!(a.set_preference(&[1.0, f32::NAN, 0.0]).is_err());
        assert!(a.set_preference(&[1.0]).is_err());
        let c = LoraConfig {
            rank: 4,
            lora_alpha: 2.0,
            ..LoraConfig::default()
        };
        assert_eq!(Adapters::new(c, 1).scale(), 0.5);
    }
}
