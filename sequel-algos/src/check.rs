//! Range checks of algorithm parameters. Errors name the key as `algorithm.<key>`; the registry adds
//! the config file.

use sequel_core::{Error, Result};

/// A config error on `algorithm.<key>`.
pub fn invalid(key: &str, message: String) -> Error {
    Error::Config {
        file: String::new(),
        path: format!("algorithm.{key}"),
        message,
    }
}

/// Finite and ≥ 0.
pub fn non_negative(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be a finite number ≥ 0, got {v}"),
        ))
    }
}

/// Finite and > 0.
pub fn positive(key: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be a finite number > 0, got {v}"),
        ))
    }
}

/// In `[0, 1]`.
pub fn unit_interval(key: &str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(key, format!("must be in [0, 1], got {v}")))
    }
}

/// An integer ≥ 1.
pub fn at_least_one(key: &str, v: usize) -> Result<()> {
    if v >= 1 {
        Ok(())
    } else {
        Err(invalid(key, "must be at least 1".into()))
    }
}
