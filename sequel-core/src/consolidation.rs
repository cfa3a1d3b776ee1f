//! The post-task consolidation hook: a strategy may replace the trained weights after each task,
//! before evaluation (LiNeS, model merging). The strategies themselves live in sequel-algos; the
//! wiring they share — which weights are evaluated, which weights training continues from, and
//! what task vectors are relative to — lives here and in the trainer, once.
//!
//! Notation (docs/CONSOLIDATION.md): θ₀ the initial weights, θ̂_t the weights just trained on task
//! t, θ̄_t the consolidated model after task t, A_t the anchor of task t's vectors. A strategy
//! returns a [`TaskVector`] τ relative to the anchor; the trainer forms θ̄_t = A_t + τ. Tensors a
//! strategy must not touch — batch-norm running statistics and the per-task heads of multi-head
//! task-IL — are always taken from θ̂_t, whatever the strategy returns (see [`consolidates`]).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Param, ParamSet, Role, Snapshot};
use crate::rng::SeededRng;

/// What task vectors are relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Anchor {
    /// The previous consolidated model θ̄_{t−1}: τ_t = θ̂_t − θ̄_{t−1}, θ̄_t = θ̄_{t−1} + τ. Earlier
    /// tasks are already inside θ̄_{t−1}, so a strategy merges the current vector only. Before
    /// task 1 there is no previous model (θ₀ is an untrained initialisation), so θ̄_0 := θ̂_1 and
    /// task 1 is kept as trained. The default: right for models trained from scratch.
    Previous,
    /// The initial weights θ₀: τ_t = θ̂_t − θ₀, and strategies that ask for it see every τ_s,
    /// s ≤ t (the published merging methods, which assume θ₀ is a useful pre-trained model).
    Initial,
}

/// Which weights the next task trains from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContinueFrom {
    /// θ̄_t (CoMA, LiNeS as forgetting mitigation).
    Consolidated,
    /// θ̂_t: sequential fine-tuning, the merge is only deployed (MagMax).
    Trained,
}

/// Which weights fill `accuracy_matrix.csv` (the trained ones always fill the raw matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Evaluate {
    Consolidated,
    Trained,
}

/// The wiring shared by every strategy: the `anchor`, `continue_from` and `evaluate` keys of the
/// `consolidation:` section. A strategy only chooses their defaults
/// ([`Consolidator::default_wiring`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wiring {
    pub anchor: Anchor,
    pub continue_from: ContinueFrom,
    pub evaluate: Evaluate,
}

impl Wiring {
    /// The YAML keys of the wiring, handled before a strategy parses its own.
    pub const KEYS: [&'static str; 3] = ["anchor", "continue_from", "evaluate"];
}

impl Default for Wiring {
    fn default() -> Self {
        Self {
            anchor: Anchor::Previous,
            continue_from: ContinueFrom::Consolidated,
            evaluate: Evaluate::Consolidated,
        }
    }
}

/// Whether consolidation may change this tensor. Batch-norm running statistics are state, not
/// weights, and the per-task heads of multi-head task-IL belong to one task each (they receive no
/// gradient outside it): both are always kept as trained.
pub fn consolidates(p: &Param) -> bool {
    p.role != Role::NormStat && p.head.is_none()
}

/// A vector in weight space, in [`ParamSet`] order: `None` for the tensors consolidation does not
/// touch (see [`consolidates`]), flattened `f32` values for the others.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskVector {
    pub values: Vec<Option<Vec<f32>>>,
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

impl TaskVector {
    /// `to − from` over the tensors consolidation touches.
    pub fn between(params: &ParamSet, from: &Snapshot, to: &Snapshot) -> Result<Self> {
        if from.tensors.len() != params.len() || to.tensors.len() != params.len() {
            return Err(Error::msg("snapshot does not match the model's parameters"));
        }
        let values = params
            .iter()
            .zip(from.tensors.iter().zip(&to.tensors))
            .map(|(p, (a, b))| {
                if !consolidates(p) {
                    return Ok(None);
                }
                let (a, b) = (flat(a)?, flat(b)?);
                Ok(Some(b.iter().zip(&a).map(|(y, x)| y - x).collect()))
            })
            .collect::<Result<_>>()?;
        Ok(Self { values })
    }

