//! Post-task consolidation strategies (docs/CONSOLIDATION.md), one file each.
//!
//! Every strategy is a [`Merge`]: from what [`ConsolidationCtx`] offers it forms one vector τ_M
//! relative to the anchor. [`Scaled`] turns a merge into a [`Consolidator`] and, when the strategy's
//! config has a `lines:` block, applies LiNeS to τ_M as the final step (LiNeS paper §4: scaling
//! after merging). The `lines` strategy itself is LiNeS on the current task vector alone. The wiring
//! (anchor, which weights are evaluated and trained on) is not a strategy's business: the registry
//! and the trainer handle it for all of them.

pub mod average;
pub mod dare;
pub mod lines;
pub mod magmax;
pub mod task_arithmetic;
pub mod ties;

use sequel_core::consolidation::{AutoCoefficient, ConsolidationCtx, TaskVector, Wiring};
use sequel_core::{Consolidator, Error, Result};

pub use lines::{HeadPolicy, Lines, LinesConfig};

/// One merging rule.
pub trait Merge: Send {
    fn name(&self) -> &str;
    fn default_wiring(&self) -> Wiring {
        Wiring::default()
    }
    /// Whether the rule merges every task so far (see [`Consolidator::keeps_task_vectors`]).
    fn keeps_task_vectors(&self) -> bool {
        false
    }
    /// τ_M, relative to the anchor.
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector>;
}

/// A merge followed by optional LiNeS scaling.
pub struct Scaled<M> {
    pub merge: M,
    pub lines: Option<Lines>,
}

impl<M: Merge> Scaled<M> {
    pub fn new(merge: M, lines: Option<LinesConfig>) -> Result<Self> {
        Ok(Self {
            merge,
            lines: lines
                .map(|c| Lines::new(c, "consolidation.lines"))
                .transpose()?,
        })
    }
}

impl<M: Merge> Consolidator for Scaled<M> {
    fn name(&self) -> &str {
        self.merge.name()
    }
    fn default_wiring(&self) -> Wiring {
        self.merge.default_wiring()
    }
    fn keeps_task_vectors(&self) -> bool {
        self.merge.keeps_task_vectors()
    }
    fn auto_coefficient(&self) -> Option<AutoCoefficient> {
        let auto = self.lines.as_ref()?.auto?;
        let key = match auto {
            lines::Auto::Gamma => "gamma_auto",
            lines::Auto::Beta => "beta_auto",
        };
        Some(AutoCoefficient {
            key: key.into(),
            grid: lines::auto_grid(),
        })
    }
    fn set_coefficient(&mut self, value: f32) {
        if let Some(l) = self.lines.as_mut() {
            l.set(value);
        }
    }
    fn consolidate(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        let mut tau = self.merge.merge(ctx)?;
        if let Some(l) = &self.lines {
            l.scale(ctx.params, &mut tau, ctx.task_vectors);
        }
        Ok(tau)
    }
}

/// A config error at `path`; the registry fills in the file.
pub(crate) fn bad(path: &str, message: String) -> Error {
    Error::Config {
        file: String::new(),
        path: path.to_string(),
        message,
    }
}

/// `lambda` must be a finite number.
pub(crate) fn check_lambda(name: &str, lambda: f32) -> Result<()> {
    if lambda.is_finite() {
        Ok(())
    } else {
        Err(bad(
            &format!("consolidation.{name}"),
            format!("must be a finite number, found {lambda}"),
        ))
    }
}

#[cfg(test)]
pub(crate) mod fixture {
    //! A tiny model and hand-made snapshots for strategy tests.

    use candle_core::{Device, Tensor, Var};
    use sequel_core::consolidation::{apply, Anchor, ConsolidationCtx, TaskVector, Wiring};
    use sequel_core::model::{ParamSet, Role, Snapshot};
    use sequel_core::rng::{SeededRng, Stream};
    use sequel_core::Consolidator;

    /// Three layers: `l1` (depth 1), `l2` (depth 2), a shared head (depth 3), each two values.
    pub fn params() -> ParamSet {
        let dev = Device::Cpu;
        let mut p = ParamSet::new();
        for (name, depth, role) in [
            ("l1.weight", 1, Role::Body),
            ("l2.weight", 2, Role::Body),
            ("head.weight", 3, Role::Head),
        ] {
            let v = Var::from_tensor(&Tensor::zeros(2, candle_core::DType::F32, &dev).unwrap())
                .unwrap();
            p.push(name, depth, role, v);
        }
        p
    }

    pub fn snap(vals: &[[f32; 2]]) -> Snapshot {
        Snapshot {
            tensors: vals
                .iter()
                .map(|v| Tensor::new(v, &Device::Cpu).unwrap())
                .collect(),
        }
    }

    pub fn values(s: &Snapshot) -> Vec<[f32; 2]> {
        s.tensors
            .iter()
            .map(|t| {
                let v = t.to_vec1::<f32>().unwrap();
                [v[0], v[1]]
            })
            .collect()
    }

    pub fn vector(vals: &[[f32; 2]]) -> TaskVector {
        TaskVector {
            values: vals.iter().map(|v| Some(v.to_vec())).collect(),
        }
    }

    /// Run `c` over a sequence of trained models the way the trainer does (continuing from the
    /// consolidated model); returns the consolidated model after each task.
    pub fn run(
        c: &mut dyn Consolidator,
        wiring: Wiring,
        initial: &Snapshot,
        trained: &[Snapshot],
    ) -> Vec<Snapshot> {
        let p = params();
        let mut rng = SeededRng::new(0, Stream::Consolidation);
        let mut kept = Vec::new();
        let mut previous: Option<Snapshot> = None;
        let mut out = Vec::new();
        for (t, th) in trained.iter().enumerate() {
            let prev = match (&previous, wiring.anchor) {
                (Some(p), _) => p.clone(),
                (None, Anchor::Initial) => initial.clone(),
                (None, Anchor::Previous) => th.clone(),
            };
            let anchor = match wiring.anchor {
                Anchor::Initial => initial.clone(),
                Anchor::Previous => prev.clone(),
            };
            let tau = TaskVector::between(&p, &anchor, th).unwrap();
            let vectors = if wiring.anchor == Anchor::Initial && c.keeps_task_vectors() {
                kept.push(tau);
                kept.clone()
            } else {
                vec![tau]
            };
            let merged = c
                .consolidate(&mut ConsolidationCtx {
                    task: t,
                    params: &p,
                    initial,
                    previous: &prev,
                    trained: th,
                    anchor: wiring.anchor,
                    task_vectors: &vectors,
                    rng: &mut rng,
                })
                .unwrap();
            let cons = apply(&p, &anchor, th, vectors.last().unwrap(), &merged).unwrap();
            previous = Some(cons.clone());
            out.push(cons);
        }
        out
    }

    pub fn initial_wiring() -> Wiring {
        Wiring {
            anchor: Anchor::Initial,
            ..Wiring::default()
        }
    }
}
