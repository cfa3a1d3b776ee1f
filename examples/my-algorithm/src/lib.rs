//! A complete user-defined algorithm, dataset (`dataset.rs`) and backbone (`backbone.rs`),
//! registered without forking sequel-rs (docs/write-your-own-algorithm.md walks through them). The crate's binary is the whole `sequel`
//! CLI with it registered (`cargo run --release -p my-algorithm -- run CONFIG`);
//! `cargo test -p my-algorithm` (part of `cargo test --workspace`, so CI) checks both.
//!
//! `l2-anchor`: keep the weights close to where the task started,
//! `L(θ) = CE(f_θ(x), y) + (λ/2)·‖θ − θ_start‖²` — EWC with an identity Fisher.

use anyhow::Result;
use candle_core::Tensor;
use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;
use sequel_core::data::Batch;
use sequel_core::model::Snapshot;
use sequel_core::trainer::Silent;
use sequel_core::{Algorithm, AlgorithmConfig, StepCtx, TaskCtx};
use serde::{Deserialize, Serialize};

/// YAML keys of `algorithm:` besides `name` are exactly these fields; missing ones take
/// `Default::default()`'s values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct L2AnchorConfig {
    /// Penalty strength λ.
    pub lambda: f64,
}

impl Default for L2AnchorConfig {
    fn default() -> Self {
        Self { lambda: 1.0 }
    }
}

impl AlgorithmConfig for L2AnchorConfig {
    const NAME: &'static str = "l2-anchor";
    const SUMMARY: &'static str = "L2 pull towards the task-start weights";
    fn build(self) -> sequel_core::Result<Box<dyn Algorithm>> {
        Ok(Box::new(L2Anchor {
            lambda: self.lambda,
            anchor: None,
        }))
    }
}

/// Its only state, the anchor, is taken again by `before_task` (also after a resume), so it lists
/// no `state`.
pub struct L2Anchor {
    pub lambda: f64,
    pub anchor: Option<Snapshot>,
}

impl Algorithm for L2Anchor {
    fn before_task(&mut self, ctx: &mut TaskCtx) -> sequel_core::Result<()> {
        if ctx.task > 0 {
            self.anchor = Some(ctx.model.params().snapshot()?);
        }
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> sequel_core::Result<Tensor> {
        let ce = ctx.ce(batch)?;
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

pub mod backbone;
pub mod dataset;

/// A registry with the built-ins plus `l2-anchor`, the `blobs` dataset and the `two-layer`
/// backbone.
pub fn registry() -> Registry {
    let mut registry = Registry::builtin();
    registry.add::<L2AnchorConfig>();
    registry.add_dataset(
        "blobs",
        "four lit quadrants over noise, 1x8x8",
        dataset::load_blobs,
    );
    registry.add_backbone::<backbone::TwoLayerConfig>();
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
    Ok(finished.outcome.results.matrix)
}
