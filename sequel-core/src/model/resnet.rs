//! Reduced ResNet-18 for 32×32 (or 28×28) inputs, as used for split CIFAR in GEM and Mammoth:
//! a 3×3 stem without max-pool (candle cannot back-propagate a 3×3 stride-2 pool), four stages of
//! two basic blocks with widths `nf, 2nf, 4nf, 8nf`, global average pooling and a linear head.
//! `nf = 64` is the standard network, `nf = 20` the reduced one.
//!
//! Depths: the stem is 1, each basic block's two convolutions are consecutive depths (2..=17), a
//! shortcut projection shares the depth of its block's first convolution, the head is 18.

use candle_core::{Device, Tensor};

use super::kernels;
use super::layers::{BatchNorm2d, Conv2d, Head};
use super::params::ParamSet;
use super::{Model, ModelOutput};
use crate::error::Result;

/// A batch norm, γ-Lipschitz ([`BatchNorm2d::lipschitz`]) or not.
fn bn(
    params: &mut ParamSet,
    name: &str,
    depth: usize,
    c: usize,
    lipschitz: bool,
    device: &Device,
) -> Result<BatchNorm2d> {
    if lipschitz {
        BatchNorm2d::lipschitz(params, name, depth, c, device)
    } else {
        BatchNorm2d::new(params, name, depth, c, device)
    }
}
use crate::rng::{SeededRng, Stream};

#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    shortcut: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        params: &mut ParamSet,
        name: &str,
        depth: usize,
        c_in: usize,
        c_out: usize,
        stride: usize,
        lipschitz: bool,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let conv1 = Conv2d::new(
            params,
            &format!("{name}.conv1"),
            depth,
            (c_in, c_out, 3),
            stride,
            1,
            false,
            rng,
            device,
        )?;
        let bn1 = bn(
            params,
            &format!("{name}.bn1"),
            depth,
            c_out,
            lipschitz,
            device,
        )?;
        let conv2 = Conv2d::new(
            params,
            &format!("{name}.conv2"),
            depth + 1,
            (c_out, c_out, 3),
            1,
            1,
            false,
            rng,
            device,
        )?;
        let bn2 = bn(
            params,
            &format!("{name}.bn2"),
            depth + 1,
            c_out,
            lipschitz,
            device,
        )?;
        let shortcut = if stride != 1 || c_in != c_out {
            let conv = Conv2d::new(
                params,
                &format!("{name}.shortcut.conv"),
                depth,
                (c_in, c_out, 1),
                stride,
                0,
                false,
                rng,
                device,
            )?;
            let sbn = bn(
                params,
                &format!("{name}.shortcut.bn"),
                depth,
                c_out,
                lipschitz,
                device,
            )?;
            Some((conv, sbn))
        } else {
            None
        };
        Ok(Self {
            conv1,
            bn1,
            conv2,
            bn2,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.bn1.forward_act(&self.conv1.forward(x)?, train, true)?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?, train)?;
        let s = match &self.shortcut {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        kernels::add_relu(&h, &s)
    }
}

#[derive(Debug)]
pub struct ResNet18 {
    input: [usize; 3],
    nf: usize,
    lipschitz: bool,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<Block>,
    head: Head,
    params: ParamSet,
}

impl ResNet18 {
    pub fn new(
        input: [usize; 3],
        nf: usize,
        heads: &[usize],
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        Self::with_norm(input, nf, heads, false, rng, device)
    }

    /// [`ResNet18::new`], with γ-Lipschitz batch norms ([`BatchNorm2d::lipschitz`]) where
    /// `lipschitz` (`model.lipschitz_bn`). The convolutions draw the same initial values.
    pub fn with_norm(
        input: [usize; 3],
        nf: usize,
        heads: &[usize],
        lipschitz: bool,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let mut params = ParamSet::new();
        let stem = Conv2d::new(
            &mut params,
            "stem.conv",
            1,
            (input[0], nf, 3),
            1,
            1,
            false,
            rng,
            device,
        )?;
        let stem_bn = bn(&mut params, "stem.bn", 1, nf, lipschitz, device)?;
        let mut blocks = Vec::new();
        let mut c_in = nf;
        let mut depth = 2;
        for (stage, mult) in [1usize, 2, 4, 8].into_iter().enumerate() {
            let c_out = nf * mult;
            for b in 0..2 {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let name = format!("layer{}.{}", stage + 1, b);
                blocks.push(Block::new(
                    &mut params,
                    &name,
                    depth,
                    c_in,
                    c_out,
                    stride,
                    lipschitz,
                    rng,
                    device,
                )?);
                c_in = c_out;
                depth += 2;
            }
        }
        let head = Head::new(&mut params, depth, c_in, heads, rng, device)?;
        Ok(Self {
            input,
            nf,
            lipschitz,
            stem,
            stem_bn,
            blocks,
            head,
            params,
        })
    }
}

impl Model for ResNet18 {
    fn forward(&self, x: &Tensor, train: bool) -> Result<ModelOutput> {
        let mut h = self
            .stem_bn
            .forward_act(&self.stem.forward(x)?, train, true)?;
        for b in &self.blocks {
            h = b.forward(&h, train)?;
        }
        let features = kernels::global_avg_pool(&h)?;
        let logits = self.head.forward(&features)?;
        Ok(ModelOutput { features, logits })
    }

    fn params(&self) -> &ParamSet {
        &self.params
    }

    fn fork(&self) -> Result<Box<dyn Model>> {
        // Batch-norm running statistics are part of the snapshot, so the fork evaluates alike.
        let copy = ResNet18::with_norm(
            self.input,
            self.nf,
            &self.head.sizes(),
            self.lipschitz,
            &mut SeededRng::new(0, Stream::Init),
            self.head.device(),
        )?;
        copy.params.restore(&self.params.snapshot()?)?;
        Ok(Box::new(copy))
    }
}
