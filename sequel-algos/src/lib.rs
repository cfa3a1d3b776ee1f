//! sequel-algos: the policies of sequel-rs — continual-learning algorithms, consolidation
//! strategies, and the registry that maps config names to them.

pub mod agem;
pub mod bic;
mod check;
pub mod cls_er;
pub mod consolidation;
pub mod der;
pub mod er;
pub mod er_ace;
pub mod er_aml;
pub mod ewc;
pub mod ewc_online;
pub mod exemplars;
pub mod fisher;
pub mod flat;
pub mod gdumb;
pub mod gem;
pub mod icarl;
pub mod importance;
pub mod joint;
pub mod lucir;
pub mod lwf;
pub mod lwf_mc;
pub mod mas;
pub mod mir;
pub mod naive;
pub mod penalty;
pub mod qp;
pub mod registry;
pub mod run;
pub mod rwalk;
pub mod si;
/// Test support for algorithm authors (feature `testing`): run an algorithm on small
/// fmnist-mini tasks under a [`testing::Probe`] that records every step and the weights around
/// every task.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod xder;

pub use registry::Registry;
