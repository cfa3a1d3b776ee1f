//! Datasets, readers and continual-learning task streams.

pub mod cifar;
mod dataset;
pub mod discovery;
pub mod idx;
pub mod mini;

pub use dataset::{Dataset, ImageSet};
pub use discovery::{load_dataset, DATASETS};
