//! Backbones. A model maps a batch `B × C × H × W` to features and logits over the stream's units.
//!
//! The trait is deliberately small so that a fused or hand-written kernel can replace a backbone
//! without touching the trainer or any algorithm.

pub mod cnn;
mod init;
pub mod kernels;
pub mod layers;
pub mod lora;
pub mod mlp;
pub mod params;
pub mod pretrained;
pub mod resnet;

use candle_core::{Device, Tensor, Var};

pub use init::redraw;
pub use lora::Adapters;
pub use params::{Param, ParamSet, Role, Snapshot};

use crate::config::{ModelConfig, ModelKind};
use crate::error::Result;
use crate::rng::{SeededRng, Stream};

/// What a forward pass returns: penultimate features (for iCaRL, DER, …) and logits.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    pub features: Tensor,
    pub logits: Tensor,
}

/// One dense layer `z = a·Wᵀ + b` of a [`Model::dense_forward`] pass.
#[derive(Debug, Clone)]
pub struct DenseTap {
    /// The layer's input `a`, `N × in`.
    pub input: Tensor,
    /// A zero `N × out` variable added to the layer's output `z`. candle keeps the gradients of
    /// variables only, so the gradient of a loss with respect to this variable is the one with
    /// respect to `z`: row `n` is sample `n`'s `∂ℓₙ/∂zₙ` when the loss is a sum over samples.
    pub tap: Var,
    /// The layer's tensors, as in [`Model::params`].
    pub weight: Var,
    pub bias: Var,
}

/// The result of [`Model::dense_forward`].
#[derive(Debug, Clone)]
pub struct DenseForward {
    pub logits: Tensor,
    /// Every dense layer, input side first.
    pub layers: Vec<DenseTap>,
}

pub trait Model: Send + Sync {
    /// Forward pass; `train` enables dropout and batch-statistics normalisation.
    fn forward(&self, x: &Tensor, train: bool) -> Result<ModelOutput>;
    /// Every tensor of the model, in a fixed order.
    fn params(&self) -> &ParamSet;
    /// An evaluation-mode forward pass that exposes each dense layer's input and output gradient
    /// ([`DenseTap`]), for per-sample gradient statistics without a batch-1 loop: for a dense
    /// layer, sample `n`'s weight gradient is the outer product `gₙ aₙᵀ`, so `Σₙ wₙ φ(gₙ aₙᵀ)`
    /// is `(w ⊙ φ(G))ᵀ φ(A)` for `φ` = square or absolute value. `None` (the default) for a
    /// backbone with other layers; callers then fall back to one backward pass per sample.
    fn dense_forward(&self, _x: &Tensor) -> Result<Option<DenseForward>> {
        Ok(None)
    }
    /// A deep, detached copy: same architecture and values, fresh `Var`s, so training either
    /// model never changes the other. Teachers of distillation methods (LwF) are forks of the
    /// model at a task boundary. The default returns an error, so a user backbone that does not
    /// need distillation does not have to implement it.
    fn fork(&self) -> Result<Box<dyn Model>> {
        Err(crate::error::Error::msg(
            "this backbone does not implement `Model::fork`, which distillation methods need",
        ))
    }
    /// The model's PaLoRA adapters ([`lora`]), if it has any: the trainer sets their preference
    /// `λ` before training and evaluating a task (`one-hot(t)`, or the merge without task
    /// identity), in task-IL their per-row mode ([`forward_batch`]), and freezes the backbone where `model.lora.freeze_backbone_after` says; the
    /// step drops the backbone's gradients while it is frozen. Default: none.
    fn adapters(&self) -> Option<&Adapters> {
        None
    }
    /// Positions of the model's own random streams (dropout masks), for checkpoints. Default:
    /// none (a deterministic backbone).
    fn rng_states(&self) -> Vec<crate::rng::RngState> {
        Vec::new()
    }
    /// Restore what [`Model::rng_states`] returned.
    fn set_rng_states(&self, states: &[crate::rng::RngState]) -> Result<()> {
        if states.is_empty() {
            Ok(())
        } else {
            Err(crate::error::Error::msg(
                "this backbone has no random streams to restore",
            ))
        }
    }
}

/// Build the configured backbone with parameters drawn from the `init` stream of `seed`.
/// `heads` lists the output units of each head: one entry for a shared head, one per task for
/// multi-head task-IL (see [`crate::data::TaskStream::head_sizes`]). With `model.lora` there is
/// one adapter per head; [`build_model_for`] gives the stream's task count instead.
pub fn build_model(
    cfg: &ModelConfig,
    input: [usize; 3],
    heads: &[usize],
    seed: u64,
    device: &Device,
) -> Result<Box<dyn Model>> {
    build_model_for(cfg, input, heads, heads.len(), seed, device)
}

