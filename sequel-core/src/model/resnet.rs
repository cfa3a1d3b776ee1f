//! Reduced ResNet-18 for 32×32 (or 28×28) inputs, as used for split CIFAR in GEM and Mammoth:
//! a 3×3 stem without max-pool (candle cannot back-propagate a 3×3 stride-2 pool), four stages of
//! two basic blocks with widths `nf, 2nf, 4nf, 8nf`, global average pooling and a linear head.
//! `nf = 64` is the standard network, `nf = 20` the reduced one.
//!
//! Depths: the stem is 1, each basic block's two convolutions are consecutive depths (2..=17), a
//! shortcut projection shares the depth of its block's first convolution, the head is 18.
//!
//! Options ([`ResNetOptions`]): γ-Lipschitz batch norms, and DenseFormer's depth-weighted
//! averaging between the basic blocks, within each stage ([`ResNet18::with_options`]).

use candle_core::{Device, Tensor, Var};

use super::kernels;
use super::layers::{BatchNorm2d, Conv2d, Head};
use super::params::{ParamSet, Role};
use super::{Model, ModelOutput};
use crate::config::DwaConfig;
use crate::error::Result;
use crate::rng::{SeededRng, Stream};

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

/// The ResNet-18's optional parts. The default is the plain network.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResNetOptions {
    /// γ-Lipschitz batch norms ([`BatchNorm2d::lipschitz`], `model.lipschitz_bn`).
    pub lipschitz_bn: bool,
    /// Depth-weighted averaging (DenseFormer) between the basic blocks (`model.dwa`).
    pub dwa: Option<DwaConfig>,
}