    /// The same entries, all zero.
    pub fn zeros_like(&self) -> Self {
        Self {
            values: self
                .values
                .iter()
                .map(|v| v.as_ref().map(|v| vec![0.0; v.len()]))
                .collect(),
        }
    }

    /// `self += c · other`.
    pub fn add_scaled(&mut self, other: &TaskVector, c: f32) {
        for (a, b) in self.values.iter_mut().zip(&other.values) {
            if let (Some(a), Some(b)) = (a, b) {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += c * y;
                }
            }
        }
    }

    /// `self *= c`.
    pub fn scale(&mut self, c: f32) {
        for x in self.values.iter_mut().flatten().flatten() {
            *x *= c;
        }
    }

    /// Sum of absolute values (f64 accumulation).
    pub fn l1(&self) -> f64 {
        self.values
            .iter()
            .flatten()
            .flatten()
            .map(|x| x.abs() as f64)
            .sum()
    }

    /// Number of scalar entries.
    pub fn len(&self) -> usize {
        self.values.iter().flatten().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sum of `vectors` (which must share their layout); `None` for an empty slice.
    pub fn sum(vectors: &[TaskVector]) -> Option<TaskVector> {
        let (first, rest) = vectors.split_first()?;
        let mut s = first.clone();
        for v in rest {
            s.add_scaled(v, 1.0);
        }
        Some(s)
    }
}

/// `anchor + τ`, with every tensor that `τ` leaves out (or that consolidation never touches) taken
/// from `trained`. Wherever τ equals the task's own vector `current` (= trained − anchor), the
/// trained value is used as is, so identity settings (LiNeS with γ = 1, task arithmetic of one task
/// with λ = 1, …) return θ̂_t bit for bit instead of anchor + (θ̂_t − anchor) with rounding. Checks
/// sizes, so a strategy bug cannot half-write the model.
pub fn apply(
    params: &ParamSet,
    anchor: &Snapshot,
    trained: &Snapshot,
    current: &TaskVector,
    tau: &TaskVector,
) -> Result<Snapshot> {
    if tau.values.len() != params.len() || current.values.len() != params.len() {
        return Err(Error::msg(format!(
            "consolidation returned {} tensors, the model has {}",
            tau.values.len(),
            params.len()
        )));
    }
    let tensors =
        params
            .iter()
            .zip(anchor.tensors.iter().zip(&trained.tensors))
            .zip(tau.values.iter().zip(&current.values))
            .map(|((p, (a, t)), (v, own))| match (v, own) {
                (Some(v), Some(own)) if consolidates(p) => {
                    if v.len() != p.var.elem_count() {
                        return Err(Error::msg(format!(
                            "consolidation returned {} values for `{}`, which has {}",
                            v.len(),
                            p.name,
                            p.var.elem_count()
                        )));
                    }
                    let (a, tr) = (flat(a)?, flat(t)?);
                    let out: Vec<f32> = a
                        .iter()
                        .zip(&tr)
                        .zip(v.iter().zip(own))
                        .map(|((x, y), (d, o))| if d == o { *y } else { x + d })
                        .collect();
                    Ok(Tensor::from_vec(out, p.var.shape().clone(), t.device())?
                        .to_dtype(t.dtype())?)
                }
                _ => Ok(t.clone()),
            })
            .collect::<Result<_>>()?;
    Ok(Snapshot { tensors })
}

/// What a consolidator sees after task `task` (0-based). During the call the live model holds
/// θ̂_t; the trainer writes the result, so a strategy never touches the model itself.
pub struct ConsolidationCtx<'a> {
    /// 0-based index of the task just trained.
    pub task: usize,
    /// Names, depths, roles and head tags of the tensors, in the order of every snapshot and
    /// task vector.
    pub params: &'a ParamSet,
    /// θ₀, the weights before the first task.
    pub initial: &'a Snapshot,
    /// θ̄_{t−1}, the previous consolidated model (θ̄_0 is θ₀ with `anchor: initial`, θ̂_1 with
    /// `anchor: previous`).
    pub previous: &'a Snapshot,
    /// θ̂_t, the weights just trained.
    pub trained: &'a Snapshot,
    /// Which of `initial` / `previous` the vectors are relative to.
    pub anchor: Anchor,
    /// The task vectors to merge, relative to the anchor, oldest first; the last one is the
    /// current task's θ̂_t − anchor. With `anchor: initial` and
    /// [`Consolidator::keeps_task_vectors`], every task so far; otherwise the current one only.
    pub task_vectors: &'a [TaskVector],
    /// The seeded consolidation stream (DARE's drop masks).
    pub rng: &'a mut SeededRng,
}