/// A forward pass over `batch` that tells the model its rows' tasks: with PaLoRA adapters in
/// per-row mode ([`Adapters::set_per_row`], task-IL training) each row goes through its own
/// task's adapter; otherwise exactly `model.forward(&batch.x, train)`.
///
/// # Errors
/// Model errors.
pub fn forward_batch(
    model: &dyn Model,
    batch: &crate::data::Batch,
    train: bool,
) -> Result<ModelOutput> {
    match model.adapters() {
        Some(a) if a.per_row() => a.with_rows(&batch.tasks, || model.forward(&batch.x, train))?,
        _ => model.forward(&batch.x, train),
    }
}

/// [`build_model`] for a stream of `tasks` tasks (the PaLoRA adapters per layer).
pub fn build_model_for(
    cfg: &ModelConfig,
    input: [usize; 3],
    heads: &[usize],
    tasks: usize,
    seed: u64,
    device: &Device,
) -> Result<Box<dyn Model>> {
    let mut rng = SeededRng::new(seed, Stream::Init);
    Ok(match &cfg.kind {
        ModelKind::Mlp => Box::new(mlp::Mlp::with_options(
            input.iter().product(),
            &cfg.hidden,
            heads,
            cfg.activation,
            mlp::MlpOptions {
                softplus_beta: cfg
                    .softplus_beta
                    .unwrap_or(crate::config::DEFAULT_SOFTPLUS_BETA),
                learn_beta: cfg.learn_beta,
                dwa: cfg.dwa,
                lora: cfg.lora,
                tasks,
            },
            layers::Dropout::new(cfg.dropout, SeededRng::new(seed, Stream::Dropout)),
            &mut rng,
            device,
        )?),
        ModelKind::Cnn => Box::new(cnn::Cnn::new(
            input,
            &cfg.channels,
            heads,
            &mut rng,
            device,
        )?),
        ModelKind::Resnet18 => Box::new(resnet::ResNet18::with_options(
            input,
            cfg.width,
            heads,
            resnet::ResNetOptions {
                lipschitz_bn: cfg.lipschitz_bn,
                dwa: cfg.dwa,
            },
            &mut rng,
            device,
        )?),
        ModelKind::Other(name) => {
            return Err(crate::error::Error::msg(format!(
                "model.kind: `{name}` is not a built-in backbone; build it through the \
                 `Sources` it was registered in"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn cfg(kind: ModelKind) -> ModelConfig {
        ModelConfig {
            kind,
            channels: vec![4, 8],
            width: 4,
            ..Default::default()
        }
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let dev = Device::Cpu;
        let flat = |m: &dyn Model| -> Vec<f32> {
            m.params()
                .iter()
                .flat_map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect()
        };
        let a = build_model(&cfg(ModelKind::Mlp), [1, 28, 28], &[10], 5, &dev).unwrap();
        let b = build_model(&cfg(ModelKind::Mlp), [1, 28, 28], &[10], 5, &dev).unwrap();
        let c = build_model(&cfg(ModelKind::Mlp), [1, 28, 28], &[10], 6, &dev).unwrap();
        assert_eq!(flat(a.as_ref()), flat(b.as_ref()));
        assert_ne!(flat(a.as_ref()), flat(c.as_ref()));
    }

    #[test]
    fn every_backbone_has_named_depth_tagged_params_and_right_output_shape() {
        let dev = Device::Cpu;
        for (kind, shape) in [
            (ModelKind::Mlp, [1, 28, 28]),
            (ModelKind::Cnn, [1, 28, 28]),
            (ModelKind::Resnet18, [3, 32, 32]),
        ] {
            let m = build_model(&cfg(kind.clone()), shape, &[7], 0, &dev).unwrap();
            let x = Tensor::zeros(
                (2, shape[0], shape[1], shape[2]),
                candle_core::DType::F32,
                &dev,
            )
            .unwrap();
            let out = m.forward(&x, true).unwrap();
            assert_eq!(out.logits.dims(), &[2, 7], "{kind:?}");
            let p = m.params();
            let l = p.max_depth();
            let mut names: Vec<&str> = p.iter().map(|q| q.name.as_str()).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), p.len(), "{kind:?}: names must be unique");
            assert!(p.iter().all(|q| (1..=l).contains(&q.depth)));
            assert!(p
                .iter()
                .filter(|q| q.role == Role::Head)
                .all(|q| q.depth == l));
            if kind == ModelKind::Resnet18 {
                assert_eq!(l, 18);
                assert!(p.iter().any(|q| q.role == Role::NormStat));
            }
        }
    }

    #[test]
    fn fork_is_an_equal_but_independent_copy_for_every_backbone() {
        let dev = Device::Cpu;
        for (kind, shape) in [
            (ModelKind::Mlp, [1, 28, 28]),
            (ModelKind::Cnn, [1, 28, 28]),
            (ModelKind::Resnet18, [3, 8, 8]),
        ] {
            let mut c = cfg(kind.clone());
            c.dropout = 0.3;
            let m = build_model(&c, shape, &[5], 3, &dev).unwrap();
            let x = Tensor::ones(
                (2, shape[0], shape[1], shape[2]),
                candle_core::DType::F32,
                &dev,
            )
            .unwrap();
            // Move batch-norm running statistics away from their initial values first.
            m.forward(&x, true).unwrap();
            let f = m.fork().unwrap();
            let logits = |m: &dyn Model| {
                m.forward(&x, false)
                    .unwrap()
                    .logits
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(logits(m.as_ref()), logits(f.as_ref()), "{kind:?}");
            let names = |m: &dyn Model| {
                m.params()
                    .iter()
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(names(m.as_ref()), names(f.as_ref()));
            // Changing the original leaves the fork alone.
            for p in m.params().iter() {
                p.var.set(&p.var.as_tensor().zeros_like().unwrap()).unwrap();
            }
            assert_ne!(logits(m.as_ref()), logits(f.as_ref()), "{kind:?}");
            for (a, b) in m.params().iter().zip(f.params().iter()) {
                assert_ne!(a.var.as_tensor().id(), b.var.as_tensor().id());
                assert_eq!((a.depth, a.role), (b.depth, b.role));
            }
        }
    }

    #[test]
    fn batchnorm_updates_running_stats_only_in_training() {
        let dev = Device::Cpu;
        let m = build_model(&cfg(ModelKind::Resnet18), [3, 8, 8], &[2], 0, &dev).unwrap();
        let stat = m
            .params()
            .iter()
            .find(|p| p.name == "stem.bn.running_mean")
            .unwrap()
            .var
            .clone();
        let before = stat.to_vec1::<f32>().unwrap();
        let x = Tensor::ones((2, 3, 8, 8), candle_core::DType::F32, &dev).unwrap();
        m.forward(&x, false).unwrap();
        assert_eq!(stat.to_vec1::<f32>().unwrap(), before);
        m.forward(&x, true).unwrap();
        assert_ne!(stat.to_vec1::<f32>().unwrap(), before);
    }

    #[test]
    fn batchnorm_eval_with_batch_statistics_equals_training_forward() {
        let dev = Device::Cpu;
        let mut ps = ParamSet::new();
        let bn = layers::BatchNorm2d::new(&mut ps, "bn", 1, 3, &dev).unwrap();
        let layers::BnScale::Affine(gamma) = &bn.scale else {
            panic!("BatchNorm2d::new is affine")
        };
        gamma
            .set(&Tensor::new(&[1.5f32, 0.5, 2.0], &dev).unwrap())
            .unwrap();
        bn.beta
            .set(&Tensor::new(&[0.1f32, -0.2, 0.3], &dev).unwrap())
            .unwrap();
        let mut rng = SeededRng::new(0, Stream::Init);
        let data: Vec<f32> = (0..4 * 3 * 5 * 5)
            .map(|_| rng.normal() * 3.0 + 1.0)
            .collect();
        let x = Tensor::from_vec(data, (4, 3, 5, 5), &dev).unwrap();
        let train = bn.forward(&x, true).unwrap();
        // Put the biased batch statistics into the running buffers: evaluation must then agree.
        let xt = x.transpose(0, 1).unwrap().reshape((3, 100)).unwrap();
        let mean = xt.mean(1).unwrap();
        let var = xt
            .broadcast_sub(&mean.unsqueeze(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean(1)
            .unwrap();
        bn.running_mean.set(&mean).unwrap();
        bn.running_var.set(&var).unwrap();
        let eval = bn.forward(&x, false).unwrap();
        let diff = (train - eval)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    /// γ-Lipschitz batch norm: ‖y − y′‖ ≤ γ‖x − x′‖ for random pairs, with equality along the
    /// channel of smallest σ; with γ ≥ 1/σ_min it is plain normalisation (unit scales); log γ
    /// gets a gradient in training while γ < 1/σ_min. A ResNet-18 with them runs and forks.
    #[test]
    fn lipschitz_batchnorm_bound_holds() {
        let dev = Device::Cpu;
        let mut ps = ParamSet::new();
        let bn = layers::BatchNorm2d::lipschitz(&mut ps, "bn", 1, 3, &dev).unwrap();
        assert!(ps.iter().any(|p| p.name == "bn.log_gamma"));
        assert!(!ps.iter().any(|p| p.name == "bn.weight"));
        bn.running_mean
            .set(&Tensor::new(&[0.5f32, -1.0, 0.0], &dev).unwrap())
            .unwrap();
        // σ ≈ 0.1, 1, 2 (ε = 1e-5 aside): 1/σ_min ≈ 10.
        bn.running_var
            .set(&Tensor::new(&[0.01f32, 1.0, 4.0], &dev).unwrap())
            .unwrap();
        let log_gamma = ps
            .iter()
            .find(|p| p.name == "bn.log_gamma")
            .unwrap()
            .var
            .clone();
        let mut rng = SeededRng::new(5, Stream::Init);
        let mut draw = |shape: (usize, usize, usize, usize)| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let norm = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt()
        };
        for gamma in [0.5f32, 2.0, 9.0] {
            log_gamma
                .set(&Tensor::new(&[gamma.ln()], &dev).unwrap())
                .unwrap();
            for _ in 0..20 {
                let (x, x2) = (draw((2, 3, 4, 4)), draw((2, 3, 4, 4)));
                let dy =
                    (bn.forward(&x, false).unwrap() - bn.forward(&x2, false).unwrap()).unwrap();
                let dx = (&x - &x2).unwrap();
                assert!(norm(&dy) <= gamma * norm(&dx) * (1.0 + 1e-5), "γ {gamma}");
            }
            // A difference in channel 0 only (σ_min) is scaled by exactly γ.
            let x = Tensor::zeros((1, 3, 1, 1), candle_core::DType::F32, &dev).unwrap();
            let e = Tensor::new(&[1f32, 0.0, 0.0], &dev)
                .unwrap()
                .reshape((1, 3, 1, 1))
                .unwrap();
            let dy = (bn.forward(&(&x + &e).unwrap(), false).unwrap()
                - bn.forward(&x, false).unwrap())
            .unwrap();
            assert!(
                (norm(&dy) - gamma).abs() < 1e-4 * gamma,
                "γ {gamma}: {}",
                norm(&dy)
            );
        }
        // γ above 1/σ_min: each channel is divided by its own σ, as plain batch norm with unit
        // scales and the same bias.
        log_gamma
            .set(&Tensor::new(&[100f32.ln()], &dev).unwrap())
            .unwrap();
        let mut ps2 = ParamSet::new();
        let plain = layers::BatchNorm2d::new(&mut ps2, "bn", 1, 3, &dev).unwrap();
        plain.running_mean.set(bn.running_mean.as_tensor()).unwrap();
        plain.running_var.set(bn.running_var.as_tensor()).unwrap();
        let x = draw((2, 3, 4, 4));
        let d = (bn.forward(&x, false).unwrap() - plain.forward(&x, false).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
        // Training on batch σ ≈ 3 (1/σ_min ≈ 0.33): γ = 0.1 binds, and log γ gets a gradient.
        log_gamma
            .set(&Tensor::new(&[0.1f32.ln()], &dev).unwrap())
            .unwrap();
        let y = bn
            .forward(&(draw((4, 3, 4, 4)) * 3.0).unwrap(), true)
            .unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gl = g.get(&log_gamma).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(gl.is_finite() && gl != 0.0, "{gl}");
        // The whole backbone.
        let c = ModelConfig {
            lipschitz_bn: true,
            ..cfg(ModelKind::Resnet18)
        };
        let m = build_model(&c, [3, 8, 8], &[2], 0, &dev).unwrap();
        assert!(m
            .params()
            .iter()
            .any(|p| p.name == "layer1.0.bn1.log_gamma"));
        let x = Tensor::ones((2, 3, 8, 8), candle_core::DType::F32, &dev).unwrap();
        m.forward(&x, true).unwrap();
        let f = m.fork().unwrap();
        let l = |m: &dyn Model| {
            m.forward(&x, false)
                .unwrap()
                .logits
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(l(m.as_ref()), l(f.as_ref()));
    }
}
