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
pub mod lwf;
pub mod mas;
pub mod naive;
pub mod penalty;
pub mod qp;
pub mod registry;
pub mod run;
pub mod si;
#[cfg(test)]
mod testing;
pub mod xder;

pub use registry::Registry;
