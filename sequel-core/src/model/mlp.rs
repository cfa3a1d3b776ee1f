//! Multi-layer perceptron: `input → [Linear → activation → dropout]* → Linear head`, optionally
//! with a learned centered-softplus β per layer and DenseFormer's depth-weighted averaging
//! between the hidden blocks, and PaLoRA's per-task low-rank adapters on the hidden layers
//! ([`MlpOptions`], docs/EXTENSIONS.md).

use candle_core::{Device, Tensor, Var};

use super::init;
use super::layers::{activate, centered_softplus, Beta, Dropout, Head, Linear};
use super::lora::{adapter_stream, Adapters};
use super::params::{ParamSet, Role};
use super::{DenseForward, DenseTap, Model, ModelOutput};
use crate::config::{ActivationKind, DwaConfig, LoraConfig, DEFAULT_SOFTPLUS_BETA};
use crate::error::Result;
use crate::rng::{SeededRng, Stream};

#[derive(Debug)]
pub struct Mlp {
    input: usize,
    widths: Vec<usize>,
    hidden: Vec<Linear>,
    head: Head,
    activation: ActivationKind,
    options: MlpOptions,
    /// β of each hidden layer's centered softplus (unused by the other activations).
    betas: Vec<Beta>,
    /// DWA weights after each hidden block (`None` where the block has no average).
    alphas: Vec<Option<Var>>,
    /// PaLoRA adapters of the hidden layers (layer `i` is adapter layer `i`).
    lora: Option<Adapters>,
    dropout: Dropout,
    params: ParamSet,
}

/// The MLP's optional parts. The default is the plain MLP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MlpOptions {
    /// β of `centered-softplus` (its initial value when learned).
    pub softplus_beta: f32,
    /// Learn β as `log β`, one per hidden layer (`fc<i>.log_beta`, depth `i`).
    pub learn_beta: bool,
    /// Depth-weighted averaging (DenseFormer) between the hidden blocks.
    pub dwa: Option<DwaConfig>,
    /// PaLoRA adapters on every hidden layer, `tasks` of them per layer.
    pub lora: Option<LoraConfig>,
    /// `T`, the adapters per layer (the stream's tasks); read with `lora` only.
    pub tasks: usize,
}