impl ConsolidationCtx<'_> {
    /// The anchor's weights.
    pub fn anchor_weights(&self) -> &Snapshot {
        match self.anchor {
            Anchor::Initial => self.initial,
            Anchor::Previous => self.previous,
        }
    }

    /// The current task's vector θ̂_t − anchor.
    pub fn current(&self) -> Result<&TaskVector> {
        self.task_vectors
            .last()
            .ok_or_else(|| Error::msg("no task vector for the current task"))
    }

    /// `to − from` over the tensors consolidation touches.
    pub fn between(&self, from: &Snapshot, to: &Snapshot) -> Result<TaskVector> {
        TaskVector::between(self.params, from, to)
    }
}

/// A consolidation strategy. It returns the consolidated model as a vector τ relative to the
/// anchor (θ̄_t = anchor + τ); `None` entries keep the trained tensor.
pub trait Consolidator: Send {
    fn name(&self) -> &str;

    /// The wiring used when the config does not set it.
    fn default_wiring(&self) -> Wiring {
        Wiring::default()
    }

    /// Ask the trainer to keep every task vector (with `anchor: initial`), for strategies that
    /// merge all tasks so far (task arithmetic, TIES, MagMax).
    fn keeps_task_vectors(&self) -> bool {
        false
    }

    fn consolidate(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector>;

    /// A coefficient the trainer chooses on validation data before each consolidation (LiNeS
    /// `gamma: auto`): its `metrics.csv` column and its grid. The trainer tries every grid value
    /// with [`Consolidator::set_coefficient`], keeps the one with the best selection score
    /// ([`selection_score`]) and leaves it set for the task's consolidation. `consolidate` is
    /// then called once per grid value before the real call, so it must not change the
    /// strategy's state (the built-in strategies keep none).
    fn auto_coefficient(&self) -> Option<AutoCoefficient> {
        None
    }

    /// Set the coefficient [`Consolidator::auto_coefficient`] names.
    fn set_coefficient(&mut self, _value: f32) {}
}

/// A coefficient chosen on validation data, see [`Consolidator::auto_coefficient`].
#[derive(Debug, Clone, PartialEq)]
pub struct AutoCoefficient {
    /// The `metrics.csv` column of the chosen values, e.g. `gamma_auto`.
    pub key: String,
    /// The values tried, in order; ties go to the later value.
    pub grid: Vec<f32>,
}

/// The LiNeS paper's selection rule (Wang et al., ICLR 2025, §3; `tradeoff_target_weight` = 2 in
/// its code): `2·target_norm + control_norm`, where `target_norm` = accuracy on the target task /
/// the fine-tuned weights' accuracy on it, and `control_norm` = the mean over control tasks of
/// accuracy / the reference (zero-shot, here anchor) weights' accuracy. A reference accuracy of 0
/// leaves the task out; with no control task left the term is 0.
pub fn selection_score(target: f64, target_ref: f64, control: &[(f64, f64)]) -> f64 {
    let norm = |acc: f64, reference: f64| (reference > 0.0).then(|| acc / reference);
    let target_norm = norm(target, target_ref).unwrap_or(target);
    let controls: Vec<f64> = control.iter().filter_map(|&(a, r)| norm(a, r)).collect();
    let control_norm = if controls.is_empty() {
        0.0
    } else {
        controls.iter().sum::<f64>() / controls.len() as f64
    };
    2.0 * target_norm + control_norm
}

/// A configured strategy with its wiring.
pub struct Consolidation {
    pub strategy: Box<dyn Consolidator>,
    pub wiring: Wiring,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_score_is_twice_the_normalised_target_plus_the_mean_normalised_control() {
        // target 0.8 of 0.9; controls 0.3 of 0.6 and 0.5 of 0.5; a zero reference is left out.
        let s = selection_score(0.8, 0.9, &[(0.3, 0.6), (0.5, 0.5), (0.2, 0.0)]);
        let hand = 2.0 * (0.8 / 0.9) + (0.5 + 1.0) / 2.0;
        assert!((s - hand).abs() < 1e-12, "{s} vs {hand}");
        // No control task: the target term alone.
        assert!((selection_score(0.45, 0.9, &[]) - 1.0).abs() < 1e-12);
    }
    use candle_core::{Device, Var};

