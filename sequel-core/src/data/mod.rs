//! Datasets, readers and continual-learning task streams.

mod dataset;
pub mod discovery;
pub mod idx;
pub mod cifar;
pub mod mini;

pub use dataset::{Dataset, ImageSet};

