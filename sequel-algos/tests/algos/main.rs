//! Trainer-driven tests of the algorithms, one module per algorithm file (`tests/algos/<algo>.rs`
//! for `src/<algo>.rs`), compiled into one test binary so that they link once. They use only the
//! public API (`sequel_algos::testing`, `Trainer::algorithm_mut`, `Algorithm::memory`), as a user's
//! own tests would.
//!
//! Inline in the algorithm's file stay the pure-function tests (projections, herding, loss
//! formulas) and the white-box tests that read or set private state (iCaRL's distillation plan,
//! SI's path integral before the clamp, MIR's retrieval, ER-ACE's seen classes, ...): they check
//! the update rule's internals, which no public accessor should expose just for a test.
//!
//! A test that checks a hook while the trainer runs it does so through
//! `testing::Observer` (one `Probe`, no wrapper algorithm); `probe.rs` checks that the probe
//! itself changes nothing.

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
mod lucir;
mod lwf_mc;
mod mas;
mod probe;
