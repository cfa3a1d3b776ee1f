//! Trainer-driven tests of the algorithms, one module per algorithm file (`tests/algos/<algo>.rs`
//! for `src/<algo>.rs`), compiled into one test binary so that they link once. Pure-function
//! tests (projections, herding, loss formulas) stay inline in the algorithm's file.

mod agem;
mod bic;
mod cls_er;
mod der;
mod er;
mod ewc;
mod ewc_online;
mod gdumb;
mod gem;
mod importance;
mod lwf_mc;
mod mas;
