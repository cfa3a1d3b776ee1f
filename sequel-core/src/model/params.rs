//! Named parameters with layer depth and role, in a fixed order.
//!
//! candle's `VarMap` iterates in HashMap order, which would make flattened-gradient methods,
//! global top-k merging and checkpoints depend on the run. Here parameters live in a `Vec` in
//! construction order, each with a stable dotted name, the depth `l ∈ 1..=L` of its layer (input
//! side = 1), and a role.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a tensor is for; merging and regularisers treat roles differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Trainable weights of the feature extractor.
    Body,
    /// Trainable weights of the classifier head.
    Head,
    /// Running statistics of a normalisation layer: state, never trained by gradient.
    NormStat,
}

#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub depth: usize,
    pub role: Role,
    /// For a multi-head model: the task whose head this tensor belongs to.
    pub head: Option<usize>,
    /// For a PaLoRA adapter tensor (`Aₜ` or `Bₜ`, see [`crate::model::lora`]): its task `t`.
    pub adapter: Option<usize>,
    pub var: Var,
    /// Set by `model.freeze`: the tensor is not trained. Shared with the layer that owns the
    /// tensor where the layer must know (a frozen batch norm keeps its running statistics).
    frozen: Arc<AtomicBool>,
}

impl Param {
    /// Whether the optimizer, the regularisers and the merging strategies treat this tensor as a
    /// weight: not a normalisation statistic, not frozen.
    pub fn trainable(&self) -> bool {
        self.role != Role::NormStat && !self.is_frozen()
    }

    /// Frozen by `model.freeze` ([`ParamSet::freeze`]).
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }
}

/// The ordered parameters of a model.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    params: Vec<Param>,
}

/// Detached copies of every tensor of a [`ParamSet`], in its order.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub tensors: Vec<Tensor>,
}

