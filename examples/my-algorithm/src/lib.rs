//! A complete user-defined algorithm, registered without forking sequel-rs
//! (docs/write-your-own-algorithm.md walks through it). `cargo run -p my-algorithm` runs it;
//! `cargo test -p my-algorithm` (part of `cargo test --workspace`, so CI) checks it.
//!
//! `l2-anchor`: keep the weights close to where the task started,
//! `L(θ) = CE(f_θ(x), y) + (λ/2)·‖θ − θ_start‖²` — EWC with an identity Fisher.

use anyhow::Result;
use candle_core::Tensor;
use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;
use sequel_core::data::Batch;
use sequel_core::model::{ModelOutput, Snapshot};
use sequel_core::trainer::Silent;
use sequel_core::{Algorithm, StepCtx, TaskCtx};
use serde::{Deserialize, Serialize};

/// YAML keys of `algorithm:` besides `name` are exactly these fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2AnchorConfig {
    /// Penalty strength λ. Default 1.0.
    #[serde(default = "default_lambda")]
    pub lambda: f64,
}

fn default_lambda() -> f64 {
    1.0
}

pub struct L2Anchor {
    lambda: f64,
    anchor: Option<Snapshot>,
}

impl Algorithm for L2Anchor {
    fn name(&self) -> &str {
        "l2-anchor"
    }

    fn before_task(&mut self, ctx: &mut TaskCtx) -> sequel_core::Result<()> {
        if ctx.task > 0 {
            self.anchor = Some(ctx.model.params().snapshot()?);
        }
        Ok(())
    }

    fn loss(
        &mut self,
        out: &ModelOutput,
        batch: &Batch,
        ctx: &mut StepCtx,
    ) -> sequel_core::Result<Tensor> {
        let ce = ctx.task_loss(out, batch)?;
        let Some(anchor) = &self.anchor else {
            return Ok(ce);
        };
        let mut penalty = Tensor::zeros((), candle_core::DType::F32, ctx.device)?;
        for (p, a) in ctx.model.params().iter().zip(&anchor.tensors) {
            if p.trainable() {
                penalty = (penalty + (p.var.as_tensor() - a)?.sqr()?.sum_all()?)?;
            }
        }
        Ok((ce + (penalty * (self.lambda / 2.0))?)?)
    }
}

/// A registry with the built-ins plus `l2-anchor`.
pub fn registry() -> Registry {
    let mut registry = Registry::builtin();
    registry.register_algorithm(
        "l2-anchor",
        "L2 pull towards the task-start weights",
        |c: L2AnchorConfig| {
            Ok(Box::new(L2Anchor {
                lambda: c.lambda,
                anchor: None,
            }) as Box<dyn Algorithm>)
        },
    );
    registry
}

/// Run `algorithm` (a YAML mapping such as `{ name: l2-anchor, lambda: 0.01 }`) on fmnist-mini,
/// 5 tasks, task-IL, and return the final accuracy matrix.
pub fn run_example(algorithm: &str) -> Result<sequel_core::metrics::AccuracyMatrix> {
    let out = std::env::temp_dir().join(format!(
        "sequel-example-{}-{}",
        std::process::id(),
        algorithm.len()
    ));
    let yaml = format!(
        "name: my-algorithm\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 5, scenario: task-il }}\n\
         algorithm: {algorithm}\n\
         output: {{ dir: {} }}\n",
        out.display()
    );
    let prepared = prepare(&yaml, "inline", &[], &registry())?;
    let finished = execute(prepared, &mut Silent, None)?;
    std::fs::remove_dir_all(&out)?;
    Ok(finished.outcome.matrix)
}