#[derive(Debug)]
pub struct ResNet18 {
    input: [usize; 3],
    nf: usize,
    options: ResNetOptions,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<Block>,
    /// DWA weights after each basic block (`None` where the block has no average).
    alphas: Vec<Option<Var>>,
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
        Self::with_options(input, nf, heads, ResNetOptions::default(), rng, device)
    }

    /// [`ResNet18::new`] with its optional parts. Their parameters are constants (`log γ` = 0,
    /// the DWA weights at the identity), so the convolutions and the head draw the same initial
    /// values as the plain network of the same seed.
    ///
    /// DWA (Pagliardini et al., NeurIPS 2024) needs outputs of one shape, and a ResNet's stages
    /// change it (stride 2, channels doubled), so it averages within a stage. Number the outputs
    /// by position: `X₀` the stem's, `Xᵢ` basic block `i`'s (1..=8). A block whose shortcut is a
    /// projection (the first of stages 2–4) starts a new shape: its output is its stage's first
    /// term, as the stem's is stage 1's, and it has no average. Every other block `i` with
    /// `i mod p = 0` is followed by `Yᵢ = Σ αᵢⱼ Xⱼ` over the earlier positions `j ≤ i` of its
    /// stage with `j ≡ i (mod k)`, which the next block (or the pooling before the head) reads
    /// instead of `Xᵢ`; `αᵢᵢ = 1`, the others 0 at initialisation. As in the MLP the terms are
    /// the blocks' outputs, not earlier averages. `α` after block `i` is the tensor
    /// `dwa<i>.alpha`, at the depth of the block's second convolution (`2i + 1`).
    pub fn with_options(
        input: [usize; 3],
        nf: usize,
        heads: &[usize],
        options: ResNetOptions,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let lipschitz = options.lipschitz_bn;
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
        let mut alphas = Vec::new();
        let mut c_in = nf;
        let mut depth = 2;
        let mut start = 0; // position of the current stage's first output
        for (stage, mult) in [1usize, 2, 4, 8].into_iter().enumerate() {
            let c_out = nf * mult;
            for b in 0..2 {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let name = format!("layer{}.{}", stage + 1, b);
                let block = Block::new(
                    &mut params,
                    &name,
                    depth,
                    c_in,
                    c_out,
                    stride,
                    lipschitz,
                    rng,
                    device,
                )?;
                let i = blocks.len() + 1;
                if block.shortcut.is_some() {
                    start = i;
                }
                alphas.push(match options.dwa {
                    Some(d) if i > start && i % d.period == 0 => {
                        let taken = (i - start) / d.dilation + 1; // j = i, i − k, …, ≥ start
                        let mut a = vec![0f32; taken];
                        a[taken - 1] = 1.0; // ascending j: the last is j = i
                        let alpha = Var::from_tensor(&Tensor::from_vec(a, taken, device)?)?;
                        params.push(
                            format!("dwa{i}.alpha"),
                            depth + 1,
                            Role::Body,
                            alpha.clone(),
                        );
                        Some(alpha)
                    }
                    _ => None,
                });
                blocks.push(block);
                c_in = c_out;
                depth += 2;
            }
        }
        let head = Head::new(&mut params, depth, c_in, heads, rng, device)?;
        Ok(Self {
            input,
            nf,
            options,
            stem,
            stem_bn,
            blocks,
            alphas,
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
        // With DWA: the block outputs of the current stage, from position `start` on.
        let (mut stage, mut start) = (Vec::new(), 0);
        if self.options.dwa.is_some() {
            stage.push(h.clone());
        }
        for (b, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, train)?;
            let Some(dwa) = self.options.dwa else {
                continue;
            };
            let i = b + 1;
            if block.shortcut.is_some() {
                (stage, start) = (Vec::new(), i);
            }
            stage.push(h.clone());
            if let Some(alpha) = &self.alphas[b] {
                let taken: Vec<&Tensor> = (start..=i)
                    .filter(|j| (i - j) % dwa.dilation == 0)
                    .map(|j| &stage[j - start])
                    .collect();
                let stacked = Tensor::stack(&taken, 0)?;
                let w = alpha.as_tensor().reshape((taken.len(), 1, 1, 1, 1))?;
                h = stacked.broadcast_mul(&w)?.sum(0)?;
            }
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
        let copy = ResNet18::with_options(
            self.input,
            self.nf,
            &self.head.sizes(),
            self.options,
            &mut SeededRng::new(0, Stream::Init),
            self.head.device(),
        )?;
        copy.params.restore(&self.params.snapshot()?)?;
        Ok(Box::new(copy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resnet(dwa: Option<(usize, usize)>) -> ResNet18 {
        let options = ResNetOptions {
            dwa: dwa.map(|(dilation, period)| DwaConfig { dilation, period }),
            ..ResNetOptions::default()
        };
        let mut rng = SeededRng::new(3, Stream::Init);
        ResNet18::with_options([3, 8, 8], 4, &[5], options, &mut rng, &Device::Cpu).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn input() -> Tensor {
        let mut rng = SeededRng::new(9, Stream::Init);
        let v: Vec<f32> = (0..2 * 3 * 8 * 8).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, (2, 3, 8, 8), &Device::Cpu).unwrap()
    }

    fn loss(m: &ResNet18, x: &Tensor, train: bool) -> (Tensor, candle_core::backprop::GradStore) {
        let logits = m.forward(x, train).unwrap().logits;
        let g = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (logits, g)
    }

    /// At initialisation (α = identity) a DWA ResNet computes exactly the plain one: the same
    /// seeded tensors, the same logits bit for bit in evaluation and training, and in training
    /// the same gradient of every tensor the plain network has and the same running statistics
    /// afterwards, so one training step moves both alike — for several dilations and periods.
    #[test]
    fn dwa_at_initialisation_is_the_plain_resnet_bit_for_bit() {
        let x = input();
        for (k, p) in [(1, 1), (2, 1), (1, 2), (2, 3)] {
            for train in [false, true] {
                let (plain, with) = (resnet(None), resnet(Some((k, p))));
                assert!(with.params().len() > plain.params().len());
                let (a, ga) = loss(&plain, &x, train);
                let (b, gb) = loss(&with, &x, train);
                assert_eq!(bits(&a), bits(&b), "k {k} p {p} train {train}");
                for q in plain.params().iter() {
                    let r = with.params().iter().find(|r| r.name == q.name).unwrap();
                    assert_eq!(bits(&q.var), bits(&r.var), "{}", q.name);
                    match (ga.get(&q.var), gb.get(&r.var)) {
                        (Some(u), Some(v)) => assert_eq!(bits(u), bits(v), "∂{}", q.name),
                        (u, v) => assert_eq!(u.is_none(), v.is_none(), "∂{}", q.name),
                    }
                }
            }
        }
    }

    /// The averages sit where the stage rule says, each α gets a gradient, and a moved α
    /// changes the output; a fork computes the same.
    #[test]
    fn dwa_weights_follow_the_stages_are_trained_and_used() {
        let m = resnet(Some((1, 1)));
        let found: Vec<(String, usize, usize)> = m
            .params()
            .iter()
            .filter(|p| p.name.starts_with("dwa"))
            .map(|p| (p.name.clone(), p.depth, p.var.dim(0).unwrap()))
            .collect();
        // Stage 1 averages the stem's output with blocks 1 and 2; blocks 3, 5, 7 change the
        // shape and start a stage; blocks 4, 6, 8 average with their stage's first block.
        let want = [(1, 2), (2, 3), (4, 2), (6, 2), (8, 2)];
        let want: Vec<(String, usize, usize)> = want
            .iter()
            .map(|&(i, n)| (format!("dwa{i}.alpha"), 2 * i + 1, n))
            .collect();
        assert_eq!(found, want);
        let x = input();
        let (out, g) = loss(&m, &x, false);
        let alphas: Vec<&Var> = m.alphas.iter().flatten().collect();
        for a in &alphas {
            let ga = g.get(a).expect("α has a gradient");
            let sum = ga.abs().unwrap().sum_all().unwrap();
            assert!(sum.to_scalar::<f32>().unwrap() > 0.0);
        }
        let f = m.fork().unwrap();
        assert_eq!(bits(&out), bits(&f.forward(&x, false).unwrap().logits));
        alphas[1]
            .set(&Tensor::new(&[0.5f32, 0.0, 1.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_ne!(bits(&out), bits(&m.forward(&x, false).unwrap().logits));
        // Dilation 2 after block 2 takes the stem's output and block 2's; period 2 leaves out
        // the odd blocks; blocks 4, 6, 8 keep a one-term average (their stage's first output,
        // at an odd position, is not `≡ i (mod 2)`).
        let m = resnet(Some((2, 2)));
        let sizes: Vec<Option<usize>> = m
            .alphas
            .iter()
            .map(|a| a.as_ref().map(|a| a.dim(0).unwrap()))
            .collect();
        let want = [None, Some(2), None, Some(1), None, Some(1), None, Some(1)];
        assert_eq!(sizes, want);
    }
}
