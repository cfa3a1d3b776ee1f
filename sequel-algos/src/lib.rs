//! sequel-algos: the policies of sequel-rs — continual-learning algorithms, consolidation
//! strategies, and the registry that maps config names to them.

pub mod consolidation;
pub mod joint;
pub mod naive;
pub mod registry;
pub mod run;

pub use registry::Registry;
