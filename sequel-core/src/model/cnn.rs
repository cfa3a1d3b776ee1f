//! A small CNN: `[conv3×3 (pad 1) → ReLU → max-pool 2×2]*` then a linear head.
//! Pooling is our own 2×2 max-pool (candle's `max_pool2d` backward is wrong, see `layers.rs`),
//! fused with the ReLU before it on the CPU (`kernels::max_pool2x2_relu`).

use candle_core::{Device, Tensor};

use super::kernels::max_pool2x2_relu;
use super::layers::{Conv2d, Head};
use super::params::ParamSet;
use super::{Model, ModelOutput};
use crate::error::{Error, Result};
use crate::rng::{SeededRng, Stream};

#[derive(Debug)]
pub struct Cnn {
    input: [usize; 3],
    channels: Vec<usize>,
    convs: Vec<Conv2d>,
    head: Head,
    params: ParamSet,
}

impl Cnn {
    pub fn new(
        input: [usize; 3],
        channels: &[usize],
        heads: &[usize],
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let [mut c, mut h, mut w] = input;
        let mut params = ParamSet::new();
        let mut convs = Vec::new();
        for (i, &out) in channels.iter().enumerate() {
            convs.push(Conv2d::new(
                &mut params,
                &format!("conv{}", i + 1),
                i + 1,
                (c, out, 3),
                1,
                1,
                true,
                rng,
                device,
            )?);
            c = out;
            h /= 2;
            w /= 2;
            if h == 0 || w == 0 {
                return Err(Error::msg(format!(
                    "model.channels: {} conv blocks halve a {}×{} input to nothing; use fewer",
                    channels.len(),
                    input[1],
                    input[2]
                )));
            }
        }
        let head = Head::new(
            &mut params,
            channels.len() + 1,
            c * h * w,
            heads,
            rng,
            device,
        )?;
        Ok(Self {
            input,
            channels: channels.to_vec(),
            convs,
            head,
            params,
        })
    }
}

impl Model for Cnn {
    fn forward(&self, x: &Tensor, _train: bool) -> Result<ModelOutput> {
        let mut h = x.clone();
        for conv in &self.convs {
            h = max_pool2x2_relu(&conv.forward(&h)?)?;
        }
        let features = h.flatten_from(1)?;
        let logits = self.head.forward(&features)?;
        Ok(ModelOutput { features, logits })
    }

    fn params(&self) -> &ParamSet {
        &self.params
    }

    fn fork(&self) -> Result<Box<dyn Model>> {
        let copy = Cnn::new(
            self.input,
            &self.channels,
            &self.head.sizes(),
            &mut SeededRng::new(0, Stream::Init),
            self.head.device(),
        )?;
        copy.params.restore(&self.params.snapshot()?)?;
        Ok(Box::new(copy))
    }
}
