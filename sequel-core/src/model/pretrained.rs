//! `model.init_from` and `model.freeze`: start a backbone from saved weights and keep some of its
//! layers fixed — the pre-trained θ₀ that LiNeS and task-vector merging were designed around
//! (Wang et al., "LiNeS", ICLR 2025; Ilharco et al., "Editing models with task arithmetic",
//! ICLR 2023).
//!
//! Accepted files (safetensors):
//! - a sequel-rs run's `checkpoints/task-<t>.safetensors` (the model's own tensor names);
//! - a sequel-rs checkpoint `state-<t>.safetensors` (its `model.*` tensors; the rest is ignored);
//! - for `kind: resnet18`, a ResNet-18 saved with torchvision, timm or Mammoth names, mapped as
//!   [`resnet18_name`] says (`num_batches_tracked` is dropped). The network must have this
//!   library's CIFAR-style stem (3×3 convolution, no max-pool): an ImageNet ResNet-18's 7×7 stem
//!   is refused by the shape check, naming the tensor.
//!
//! Every body tensor of the model must be in the file with its shape, and every tensor of the
//! file must be used (a head the model does not load is skipped), so a wrong architecture never
//! half-loads: nothing is written until everything has been checked. One exception: a file with
//! no DWA weights (`dwa<i>.alpha`) loads into a model with `model.dwa`, whose weights stay at
//! the identity (DenseFormer's point that DWA can be inserted into a trained network); a file
//! with some DWA weights must have them all.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::config::{InitHead, ModelConfig, ModelKind};
use crate::error::{Error, Result};
use crate::model::{Model, Role};

/// SHA-256 of the file at `path`, lower-case hex: the identity of a `model.init_from` file,
/// recorded in summary.json and checked on resume.
///
/// # Errors
/// The file cannot be read.
pub fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Load `cfg.init_from` into `model` (if set), then freeze `cfg.freeze`. Errors name the key and,
/// for a tensor, the tensor.
pub fn apply(model: &dyn Model, cfg: &ModelConfig) -> Result<()> {
    if let Some(path) = &cfg.init_from {
        load(model, cfg, path).map_err(|e| at("model.init_from", e))?;
    }
    if !cfg.freeze.is_empty() {
        model
            .params()
            .freeze(&cfg.freeze)
            .map_err(|e| at("model.freeze", e))?;
    }
    Ok(())
}

/// `e` as an error of the key `path`, unless it already names its key.
fn at(path: &str, e: Error) -> Error {
    match e {
        Error::Config { .. } => e,
        other => Error::Config {
            file: String::new(),
            path: path.into(),
            message: other.to_string(),
        },
    }
}

/// `model.lipschitz_bn` replaces each batch norm's per-channel `weight` by one `log_gamma`, so
/// the two kinds of norm do not load into each other. Said in one line naming the option,
/// before the per-tensor checks would name a missing tensor instead.
fn check_norms(model: &dyn Model, file: &HashMap<String, Tensor>, shown: &str) -> Result<()> {
    let params = model.params();
    let has = |name: &str| params.iter().any(|p| p.name == name);
    for p in params.iter() {
        let Some(bn) = p.name.strip_suffix(".running_var") else {
            continue;
        };
        let (gamma, log_gamma) = (format!("{bn}.weight"), format!("{bn}.log_gamma"));
        let (ours, theirs, kind, fix) = if has(&log_gamma) {
            (
                log_gamma,
                gamma,
                "γ-Lipschitz batch norms (one `log_gamma` each, no per-channel `weight`)",
                "a torchvision, timm or Mammoth ResNet-18, or a run without the option, cannot \
                 start them; leave out `model.lipschitz_bn`, or give `model.init_from` a \
                 sequel-rs file trained with `lipschitz_bn: true`",
            )
        } else {
            (
                gamma,
                log_gamma,
                "plain batch norms (a per-channel `weight` each)",
                "set `model.lipschitz_bn: true` to load it",
            )
        };
        if !file.contains_key(&ours) && file.contains_key(&theirs) {
            return Err(Error::Config {
                file: String::new(),
                path: "model.lipschitz_bn".into(),
                message: format!(
                    "this backbone has {kind}, but `model.init_from` `{shown}` has `{theirs}` \
                     in place of `{ours}`: {fix}"
                ),
            });
        }
    }
    Ok(())
}

