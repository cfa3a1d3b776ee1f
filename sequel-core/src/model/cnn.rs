//! A small CNN: `[conv3×3 (pad 1) → ReLU → max-pool 2×2]*` then a linear head.
//! Pooling uses kernel = stride, the only case candle can back-propagate.

use candle_core::{Device, Tensor};

use super::layers::{Conv2d, Linear};
use super::params::{ParamSet, Role};
use super::{Model, ModelOutput};
use crate::error::{Error, Result};
use crate::rng::{SeededRng, Stream};

#[derive(Debug)]
pub struct Cnn {
    input: [usize; 3],
    channels: Vec<usize>,
    convs: Vec<Conv2d>,
    head: Linear,
    params: ParamSet,
}

impl Cnn {
    pub fn new(
        input: [usize; 3],
        channels: &[usize],
        outputs: usize,
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
        let head = Linear::new(
            &mut params,
            "head",
            channels.len() + 1,
            Role::Head,
            (c * h * w, outputs),
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
            h = conv.forward(&h)?.relu()?.max_pool2d(2)?;
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
            self.head.weight.dim(0)?,
            &mut SeededRng::new(0, Stream::Init),
            self.head.weight.device(),
        )?;
        copy.params.restore(&self.params.snapshot()?)?;
        Ok(Box::new(copy))
    }
}
