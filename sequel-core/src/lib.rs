//! sequel-core: the mechanisms of sequel-rs — data and task streams, backbones, optimizers, the
//! unified continual-learning trainer with its `Algorithm` and `Consolidator` hooks, metrics,
//! configuration and the run directory. It never names a concrete algorithm; those live in
//! sequel-algos.

pub mod algorithm;
pub mod bench;
pub mod buffer;
pub mod checkpoint;
pub mod config;
pub mod consolidation;
pub mod curvature;
pub mod data;
pub mod device;
pub mod error;
pub mod experiment;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod outcome;
pub mod results;
pub mod rng;
pub mod run;
pub mod sources;
pub mod state;
pub mod step;
pub mod sweep;
pub mod trainer;

pub use algorithm::{Algorithm, AlgorithmConfig, EvalCtx, Forward, StepCost, StepCtx, TaskCtx};
pub use buffer::MemoryConfig;
pub use config::ExperimentConfig;
pub use consolidation::{Consolidation, ConsolidationCtx, Consolidator, TaskVector, Wiring};
pub use error::{Error, Result};
pub use memory::{Drawn, Memory};
pub use model::{Model, ModelOutput};
pub use outcome::RunOutcome;
pub use sources::{BackboneConfig, BackboneSpec, Sources};
pub use state::{StateDict, StateIo};
pub use trainer::{Progress, Trainer};