    fn set() -> ParamSet {
        let dev = Device::Cpu;
        let v = |x: &[f32]| Var::from_tensor(&Tensor::new(x, &dev).unwrap()).unwrap();
        let mut p = ParamSet::new();
        p.push("body.weight", 1, Role::Body, v(&[1.0, 2.0]));
        p.push("bn.running_mean", 1, Role::NormStat, v(&[0.5]));
        p.push("head.weight", 2, Role::Head, v(&[3.0]));
        p.push("head.0.weight", 2, Role::Head, v(&[4.0]));
        p.tag_last_as_head(1, 0);
        p
    }

    fn snap(vals: &[&[f32]]) -> Snapshot {
        Snapshot {
            tensors: vals
                .iter()
                .map(|v| Tensor::new(*v, &Device::Cpu).unwrap())
                .collect(),
        }
    }

    fn values(s: &Snapshot) -> Vec<Vec<f32>> {
        s.tensors.iter().map(|t| t.to_vec1().unwrap()).collect()
    }

    #[test]
    fn vectors_skip_norm_stats_and_per_task_heads_and_apply_keeps_them_trained() {
        let p = set();
        let a = snap(&[&[0.0, 0.0], &[0.0], &[0.0], &[0.0]]);
        let t = snap(&[&[1.0, 2.0], &[0.5], &[3.0], &[4.0]]);
        let tau = TaskVector::between(&p, &a, &t).unwrap();
        assert_eq!(
            tau.values,
            vec![Some(vec![1.0, 2.0]), None, Some(vec![3.0]), None]
        );
        // A strategy that returns values for every tensor still cannot move the protected ones.
        let rogue = TaskVector {
            values: vec![
                Some(vec![10.0, 10.0]),
                Some(vec![10.0]),
                None,
                Some(vec![10.0]),
            ],
        };
        let out = apply(&p, &a, &t, &tau, &rogue).unwrap();
        assert_eq!(
            values(&out),
            vec![vec![10.0, 10.0], vec![0.5], vec![3.0], vec![4.0]]
        );
        let bad = TaskVector {
            values: vec![Some(vec![1.0]), None, None, None],
        };
        assert!(apply(&p, &a, &t, &tau, &bad).is_err());
        // The task's own update gives back the trained weights exactly.
        let a = snap(&[&[0.1, 0.7], &[0.0], &[0.3], &[0.0]]);
        let t = snap(&[&[1.3, -2.9], &[0.5], &[3.7], &[4.0]]);
        let tau = TaskVector::between(&p, &a, &t).unwrap();
        assert_eq!(values(&apply(&p, &a, &t, &tau, &tau).unwrap()), values(&t));
    }

    #[test]
    fn vector_arithmetic() {
        let mut a = TaskVector {
            values: vec![Some(vec![1.0, -2.0]), None],
        };
        let b = TaskVector {
            values: vec![Some(vec![3.0, 4.0]), None],
        };
        a.add_scaled(&b, 0.5);
        assert_eq!(a.values[0], Some(vec![2.5, 0.0]));
        a.scale(2.0);
        assert_eq!(a.l1(), 5.0);
        assert_eq!(a.len(), 2);
        let s = TaskVector::sum(&[a.clone(), b]).unwrap();
        assert_eq!(s.values[0], Some(vec![8.0, 4.0]));
        assert_eq!(a.zeros_like().l1(), 0.0);
    }
}
