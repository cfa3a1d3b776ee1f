//! `device: cpu | cuda | cuda:N` — where a run's tensors live.
//!
//! The default build has the CPU backend only; `--features cuda` (scripts/build-cuda.sh) adds
//! candle's CUDA backend. Reproducibility: on the CPU the same config, seed and thread count give
//! bit-identical results; on a GPU, reductions that use atomics (candle's CUDA kernels and cuBLAS
//! may pick them) can change the last bits between runs, so only the same binary on the same GPU
//! model is expected to repeat a run, and that is a claim to verify, not assume.

use std::fmt;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A device named in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// CUDA device ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    pub fn is_cpu(&self) -> bool {
        matches!(self, DeviceSpec::Cpu)
    }

    /// Parse `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device; use cpu, cuda or cuda:N")),
        }
    }

    /// Open the device.
    ///
    /// # Errors
    /// A CUDA device in a build without the `cuda` feature, or one the driver cannot open.
    pub fn open(&self) -> Result<Device> {
        match *self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| cannot_open(n, &e)),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(Error::msg(format!(
                "device: `{self}` needs a build with CUDA: scripts/build-cuda.sh (or \
                 `cargo build --release -p sequel-bench --features cuda` with a CUDA toolkit)"
            ))),
        }
    }
}

/// One line for a device the driver refused: candle appends a backtrace on the following lines.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn cannot_open(n: usize, e: &dyn fmt::Display) -> Error {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    Error::msg(format!("device: cannot open cuda:{n}: {first}"))
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        DeviceSpec::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(DeviceSpec::parse(text), Ok(spec));
            assert_eq!(DeviceSpec::parse(&spec.to_string()), Ok(spec));
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
            assert!(DeviceSpec::parse(bad)
                .unwrap_err()
                .contains("cpu, cuda or cuda:N"));
        }
    }

    #[test]
    fn a_refused_device_is_one_line() {
        let e = cannot_open(
            1,
            &"DriverError(CUDA_ERROR_STUB_LIBRARY)\n 0: bt at error.rs:260",
        );
        assert_eq!(
            e.to_string(),
            "device: cannot open cuda:1: DriverError(CUDA_ERROR_STUB_LIBRARY)"
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_says_how_to_get_one() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("device") && e.contains("build-cuda.sh"), "{e}");
    }
}
