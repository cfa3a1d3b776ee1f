//! Full training state after a task, for a bit-identical resume (`sequel run --resume`).
//!
//! After task `t` the trainer writes, into the run's `checkpoints/` folder:
//!
//! - `state-<t>.safetensors` — every tensor: the weights training continues from (`model.*`), the
//!   optimizer's buffers (`optim.*`), the algorithm's state (`algo.*`: buffers, Fishers, anchors,
//!   exemplars), and the consolidator's inputs (`cons.*`: θ₀, θ̄ₜ, kept task vectors);
//! - `state-<t>.json` — a first line with the CRC-32 of the rest, then JSON: the format version,
//!   the hash of the resolved config, the CRC-32 of the safetensors file, every random stream's
//!   position (data order, algorithm, consolidation, data augmentation, and the model's own
//!   streams such as dropout),
//!   and the results so far (accuracy rows, times, sampled log).
//!
//! The JSON is written last and is the commit record: a crash while writing leaves the previous
//! task's pair intact, and a truncated or altered file fails its checksum. Only the two newest
//! pairs are kept, so `--resume-from-task` can fall back one task when the newest is damaged.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::outcome::Results;
use crate::rng::RngState;
use crate::run::write_atomic;
use crate::state::StateDict;

/// Bump when the layout changes; older checkpoints are then refused with a clear message.
pub const FORMAT_VERSION: u32 = 2;

/// The non-tensor part of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    /// Tasks finished (the checkpoint is taken after task `tasks_done`).
    pub tasks_done: usize,
    /// Hash of the resolved config the run was started with.
    pub config_hash: String,
    /// CRC-32 of the safetensors file.
    pub tensors_crc32: u32,
    pub data_rng: RngState,
    pub algo_rng: RngState,
    pub consolidation_rng: RngState,
    pub model_rngs: Vec<RngState>,
    /// The data augmentation's stream (`augmentation:` with a crop or flip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment_rng: Option<RngState>,
    /// Number of task vectors kept for the consolidator.
    pub task_vectors: usize,
    pub has_initial: bool,
    pub has_previous: bool,
    pub results: Results,
    /// SHA-256 of the `model.init_from` file the run started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from_sha256: Option<String>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub meta: Meta,
    pub tensors: StateDict,
}

fn tensors_path(dir: &Path, t: usize) -> PathBuf {
    dir.join(format!("state-{t}.safetensors"))
}

fn meta_path(dir: &Path, t: usize) -> PathBuf {
    dir.join(format!("state-{t}.json"))
}

/// FNV-1a 64 of the resolved config text: a stable fingerprint (not a security hash).
pub fn config_hash(resolved_yaml: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in resolved_yaml.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Write the checkpoint of task `meta.tasks_done` into `dir`, then delete pairs older than the
/// previous task's.
pub fn save(dir: &Path, mut meta: Meta, tensors: &StateDict) -> Result<()> {
    let t = meta.tasks_done;
    let tpath = tensors_path(dir, t);
    let tmp = dir.join(format!(".state-{t}.safetensors.tmp"));
    candle_core::safetensors::save(tensors, &tmp)?;
    let bytes = std::fs::read(&tmp).map_err(|e| Error::io(&tmp, e))?;
    meta.tensors_crc32 = crc32fast::hash(&bytes);
    std::fs::rename(&tmp, &tpath).map_err(|e| Error::io(&tpath, e))?;
    let body = serde_json::to_string(&meta).map_err(|e| Error::msg(format!("checkpoint: {e}")))?;
    let text = format!("{:08x}\n{body}\n", crc32fast::hash(body.as_bytes()));
    write_atomic(&meta_path(dir, t), text.as_bytes())?;
    for old in 1..t.saturating_sub(1) {
        let _ = std::fs::remove_file(tensors_path(dir, old));
        let _ = std::fs::remove_file(meta_path(dir, old));
    }
    Ok(())
}

/// The tasks with a checkpoint record in `dir`, ascending.
pub fn available(dir: &Path) -> Vec<usize> {
    let mut v: Vec<usize> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("state-")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    v.sort_unstable();
    v
}

/// Load and verify the checkpoint taken after task `t`.
pub fn load(dir: &Path, t: usize) -> Result<Checkpoint> {
    let mpath = meta_path(dir, t);
    let corrupt = |what: &Path, why: &str| {
        // The damaged checkpoint is no way out: name only the others.
        let others: Vec<usize> = available(dir).into_iter().filter(|&k| k != t).collect();
        let fix = match others.last() {
            Some(k) => format!(
                "resume from an earlier one with --resume-from-task {k} (others: {others:?}), or \
                 start the run again"
            ),
            None => "there is no other checkpoint: start the run again".into(),
        };
        Error::Msg(format!(
            "checkpoint {} is damaged ({why}); {fix}",
            what.display()
        ))
    };
    let text = std::fs::read_to_string(&mpath).map_err(|e| Error::io(&mpath, e))?;
    let (crc, body) = text
        .split_once('\n')
        .ok_or_else(|| corrupt(&mpath, "no checksum line"))?;
    let body = body.strip_suffix('\n').unwrap_or(body);
    if u32::from_str_radix(crc.trim(), 16).ok() != Some(crc32fast::hash(body.as_bytes())) {
        return Err(corrupt(&mpath, "checksum mismatch"));
    }
    let meta: Meta = serde_json::from_str(body).map_err(|_| corrupt(&mpath, "unreadable"))?;
    if meta.version != FORMAT_VERSION {
        return Err(Error::Msg(format!(
            "checkpoint {} has format version {}, this sequel reads version {FORMAT_VERSION}; \
             start the run again",
            mpath.display(),
            meta.version
        )));
    }
    let tpath = tensors_path(dir, t);
    let bytes = std::fs::read(&tpath).map_err(|e| Error::io(&tpath, e))?;
    if crc32fast::hash(&bytes) != meta.tensors_crc32 {
        return Err(corrupt(&tpath, "checksum mismatch"));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|_| corrupt(&tpath, "unreadable"))?;
    Ok(Checkpoint { meta, tensors })
}

/// Dotted paths of the keys whose values differ between two YAML documents (for "the config
/// changed" errors).
pub fn yaml_differences(a: &serde_yaml::Value, b: &serde_yaml::Value) -> Vec<String> {
    fn walk(
        a: Option<&serde_yaml::Value>,
        b: Option<&serde_yaml::Value>,
        path: String,
        out: &mut Vec<String>,
    ) {
        use serde_yaml::Value::Mapping;
        match (a, b) {
            (Some(Mapping(x)), Some(Mapping(y))) => {
                let mut keys: Vec<String> = x
                    .keys()
                    .chain(y.keys())
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(x.get(k.as_str()), y.get(k.as_str()), p, out);
                }
            }
            (x, y) if x != y => out.push(path),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(Some(a), Some(b), String::new(), &mut out);
    out
}
