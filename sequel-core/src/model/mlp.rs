//! Multi-layer perceptron: `input → [Linear → activation → dropout]* → Linear head`.

use candle_core::{Device, Tensor};

use super::layers::{activate, Dropout, Head, Linear};
use super::params::{ParamSet, Role};
use super::{DenseForward, DenseTap, Model, ModelOutput};
use crate::config::ActivationKind;
use crate::error::Result;
use crate::rng::{SeededRng, Stream};

#[derive(Debug)]
pub struct Mlp {
    input: usize,
    widths: Vec<usize>,
    hidden: Vec<Linear>,
    head: Head,
    activation: ActivationKind,
    dropout: Dropout,
    params: ParamSet,
}

impl Mlp {
    /// `widths` are the hidden layer sizes; layer `i` (1-based) has depth `i`, the head depth `L`.
    pub fn new(
        input: usize,
        widths: &[usize],
        heads: &[usize],
        activation: ActivationKind,
        dropout: Dropout,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let mut params = ParamSet::new();
        let mut hidden = Vec::with_capacity(widths.len());
        let mut fan_in = input;
        for (i, &w) in widths.iter().enumerate() {
            hidden.push(Linear::new(
                &mut params,
                &format!("fc{}", i + 1),
                i + 1,
                Role::Body,
                (fan_in, w),
                rng,
                device,
            )?);
            fan_in = w;
        }
        let head = Head::new(&mut params, widths.len() + 1, fan_in, heads, rng, device)?;
        Ok(Self {
            input,
            widths: widths.to_vec(),
            hidden,
            head,
            activation,
            dropout,
            params,
        })
    }
}

impl Model for Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Result<ModelOutput> {
        let mut h = x.flatten_from(1)?;
        for layer in &self.hidden {
            h = activate(&layer.forward(&h)?, self.activation)?;
            h = self.dropout.forward(&h, train)?;
        }
        let logits = self.head.forward(&h)?;
        Ok(ModelOutput {
            features: h,
            logits,
        })
    }

    fn params(&self) -> &ParamSet {
        &self.params
    }

    fn dense_forward(&self, x: &Tensor) -> Result<Option<DenseForward>> {
        // Evaluation mode: dropout is the identity, so this is `forward(x, false)` with taps.
        let n = x.dim(0)?;
        let mut layers = Vec::with_capacity(self.hidden.len() + 1);
        let mut tapped = |layer: &Linear, a: &Tensor| -> Result<Tensor> {
            let tap = candle_core::Var::zeros((n, layer.weight.dim(0)?), a.dtype(), a.device())?;
            let z = (layer.forward(a)? + tap.as_tensor())?;
            layers.push(DenseTap {
                input: a.clone(),
                tap,
                weight: layer.weight.clone(),
                bias: layer.bias.clone(),
            });
            Ok(z)
        };
        let mut h = x.flatten_from(1)?;
        for layer in &self.hidden {
            h = activate(&tapped(layer, &h)?, self.activation)?;
        }
        let outs = self
            .head
            .layers()
            .iter()
            .map(|l| tapped(l, &h))
            .collect::<Result<Vec<_>>>()?;
        let logits = match outs.as_slice() {
            [one] => one.clone(),
            _ => Tensor::cat(&outs, 1)?,
        };
        Ok(Some(DenseForward { logits, layers }))
    }

    fn fork(&self) -> Result<Box<dyn Model>> {
        // Rebuild the architecture (the constructor is the one description of it), then copy
        // every value in; the throwaway init draws are overwritten.
        let copy = Mlp::new(
            self.input,
            &self.widths,
            &self.head.sizes(),
            self.activation,
            self.dropout.fork(),
            &mut SeededRng::new(0, Stream::Init),
            self.head.device(),
        )?;
        copy.params.restore(&self.params.snapshot()?)?;
        Ok(Box::new(copy))
    }

    fn rng_states(&self) -> Vec<crate::rng::RngState> {
        vec![self.dropout.rng_state()]
    }

    fn set_rng_states(&self, states: &[crate::rng::RngState]) -> Result<()> {
        match states {
            [s] => {
                self.dropout.set_rng_state(*s);
                Ok(())
            }
            _ => Err(crate::error::Error::msg(format!(
                "the MLP has one random stream (dropout), the checkpoint has {}",
                states.len()
            ))),
        }
    }
}