impl Default for MlpOptions {
    fn default() -> Self {
        Self {
            softplus_beta: DEFAULT_SOFTPLUS_BETA,
            learn_beta: false,
            dwa: None,
            lora: None,
            tasks: 1,
        }
    }
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
        let options = MlpOptions::default();
        Self::with_options(
            input, widths, heads, activation, options, dropout, rng, device,
        )
    }

    /// [`Mlp::new`] with its optional parts. Their parameters are constants (log β, and the
    /// DWA weights at the identity), so the linear layers draw the same initial values as the
    /// plain MLP of the same seed.
    ///
    /// DWA (Pagliardini et al., NeurIPS 2024): with `Xⱼ` the output of hidden block `j`
    /// (0-based; `X₀`, the first block's output, plays the embeddings' part), block `i ≥ 1`
    /// with `i mod p = 0` is followed by `Yᵢ = Σ αᵢⱼ Xⱼ` over `j ≤ i`, `j ≡ i (mod k)`, which the
    /// next block (or the head) reads instead of `Xᵢ`; `αᵢᵢ = 1`, the others 0 at
    /// initialisation. `α` after block `i` is the tensor `dwa<i+1>.alpha`, at the depth of
    /// layer `fc<i+1>`.
    ///
    /// PaLoRA ([`super::lora`]): hidden layer `fc<i>` carries `tasks` adapters, registered after
    /// its bias (and `log β`) as `fc<i>.lora_a.<t>`, `fc<i>.lora_b.<t>` at depth `i`. `A` is
    /// drawn from [`adapter_stream`] of `rng`, so the backbone's values are the plain MLP's.
    #[allow(clippy::too_many_arguments)]
    pub fn with_options(
        input: usize,
        widths: &[usize],
        heads: &[usize],
        activation: ActivationKind,
        options: MlpOptions,
        dropout: Dropout,
        rng: &mut SeededRng,
        device: &Device,
    ) -> Result<Self> {
        let mut params = ParamSet::new();
        let mut hidden = Vec::with_capacity(widths.len());
        let mut betas = Vec::with_capacity(widths.len());
        let mut alphas = Vec::with_capacity(widths.len());
        let mut fan_in = input;
        let b0 = options.softplus_beta as f64;
        let mut lora = options.lora.map(|c| Adapters::new(c, options.tasks));
        let mut lora_rng = adapter_stream(rng);
        for (i, &w) in widths.iter().enumerate() {
            let depth = i + 1;
            hidden.push(Linear::new(
                &mut params,
                &format!("fc{depth}"),
                depth,
                Role::Body,
                (fan_in, w),
                rng,
                device,
            )?);
            betas.push(
                if activation == ActivationKind::CenteredSoftplus && options.learn_beta {
                    let log_beta = init::constant(1, b0.ln() as f32, device)?;
                    params.push(
                        format!("fc{depth}.log_beta"),
                        depth,
                        Role::Body,
                        log_beta.clone(),
                    );
                    Beta::Log(log_beta)
                } else {
                    Beta::Fixed(b0)
                },
            );
            if let Some(l) = lora.as_mut() {
                l.add_layer(
                    &mut params,
                    &format!("fc{depth}"),
                    depth,
                    (fan_in, w),
                    &mut lora_rng,
                    device,
                )?;
            }
            alphas.push(match options.dwa {
                Some(d) if i >= 1 && i % d.period == 0 => {
                    let taken = i / d.dilation + 1; // j = i, i − k, …, ≥ 0
                    let mut a = vec![0f32; taken];
                    a[taken - 1] = 1.0; // ascending j: the last is j = i
                    let alpha = Var::from_tensor(&Tensor::from_vec(a, taken, device)?)?;
                    params.push(
                        format!("dwa{depth}.alpha"),
                        depth,
                        Role::Body,
                        alpha.clone(),
                    );
                    Some(alpha)
                }
                _ => None,
            });
            fan_in = w;
        }
        let head = Head::new(&mut params, widths.len() + 1, fan_in, heads, rng, device)?;
        Ok(Self {
            input,
            widths: widths.to_vec(),
            hidden,
            head,
            activation,
            options,
            betas,
            alphas,
            lora,
            dropout,
            params,
        })
    }

    fn act(&self, i: usize, z: &Tensor) -> Result<Tensor> {
        match self.activation {
            ActivationKind::CenteredSoftplus => centered_softplus(z, &self.betas[i]),
            other => activate(z, other),
        }
    }

    /// After hidden block `i`: remember its output `Xᵢ` and return what the next layer reads,
    /// `Yᵢ = Σⱼ αᵢⱼ Xⱼ` where block `i` has an average, else `Xᵢ`.
    fn dwa(&self, i: usize, x: Tensor, outputs: &mut Vec<Tensor>) -> Result<Tensor> {
        let Some(dwa) = self.options.dwa else {
            return Ok(x);
        };
        outputs.push(x);
        let Some(alpha) = &self.alphas[i] else {
            return Ok(outputs[i].clone());
        };
        let taken: Vec<&Tensor> = (0..=i)
            .filter(|j| (i - j) % dwa.dilation == 0)
            .map(|j| &outputs[j])
            .collect();
        let stacked = Tensor::stack(&taken, 0)?;
        let w = alpha.as_tensor().reshape((taken.len(), 1, 1))?;
        Ok(stacked.broadcast_mul(&w)?.sum(0)?)
    }
}

