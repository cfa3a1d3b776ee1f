//! Datasets, readers and continual-learning task streams.

pub mod augment;
pub mod cifar;
mod dataset;
pub mod discovery;
pub mod idx;
pub mod mini;
pub mod stream;

pub use augment::{AugmentationConfig, Augmenter};
pub use dataset::{Dataset, ImageSet};
pub use discovery::{load_dataset, DATASETS};
pub use stream::{Batch, GatherBuf, SampleRef, Split, Task, TaskStream, Transform};