impl ParamSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, name: impl Into<String>, depth: usize, role: Role, var: Var) {
        self.push_with_flag(name, depth, role, var, Arc::default());
    }

    /// [`Self::push`], with the frozen flag shared with the layer that owns `var` (which reads it
    /// in its forward pass).
    pub fn push_with_flag(
        &mut self,
        name: impl Into<String>,
        depth: usize,
        role: Role,
        var: Var,
        frozen: Arc<AtomicBool>,
    ) {
        self.params.push(Param {
            name: name.into(),
            depth,
            role,
            head: None,
            adapter: None,
            var,
            frozen,
        });
    }

    /// Freeze every tensor whose name is one of `prefixes` or lies under one (`layer1` freezes
    /// `layer1.0.conv1.weight`, not `layer10.…`): it is no longer trained, and a frozen batch
    /// norm normalises with its running statistics and never updates them. Returns how many
    /// tensors were frozen.
    ///
    /// # Errors
    /// A prefix that names no tensor (the message lists the model's top-level layer names).
    pub fn freeze(&self, prefixes: &[String]) -> Result<usize> {
        let under = |name: &str, prefix: &str| {
            name == prefix
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        for prefix in prefixes {
            if !self.params.iter().any(|p| under(&p.name, prefix)) {
                let mut layers: Vec<&str> = self
                    .params
                    .iter()
                    .map(|p| p.name.split('.').next().unwrap_or(""))
                    .collect();
                layers.dedup();
                return Err(Error::msg(format!(
                    "`{prefix}` names no tensor of this backbone; its layers are {} (a prefix \
                     such as `layer1` or `layer1.0` freezes everything under it)",
                    layers.join(", ")
                )));
            }
        }
        let mut n = 0;
        for p in &self.params {
            if prefixes.iter().any(|prefix| under(&p.name, prefix)) {
                p.frozen.store(true, Ordering::Relaxed);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Mark the last `count` tensors pushed as belonging to task `head`'s output head.
    pub fn tag_last_as_head(&mut self, count: usize, head: usize) {
        let n = self.params.len();
        for p in &mut self.params[n.saturating_sub(count)..] {
            p.head = Some(head);
        }
    }

    /// Mark the last `count` tensors pushed as adapter tensors of task `t`.
    pub fn tag_last_as_adapter(&mut self, count: usize, t: usize) {
        let n = self.params.len();
        for p in &mut self.params[n.saturating_sub(count)..] {
            p.adapter = Some(t);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    /// `self`'s parameters followed by `other`'s (the same `Var`s, not copies): the set an
    /// optimizer steps when an algorithm owns parameters of its own.
    pub fn joined(&self, other: &ParamSet) -> ParamSet {
        let mut params = self.params.clone();
        params.extend(other.params.iter().cloned());
        ParamSet { params }
    }

    /// Parameters that receive gradients.
    pub fn trainable(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.trainable())
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The number of layers `L` (largest depth).
    pub fn max_depth(&self) -> usize {
        self.params.iter().map(|p| p.depth).max().unwrap_or(0)
    }

    /// Number of scalar trainable weights.
    pub fn num_trainable(&self) -> usize {
        self.trainable().map(|p| p.var.elem_count()).sum()
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        let tensors = self
            .params
            .iter()
            .map(|p| p.var.as_tensor().copy().map(|t| t.detach()))
            .collect::<candle_core::Result<_>>()?;
        Ok(Snapshot { tensors })
    }

    /// Write a snapshot's values back into the parameters.
    pub fn restore(&self, s: &Snapshot) -> Result<()> {
        if s.tensors.len() != self.params.len() {
            return Err(Error::msg(format!(
                "snapshot has {} tensors, model has {}",
                s.tensors.len(),
                self.params.len()
            )));
        }
        // Check every shape before writing anything, so a bad snapshot never half-loads.
        for (p, t) in self.params.iter().zip(&s.tensors) {
            if p.var.shape() != t.shape() {
                return Err(Error::msg(format!(
                    "snapshot tensor for `{}` has shape {:?}, expected {:?}",
                    p.name,
                    t.dims(),
                    p.var.dims()
                )));
            }
        }
        for (p, t) in self.params.iter().zip(&s.tensors) {
            p.var.set(t)?;
        }
        Ok(())
    }

    /// Name → tensor, for safetensors files.
    pub fn to_named(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    /// Load named tensors; every parameter must be present with its shape.
    pub fn load_named(&self, map: &HashMap<String, Tensor>) -> Result<()> {
        let mut found = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let t = map
                .get(&p.name)
                .ok_or_else(|| Error::msg(format!("missing tensor `{}`", p.name)))?;
            if t.shape() != p.var.shape() {
                return Err(Error::msg(format!(
                    "tensor `{}` has shape {:?}, expected {:?}",
                    p.name,
                    t.dims(),
                    p.var.dims()
                )));
            }
            found.push(t);
        }
        for (p, t) in self.params.iter().zip(found) {
            p.var.set(t)?;
        }
        Ok(())
    }

    /// Gradients of the trainable parameters, in order; `None` for a parameter the loss does not reach.
    pub fn grads<'a>(
        &'a self,
        grads: &'a GradStore,
    ) -> impl Iterator<Item = (&'a Param, Option<&'a Tensor>)> {
        self.trainable()
            .map(move |p| (p, grads.get(p.var.as_tensor())))
    }
}

/// A snapshot is saved as the list of its tensors.
impl crate::state::Persist for Snapshot {
    fn save(&self, key: &str, out: &mut crate::state::StateDict) -> Result<()> {
        self.tensors.save(key, out)
    }
    fn load(key: &str, from: &crate::state::StateDict) -> Result<Self> {
        Ok(Self {
            tensors: Vec::load(key, from)?,
        })
    }
    fn present(key: &str, from: &crate::state::StateDict) -> bool {
        <Vec<Tensor> as crate::state::Persist>::present(key, from)
    }
}