impl Model for Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Result<ModelOutput> {
        let mut h = x.flatten_from(1)?;
        let mut outputs = Vec::new();
        for (i, layer) in self.hidden.iter().enumerate() {
            let mut z = layer.forward(&h)?;
            if let Some(l) = &self.lora {
                z = l.forward(i, &h, z)?;
            }
            h = self.act(i, &z)?;
            h = self.dropout.forward(&h, train)?;
            h = self.dwa(i, h, &mut outputs)?;
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
        // Learned β, DWA weights and adapters are parameters outside the dense layers: no taps
        // then.
        if self.options.dwa.is_some()
            || self.lora.is_some()
            || (self.activation == ActivationKind::CenteredSoftplus && self.options.learn_beta)
        {
            return Ok(None);
        }
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
        for (i, layer) in self.hidden.iter().enumerate() {
            h = self.act(i, &tapped(layer, &h)?)?;
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
        let copy = Mlp::with_options(
            self.input,
            &self.widths,
            &self.head.sizes(),
            self.activation,
            self.options,
            self.dropout.fork(),
            &mut SeededRng::new(0, Stream::Init),
            self.head.device(),
        )?;
        copy.params.restore(&self.params.snapshot()?)?;
        if let (Some(to), Some(from)) = (&copy.lora, &self.lora) {
            to.copy_state(from)?;
        }
        Ok(Box::new(copy))
    }

    fn adapters(&self) -> Option<&Adapters> {
        self.lora.as_ref()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest absolute difference between two tensors of one shape.
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn mlp(activation: ActivationKind, options: MlpOptions, dropout: f32) -> Mlp {
        Mlp::with_options(
            6,
            &[5, 5, 5, 5, 5],
            &[3],
            activation,
            options,
            Dropout::new(dropout, SeededRng::new(1, Stream::Dropout)),
            &mut SeededRng::new(2, Stream::Init),
            &Device::Cpu,
        )
        .unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn input() -> Tensor {
        let mut rng = SeededRng::new(9, Stream::Init);
        let v: Vec<f32> = (0..4 * 6).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, (4, 6), &Device::Cpu).unwrap()
    }

    fn dwa(dilation: usize, period: usize) -> MlpOptions {
        MlpOptions {
            dwa: Some(DwaConfig { dilation, period }),
            ..MlpOptions::default()
        }
    }

    /// At initialisation (α = identity) a DWA model computes exactly the plain model: same
    /// logits bit for bit and features, in evaluation and in training (dropout masks drawn
    /// alike), for several dilations and periods; its other tensors are the plain model's.
    #[test]
    fn dwa_at_initialisation_is_the_plain_model_bit_for_bit() {
        let x = input();
        for act in [ActivationKind::Relu, ActivationKind::Tanh] {
            for (k, p) in [(1, 1), (2, 1), (1, 2), (2, 3)] {
                for train in [false, true] {
                    let plain = mlp(act, MlpOptions::default(), 0.3);
                    let with = mlp(act, dwa(k, p), 0.3);
                    let (a, b) = (
                        plain.forward(&x, train).unwrap(),
                        with.forward(&x, train).unwrap(),
                    );
                    assert_eq!(bits(&a.logits), bits(&b.logits), "{act:?} k {k} p {p}");
                    // Features as numbers: `0·Xⱼ + (−0)` is +0, the only difference IEEE allows.
                    let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(f(&a.features), f(&b.features));
                    assert!(with.params().len() > plain.params().len());
                }
            }
        }
    }

    /// Each α gets a gradient, and a moved α changes the output.
    #[test]
    fn dwa_weights_are_trained_and_used() {
        let m = mlp(ActivationKind::Relu, dwa(1, 1), 0.0);
        let alphas: Vec<Var> = m.alphas.iter().flatten().cloned().collect();
        assert_eq!(alphas.len(), 4);
        assert_eq!(alphas[3].dims(), &[5]); // after block 4: X₀ … X₄
        let x = input();
        let out = m.forward(&x, false).unwrap();
        let g = out
            .logits
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for a in &alphas {
            let ga = g.get(a).expect("α has a gradient");
            assert!(
                ga.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
        let a = &alphas[1];
        a.set(&Tensor::new(&[0.5f32, 0.0, 1.0], &Device::Cpu).unwrap())
            .unwrap();
        let moved = m.forward(&x, false).unwrap();
        assert_ne!(bits(&out.logits), bits(&moved.logits));
        // Dilation 2 after block 3 averages X₁ and X₃ only; period 2 skips blocks 1 and 3.
        let m = mlp(ActivationKind::Relu, dwa(2, 2), 0.0);
        let sizes: Vec<Option<usize>> = m
            .alphas
            .iter()
            .map(|a| a.as_ref().map(|a| a.dim(0).unwrap()))
            .collect();
        assert_eq!(sizes, vec![None, None, Some(2), None, Some(3)]);
    }

    fn lora(tasks: usize, rank: usize) -> MlpOptions {
        MlpOptions {
            lora: Some(LoraConfig {
                rank,
                lora_alpha: 1.5,
                ..LoraConfig::default()
            }),
            tasks,
            ..MlpOptions::default()
        }
    }

    /// Give every `B` seeded random values (a trained adapter).
    fn train_b(m: &Mlp) {
        let mut rng = SeededRng::new(11, Stream::Init);
        for p in m.params().iter().filter(|p| p.name.contains(".lora_b.")) {
            let v: Vec<f32> = (0..p.var.elem_count()).map(|_| rng.normal()).collect();
            p.var
                .set(&Tensor::from_vec(v, p.var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn host(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    /// With `B = 0` the adapters leave the model's output unchanged bit for bit, whatever `λ`,
    /// in evaluation and training (dropout masks drawn alike), and drawing `A` shifts no draw:
    /// the shared tensors equal the plain model's of the same seed. Adapter tensors are named,
    /// depth-tagged, tagged with their task, and `A ~ U(±1/√in)`.
    #[test]
    fn zero_adapters_are_the_plain_model_bit_for_bit() {
        let x = input();
        for (tasks, rank) in [(1, 1), (3, 2)] {
            for train in [false, true] {
                let plain = mlp(ActivationKind::Relu, MlpOptions::default(), 0.3);
                let with = mlp(ActivationKind::Relu, lora(tasks, rank), 0.3);
                for (p, q) in plain
                    .params()
                    .iter()
                    .zip(with.params().iter().filter(|q| q.adapter.is_none()))
                {
                    assert_eq!(p.name, q.name);
                    assert_eq!(bits(p.var.as_tensor()), bits(q.var.as_tensor()));
                }
                let a = with.adapters().unwrap();
                assert_eq!(with.params().len(), plain.params().len() + 5 * 2 * tasks);
                for lambda in [vec![1.0; tasks], vec![0.5; tasks]] {
                    a.set_preference(&lambda).unwrap();
                    let (o, p) = (
                        plain.forward(&x, train).unwrap(),
                        with.forward(&x, train).unwrap(),
                    );
                    assert_eq!(bits(&o.logits), bits(&p.logits), "T {tasks} r {rank}");
                }
            }
        }
        let m = mlp(ActivationKind::Relu, lora(3, 2), 0.0);
        let p = m.params();
        let a = p.iter().find(|p| p.name == "fc2.lora_a.1").unwrap();
        let b = p.iter().find(|p| p.name == "fc2.lora_b.1").unwrap();
        assert_eq!(
            (a.depth, a.adapter, a.var.dims()),
            (2, Some(1), &[2, 5][..])
        );
        assert_eq!(
            (b.depth, b.adapter, b.var.dims()),
            (2, Some(1), &[5, 2][..])
        );
        let bound = 1.0 / 5f32.sqrt();
        let va = a.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(va.iter().all(|v| v.abs() <= bound) && va.iter().any(|v| *v != 0.0));
        let first = p.iter().find(|p| p.name == "fc1.lora_a.0").unwrap();
        assert_eq!(first.var.dims(), &[2, 6]);
        // Every adapter pair differs from the others (one draw each).
        assert_ne!(bits(a.var.as_tensor()), bits(first.var.as_tensor()));
        assert_eq!(
            m.adapters().unwrap().params_per_task(),
            2 * (6 + 5) + 4 * 2 * (5 + 5)
        );
    }

    /// `λ = one-hot(t)` computes exactly the MLP with weights `W + s·BₜAₜ` (computed here on the
    /// host), the other adapters contribute nothing (their values do not matter, bit for bit)
    /// and get no gradient; a preference mixes them linearly.
    #[test]
    fn a_one_hot_preference_selects_exactly_one_adapter() {
        let x = input();
        let m = mlp(ActivationKind::Tanh, lora(3, 2), 0.0);
        train_b(&m);
        let a = m.adapters().unwrap();
        let s = 1.5 / 2.0;
        let find = |name: &str| {
            m.params()
                .iter()
                .find(|p| p.name == name)
                .unwrap()
                .var
                .clone()
        };
        for t in 0..3 {
            a.select(t).unwrap();
            let out = m.forward(&x, false).unwrap();
            // The plain model of the same seed with W ← W + s·BₜAₜ in every hidden layer.
            let plain = mlp(ActivationKind::Tanh, MlpOptions::default(), 0.0);
            for i in 1..=5 {
                let w = host(find(&format!("fc{i}.weight")).as_tensor());
                let at = host(find(&format!("fc{i}.lora_a.{t}")).as_tensor());
                let bt = host(find(&format!("fc{i}.lora_b.{t}")).as_tensor());
                let merged: Vec<f32> = (0..w.len())
                    .flat_map(|o| {
                        let (w, at, bt) = (&w, &at, &bt);
                        (0..w[0].len()).map(move |k| {
                            w[o][k] + s * (0..2).map(|j| bt[o][j] * at[j][k]).sum::<f32>()
                        })
                    })
                    .collect();
                let p = plain
                    .params()
                    .iter()
                    .find(|p| p.name == format!("fc{i}.weight"))
                    .unwrap()
                    .var
                    .clone();
                p.set(&Tensor::from_vec(merged, p.dims(), &Device::Cpu).unwrap())
                    .unwrap();
            }
            let by_hand = plain.forward(&x, false).unwrap().logits;
            let d = max_abs_diff(&out.logits, &by_hand);
            assert!(d < 1e-5, "adapter {t}: {d}");
            // The other adapters: no gradient, and changing them changes nothing.
            let g = out
                .logits
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for p in m.params().iter().filter(|p| p.adapter.is_some()) {
                let reached = g.get(p.var.as_tensor()).is_some();
                assert_eq!(reached, p.adapter == Some(t), "{}", p.name);
            }
            let other = find(&format!("fc3.lora_b.{}", (t + 1) % 3));
            let saved = other.as_tensor().copy().unwrap();
            other.set(&(&saved * 7.0).unwrap()).unwrap();
            assert_eq!(
                bits(&out.logits),
                bits(&m.forward(&x, false).unwrap().logits)
            );
            other.set(&saved).unwrap();
        }
        // λ = (½, ½, 0) on one layer is the mean of the two one-hot layer outputs.
        let m = mlp(ActivationKind::Relu, lora(3, 2), 0.0);
        train_b(&m);
        let a = m.adapters().unwrap();
        let layer = &m.hidden[0];
        let z = |l: &[f32]| {
            a.set_preference(l).unwrap();
            a.forward(0, &x, layer.forward(&x).unwrap()).unwrap()
        };
        let mix = z(&[0.5, 0.5, 0.0]);
        let mean = ((z(&[1.0, 0.0, 0.0]) + z(&[0.0, 1.0, 0.0])).unwrap() * 0.5).unwrap();
        assert!(max_abs_diff(&mix, &mean) < 1e-5);
    }

    /// Per-row mode: a fused pass over rows of several tasks gives each row, bit for bit, what
    /// a pass with `λ = one-hot(its task)` gives it (a task index without an adapter: the
    /// backbone alone), whatever the shared `λ`; the loss of one task's rows reaches only that
    /// task's adapter. Out of per-row mode the shared `λ` applies to every row.
    #[test]
    fn per_row_mode_sends_each_row_through_its_own_adapter() {
        let x = input();
        let m = mlp(ActivationKind::Tanh, lora(3, 2), 0.0);
        train_b(&m);
        let a = m.adapters().unwrap();
        let rows = [2u32, 0, 2, 7];
        let bit_rows = |t: &Tensor| -> Vec<Vec<u32>> {
            host(t)
                .iter()
                .map(|r| r.iter().map(|v| v.to_bits()).collect())
                .collect()
        };
        let one_hot = |t: u32| {
            if t < 3 {
                a.select(t as usize).unwrap();
            } else {
                a.merged(0).unwrap();
            }
            bit_rows(&m.forward(&x, false).unwrap().logits)
        };
        a.set_per_row(true);
        a.select(1).unwrap();
        let fused = a
            .with_rows(&rows, || m.forward(&x, false))
            .unwrap()
            .unwrap();
        let got = bit_rows(&fused.logits);
        for (i, &t) in rows.iter().enumerate() {
            assert_eq!(got[i], one_hot(t)[i], "row {i} of task {t}");
        }
        // Not vacuous: the adapters give the rows different outputs, and the shared λ = one-hot(1)
        // is not what the fused pass used.
        assert_ne!(one_hot(0)[1], one_hot(2)[1]);
        assert_ne!(got[0], one_hot(1)[0]);
        // Without rows the shared λ applies again.
        a.select(1).unwrap();
        assert_eq!(bit_rows(&m.forward(&x, false).unwrap().logits), one_hot(1));
        // Gradients: the rows of task 0 reach adapter 0 alone (adapter 2's term is masked there).
        a.select(1).unwrap();
        let out = a.with_rows(&rows, || m.forward(&x, true)).unwrap().unwrap();
        let g = out
            .logits
            .narrow(0, 1, 1)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for p in m.params().iter().filter(|p| p.adapter.is_some()) {
            let norm = g.get(p.var.as_tensor()).map_or(0.0, |g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            assert_eq!(norm > 0.0, p.adapter == Some(0), "{}: {norm}", p.name);
        }
        // Out of per-row mode the rows are ignored: every row through the shared λ.
        a.set_per_row(false);
        a.select(1).unwrap();
        let shared = a
            .with_rows(&rows, || m.forward(&x, false))
            .unwrap()
            .unwrap();
        assert_eq!(bit_rows(&shared.logits), one_hot(1));
        // A fork keeps the mode.
        a.set_per_row(true);
        assert!(m.fork().unwrap().adapters().unwrap().per_row());
    }

    /// Adapter `t` as a task vector: added to the backbone's weights (adapter off), it gives a
    /// model whose output equals the adapted model's with `λ = one-hot(t)`; it is zero outside
    /// the adapted weights, and a fork keeps `λ`.
    #[test]
    fn an_adapter_task_vector_merged_back_equals_the_adapted_model() {
        let x = input();
        let m = mlp(ActivationKind::Relu, lora(2, 1), 0.0);
        train_b(&m);
        let a = m.adapters().unwrap();
        for t in 0..2 {
            a.select(t).unwrap();
            let adapted = m.forward(&x, false).unwrap().logits;
            let tv = a.task_vector(m.params(), t).unwrap();
            assert_eq!(tv.values.len(), m.params().len());
            let f = m.fork().unwrap();
            assert_eq!(bits(&adapted), bits(&f.forward(&x, false).unwrap().logits));
            for (p, v) in f.params().iter().zip(&tv.values) {
                let v = v.as_ref().unwrap();
                if p.name.ends_with(".weight") && p.name.starts_with("fc") {
                    assert!(v.iter().any(|x| *x != 0.0), "{}", p.name);
                    let w = (p.var.as_tensor()
                        + Tensor::from_vec(v.clone(), p.var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                    p.var.set(&w).unwrap();
                } else {
                    assert!(v.iter().all(|x| *x == 0.0), "{}", p.name);
                }
            }
            // Adapters off: the merged backbone alone.
            f.adapters().unwrap().merged(0).unwrap();
            let merged = f.forward(&x, false).unwrap().logits;
            let d = max_abs_diff(&merged, &adapted);
            assert!(d < 1e-5, "adapter {t}: {d}");
        }
        assert!(a.task_vector(m.params(), 2).is_err());
        assert!(m.dense_forward(&x).unwrap().is_none());
    }

    /// With a learned β every hidden layer has `fc<i>.log_beta` at its depth, with a gradient;
    /// a fork computes the same and the per-layer dense taps are refused (β is outside them).
    #[test]
    fn learned_softplus_beta_is_a_parameter_of_each_layer() {
        let opts = MlpOptions {
            learn_beta: true,
            ..MlpOptions::default()
        };
        let m = mlp(ActivationKind::CenteredSoftplus, opts, 0.0);
        let betas: Vec<_> = m
            .params()
            .iter()
            .filter(|p| p.name.ends_with("log_beta"))
            .collect();
        assert_eq!(betas.len(), 5);
        assert_eq!(betas[2].name, "fc3.log_beta");
        assert_eq!(betas[2].depth, 3);
        let x = input();
        let out = m.forward(&x, false).unwrap();
        let g = out
            .logits
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for b in &betas {
            let gb = g.get(&b.var).unwrap().to_vec1::<f32>().unwrap()[0];
            assert!(gb != 0.0 && gb.is_finite(), "{}", b.name);
        }
        let f = m.fork().unwrap();
        assert_eq!(
            bits(&out.logits),
            bits(&f.forward(&x, false).unwrap().logits)
        );
        assert!(m.dense_forward(&x).unwrap().is_none());
        // A fixed β keeps the taps, and they compute the ordinary forward pass.
        let fixed = mlp(ActivationKind::CenteredSoftplus, MlpOptions::default(), 0.0);
        let d = fixed.dense_forward(&x).unwrap().unwrap();
        assert_eq!(
            bits(&d.logits),
            bits(&fixed.forward(&x, false).unwrap().logits)
        );
    }
}
