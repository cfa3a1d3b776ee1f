//! `two-layer`: a user backbone registered beside the built-in ones (`Registry::add_backbone`),
//! `x → Linear → ReLU → head`. Its one key, `width`, goes under `model.options`.

use candle_core::Tensor;
use sequel_core::model::layers::{Head, Linear};
use sequel_core::model::{ParamSet, Role};
use sequel_core::rng::SeededRng;
use sequel_core::{BackboneConfig, BackboneSpec, Model, ModelOutput, Result};
use serde::{Deserialize, Serialize};

/// `model: { kind: two-layer, options: { width: 32 } }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwoLayerConfig {
    /// Hidden units.
    pub width: usize,
}

impl Default for TwoLayerConfig {
    fn default() -> Self {
        Self { width: 32 }
    }
}

impl BackboneConfig for TwoLayerConfig {
    const NAME: &'static str = "two-layer";
    const SUMMARY: &'static str = "one hidden ReLU layer (model.options.width)";
    fn build(self, spec: &BackboneSpec, init: &mut SeededRng) -> Result<Box<dyn Model>> {
        if self.width == 0 {
            return Err(sequel_core::Error::msg(
                "model.options.width must be at least 1",
            ));
        }
        let mut params = ParamSet::new();
        let fan_in = spec.input.iter().product();
        // Depths 1 (hidden) and 2 (head): what LiNeS and the merging strategies scale by.
        let hidden = Linear::new(
            &mut params,
            "fc1",
            1,
            Role::Body,
            (fan_in, self.width),
            init,
            spec.device,
        )?;
        let head = Head::new(&mut params, 2, self.width, spec.heads, init, spec.device)?;
        Ok(Box::new(TwoLayer {
            hidden,
            head,
            params,
        }))
    }
}

pub struct TwoLayer {
    hidden: Linear,
    head: Head,
    params: ParamSet,
}

impl Model for TwoLayer {
    fn forward(&self, x: &Tensor, _train: bool) -> Result<ModelOutput> {
        let features = self.hidden.forward(&x.flatten_from(1)?)?.relu()?;
        let logits = self.head.forward(&features)?;
        Ok(ModelOutput { features, logits })
    }

    fn params(&self) -> &ParamSet {
        &self.params
    }
}