fn load(model: &dyn Model, cfg: &ModelConfig, path: &Path) -> Result<()> {
    let shown = path.display();
    if !path.is_file() {
        return Err(Error::msg(format!(
            "`{shown}` is not a file (a relative path is taken from the working directory)"
        )));
    }
    let raw = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| Error::msg(format!("`{shown}` is not a safetensors file: {e}")))?;
    let file = canonical_names(raw, &cfg.kind);
    check_norms(model, &file, &shown.to_string())?;
    let params = model.params();
    let is_head = |role: Role, head: Option<usize>| role == Role::Head || head.is_some();
    let mut staged = Vec::new();
    let mut used = std::collections::HashSet::new();
    // A file without DWA weights (a plain network) leaves the model's at their identity
    // initialisation, with which the model computes the file's network.
    let file_has_dwa = file.keys().any(|k| is_dwa(k));
    for p in params.iter() {
        let head = is_head(p.role, p.head);
        if (head && cfg.init_head == InitHead::Fresh) || (is_dwa(&p.name) && !file_has_dwa) {
            continue;
        }
        // A backbone pre-trained without PaLoRA adapters gets fresh ones (B = 0: unchanged).
        if p.adapter.is_some() && !file.contains_key(&p.name) {
            continue;
        }
        let t = file.get(&p.name).ok_or_else(|| {
            Error::msg(format!(
                "`{shown}` has no tensor `{}` (shape {:?}) of this {} backbone{}",
                p.name,
                p.var.dims(),
                cfg.kind.name(),
                if head {
                    "; with `init_head: fresh` the head is not loaded"
                } else {
                    ""
                }
            ))
        })?;
        if t.dims() != p.var.dims() {
            return Err(Error::msg(format!(
                "`{shown}`: tensor `{}` has shape {:?}, this backbone's has {:?}{}",
                p.name,
                t.dims(),
                p.var.dims(),
                if head {
                    " (a head for other classes: use `init_head: fresh`)"
                } else {
                    " (check model.kind, model.width/hidden/channels against the file)"
                }
            )));
        }
        used.insert(p.name.as_str());
        staged.push((p, t));
    }
    let head_names: Vec<&str> = params
        .iter()
        .filter(|p| is_head(p.role, p.head))
        .map(|p| p.name.as_str())
        .collect();
    let mut unused: Vec<&String> = file
        .keys()
        .filter(|k| !used.contains(k.as_str()))
        // A file's head is skipped with `init_head: fresh`, whatever its classes.
        .filter(|k| !(cfg.init_head == InitHead::Fresh && is_head_name(k, &head_names)))
        .collect();
    unused.sort();
    if let Some(first) = unused.first() {
        return Err(Error::msg(format!(
            "`{shown}` has {} tensor(s) this {} backbone does not have, e.g. `{first}`: is it \
             a checkpoint of another architecture?",
            unused.len(),
            cfg.kind.name()
        )));
    }
    for (p, t) in staged {
        let t = t.to_dtype(DType::F32)?.to_device(p.var.device())?;
        p.var.set(&t)?;
    }
    Ok(())
}

/// Whether `name` is a DWA weight of the MLP or the ResNet-18 (`dwa<i>.alpha`).
fn is_dwa(name: &str) -> bool {
    name.strip_prefix("dwa")
        .and_then(|rest| rest.strip_suffix(".alpha"))
        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` is a classifier-head tensor, of this model or of a file saved with another
/// head (`head.*`, sequel-rs multi-head `head.<t>.*`).
fn is_head_name(name: &str, model_heads: &[&str]) -> bool {
    model_heads.contains(&name) || name.starts_with("head.")
}

/// The file's tensors under this library's names: a checkpoint's `model.*` tensors without the
/// prefix, everything else as stored; ResNet-18 names of other libraries mapped for `resnet18`.
fn canonical_names(raw: HashMap<String, Tensor>, kind: &ModelKind) -> HashMap<String, Tensor> {
    let checkpoint = raw.keys().any(|k| k.starts_with("model."));
    raw.into_iter()
        .filter_map(|(k, t)| {
            let k = if checkpoint {
                k.strip_prefix("model.")?.to_string()
            } else {
                k
            };
            if k.ends_with(".num_batches_tracked") {
                return None;
            }
            Some(match kind {
                ModelKind::Resnet18 => (resnet18_name(&k), t),
                _ => (k, t),
            })
        })
        .collect()
}

/// A ResNet-18 tensor name of torchvision/timm (`conv1`, `bn1`, `layerS.B.downsample.{0,1}`,
/// `fc`) or Mammoth (`layerS.B.shortcut.{0,1}`, `linear`/`classifier`) as this library names it
/// (`stem.conv`, `stem.bn`, `layerS.B.shortcut.{conv,bn}`, `head`). Names already in this
/// library's form are unchanged.
pub fn resnet18_name(name: &str) -> String {
    for (from, to) in [
        ("conv1.", "stem.conv."),
        ("bn1.", "stem.bn."),
        ("fc.", "head."),
        ("linear.", "head."),
        ("classifier.", "head."),
    ] {
        if let Some(rest) = name.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    name.replace(".downsample.0.", ".shortcut.conv.")
        .replace(".downsample.1.", ".shortcut.bn.")
        .replace(".shortcut.0.", ".shortcut.conv.")
        .replace(".shortcut.1.", ".shortcut.bn.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet18_names_of_other_libraries_map_to_ours() {
        for (theirs, ours) in [
            ("conv1.weight", "stem.conv.weight"),
            ("bn1.running_var", "stem.bn.running_var"),
            ("layer1.0.conv1.weight", "layer1.0.conv1.weight"),
            ("layer2.0.bn2.bias", "layer2.0.bn2.bias"),
            (
                "layer3.0.downsample.0.weight",
                "layer3.0.shortcut.conv.weight",
            ),
            (
                "layer3.0.downsample.1.running_mean",
                "layer3.0.shortcut.bn.running_mean",
            ),
            ("layer4.0.shortcut.1.weight", "layer4.0.shortcut.bn.weight"),
            ("fc.weight", "head.weight"),
            ("linear.bias", "head.bias"),
            ("stem.conv.weight", "stem.conv.weight"),
        ] {
            assert_eq!(resnet18_name(theirs), ours);
        }
    }
}
