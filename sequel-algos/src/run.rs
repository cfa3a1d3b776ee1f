//! Run an experiment config end to end: resolve the algorithm, dataset and backbone through the
//! registry, train, and write the run directory. The CLI and tests both go through here.

use sequel_core::config::parse_config;
pub use sequel_core::experiment::Prepared;
use sequel_core::experiment::{run_experiment, Finished, RunOptions};
use sequel_core::{Progress, Result};

use crate::Registry;

/// Parse, override and validate a config, and build its algorithm — everything short of loading
/// data. `origin` names the file in errors.
pub fn prepare(
    text: &str,
    origin: &str,
    overrides: &[String],
    registry: &Registry,
) -> Result<Prepared> {
    let mut config = parse_config(text, origin, overrides)?;
    config.validate(origin)?;
    config.resolve_defaults();
    registry.sources().resolve(&mut config, origin)?;
    let (algorithm, algo_resolved) = registry.build_algorithm(&config.algorithm, origin)?;
    config.algorithm = algo_resolved;
    let consolidator = match &config.consolidation {
        Some(spec) => {
            let (c, resolved) = registry.build_consolidator(spec, origin)?;
            config.consolidation = Some(resolved);
            Some(c)
        }
        None => None,
    };
    let resolved_yaml = config.resolved_yaml()?;
    Ok(Prepared {
        config,
        algorithm,
        consolidator,
        resolved_yaml,
        origin: origin.to_string(),
        sources: registry.sources().clone(),
    })
}

/// Train a prepared experiment and write its run directory.
pub fn execute(
    p: Prepared,
    progress: &mut dyn Progress,
    git_hash: Option<String>,
) -> Result<Finished> {
    run_experiment(p, progress, git_hash, &RunOptions::default())
}

/// [`execute`] with resume and stop options.
pub fn execute_with(
    p: Prepared,
    progress: &mut dyn Progress,
    git_hash: Option<String>,
    opts: &RunOptions,
) -> Result<Finished> {
    run_experiment(p, progress, git_hash, opts)
}
