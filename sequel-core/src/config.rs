//! Experiment configuration: typed serde structs that mirror the YAML file.
//!
//! Every struct denies unknown keys, and every default is documented here and in docs/config.md.
//! The `algorithm` and `consolidation` sections are kept as raw YAML here because their keys belong
//! to the chosen algorithm; the registry in sequel-algos parses them with the algorithm's own typed
//! (and equally strict) config.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::data::augment::AugmentationConfig;
use crate::device::DeviceSpec;
use crate::error::{Error, Result};

/// The whole experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Run name; the run directory is `<output.dir>/<name>/seed-<seed>`.
    pub name: String,
    /// Experiment seed. Every random draw derives from it. Default 0.
    #[serde(default)]
    pub seed: u64,
    pub benchmark: BenchmarkConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    /// Training-time data augmentation (random crop, horizontal flip) and normalisation. Off by
    /// default; left out of the resolved config while off.
    #[serde(default, skip_serializing_if = "AugmentationConfig::is_off")]
    pub augmentation: AugmentationConfig,
    /// `{ name: <algorithm>, <its parameters>... }`. Default `{ name: naive }`.
    #[serde(default = "default_algorithm")]
    pub algorithm: serde_yaml::Value,
    /// Optional post-task consolidation strategy `{ name: <strategy>, ... }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consolidation: Option<serde_yaml::Value>,
    #[serde(default)]
    pub output: OutputConfig,
    /// `cpu` (default), `cuda` or `cuda:N` (a build with `--features cuda`). Not part of what a
    /// run computes for resuming: a run checkpointed on one device continues on another.
    #[serde(default, skip_serializing_if = "DeviceSpec::is_cpu")]
    pub device: DeviceSpec,
}

fn default_algorithm() -> serde_yaml::Value {
    let mut m = serde_yaml::Mapping::new();
    m.insert("name".into(), "naive".into());
    serde_yaml::Value::Mapping(m)
}

/// How the task stream is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamKind {
    /// Disjoint groups of classes per task.
    Split,
    /// Every task applies its own seeded pixel permutation to the whole dataset.
    Permuted,
    /// Every task rotates the whole dataset by its own angle.
    Rotated,
}

/// What the model is told at test time (van de Ven & Tolias, 2019).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// The task id is given: predictions are restricted to the task's output units.
    TaskIl,
    /// No task id: one head over every class of every task.
    ClassIl,
    /// Same label space in every task; no task id.
    DomainIl,
}

/// How task-IL restricts the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskIlHead {
    /// One shared head, masked to the task's classes at evaluation only (Mammoth).
    Masked,
    /// Logits restricted to the task's units in training and evaluation: the rows of the output
    /// layer of each task form a separate head (Avalanche's multi-head).
    Multi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClassOrder {
    /// Classes 0,1 | 2,3 | ... (Mammoth, SequeL).
    Fixed,
    /// A permutation drawn from the experiment seed (Avalanche's default).
    Seeded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalSplit {
    Test,
    Validation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkConfig {
    /// `fmnist-mini` (embedded), `fashion-mnist`, `mnist`, `cifar10`, `cifar100`.
    pub dataset: String,
    /// `split`, `permuted` or `rotated`.
    pub kind: StreamKind,
    /// Number of tasks.
    pub tasks: usize,
    /// `task-il`, `class-il` or `domain-il`.
    pub scenario: Scenario,
    /// Split only: classes per task. Default: all classes divided evenly by `tasks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes_per_task: Option<usize>,
    /// Split only: `fixed` (default) or `seeded`.
    #[serde(default = "default_class_order")]
    pub class_order: ClassOrder,
    /// Split only: an explicit class order (overrides `class_order`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<u16>>,
    /// Split only: the first `base_classes` classes of the class order form a pre-training task
    /// trained (plain cross-entropy) before the stream, which splits the remaining classes into
    /// `tasks` tasks; the pre-training task is evaluated after every task as a control task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_classes: Option<usize>,
    /// With `base_classes`: epochs of the pre-training task. Default: `training.epochs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_epochs: Option<usize>,
    /// Task-IL only: `masked` (default; single head masked at evaluation) or `multi`.
    #[serde(default = "default_head")]
    pub task_il_head: TaskIlHead,
    /// Permuted only: whether task 1 is permuted too (default true, as Mammoth; SequeL keeps it unpermuted).
    #[serde(default = "yes")]
    pub permute_first_task: bool,
    /// Rotated only: angle of each task in degrees. Default (t−1)·180/T.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub angles: Option<Vec<f32>>,
    /// Use at most this many training samples per task (seeded subset). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_subset: Option<usize>,
    /// Fraction of each task's training samples held out for validation (seeded). Default 0.
    #[serde(default)]
    pub validation_fraction: f32,
    /// Which split the accuracy matrix is measured on: `test` (default) or `validation`.
    #[serde(default = "default_eval_split")]
    pub eval_on: EvalSplit,
    /// Standardise inputs with the per-channel training mean and std. Default false (Mammoth's MNIST).
    #[serde(default)]
    pub normalize: bool,
    /// First folder searched for dataset files (then `$SEQUEL_DATA`, `./data`, system folders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

fn default_class_order() -> ClassOrder {
    ClassOrder::Fixed
}
fn default_head() -> TaskIlHead {
    TaskIlHead::Masked
}
fn default_eval_split() -> EvalSplit {
    EvalSplit::Test
}
fn yes() -> bool {
    true
}

/// `model.kind`: a built-in backbone, or one a user crate registered
/// (`sequel_core::sources::Sources::add_backbone`), checked against the registry when the
/// experiment is prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelKind {
    Mlp,
    Cnn,
    Resnet18,
    /// A registered backbone; its own keys go under `model.options`.
    Other(String),
}

impl ModelKind {
    /// The name the YAML uses.
    pub fn name(&self) -> &str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::Resnet18 => "resnet18",
            ModelKind::Other(name) => name,
        }
    }

    fn from_name(name: &str) -> Self {
        match name {
            "mlp" => ModelKind::Mlp,
            "cnn" => ModelKind::Cnn,
            "resnet18" => ModelKind::Resnet18,
            other => ModelKind::Other(other.to_string()),
        }
    }
}

impl Serialize for ModelKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ModelKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(ModelKind::from_name(&String::deserialize(d)?))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationKind {
    Relu,
    Tanh,
    Sigmoid,
    Gelu,
    /// `s(x) = (softplus(βx) − ln 2)/β` (Srinivas et al., NeurIPS 2022): `s(0) = 0`,
    /// `s′(x) = σ(βx)`; β from `model.softplus_beta`, learnable with `model.learn_beta`.
    CenteredSoftplus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `mlp` (default), `cnn`, `resnet18`, or the name of a registered backbone.
    #[serde(default = "default_model_kind")]
    pub kind: ModelKind,
    /// MLP hidden widths. Default [100, 100] (Mammoth's seq-mnist MLP).
    #[serde(default = "default_hidden")]
    pub hidden: Vec<usize>,
    /// MLP hidden activation. Default relu.
    #[serde(default = "default_activation")]
    pub activation: ActivationKind,
    /// Dropout probability after each MLP hidden layer (seeded masks). Default 0.
    #[serde(default)]
    pub dropout: f32,
    /// β of `activation: centered-softplus` (its initial value with `learn_beta`). Unset = 5,
    /// the paper's initialisation; only read with that activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softplus_beta: Option<f32>,
    /// Learn β of `centered-softplus`, one per hidden layer, parameterised as log β
    /// (`fc<i>.log_beta`). Default false (β fixed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learn_beta: bool,
    /// Depth-weighted averaging (DenseFormer) between the MLP's hidden blocks or within the
    /// ResNet-18's stages. Absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwa: Option<DwaConfig>,
    /// PaLoRA low-rank adapters on the MLP's hidden layers, one per task (Dimitriadis et al.,
    /// ICLR 2025). Absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// ResNet-18: γ-Lipschitz batch norms (Srinivas et al., NeurIPS 2022). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lipschitz_bn: bool,
    /// CNN channels of its conv blocks. Default [32, 64].
    #[serde(default = "default_channels")]
    pub channels: Vec<usize>,
    /// ResNet-18 base width (64 = the standard network, 20 = the reduced one of GEM). Default 20.
    #[serde(default = "default_width")]
    pub width: usize,
    /// The keys of a registered (user) backbone, parsed by its own config type. Built-in
    /// backbones take none.
    #[serde(default, skip_serializing_if = "serde_yaml::Mapping::is_empty")]
    pub options: serde_yaml::Mapping,
    /// How the seeded weights are drawn: `pytorch` (default; `nn.Linear`/`nn.Conv2d`'s
    /// U(±1/√fan_in) for weights and biases) or `xavier` (Glorot-uniform weights, zero biases).
    #[serde(default, skip_serializing_if = "WeightInit::is_pytorch")]
    pub init: WeightInit,
    /// Start from these weights instead of the seeded initialisation: a safetensors file of
    /// sequel-rs (a run's `checkpoints/task-<t>.safetensors` or `checkpoints/state-<t>.safetensors`), or a
    /// ResNet-18 with torchvision/timm/Mammoth tensor names (docs/config.md). Relative to the
    /// working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
    /// With `init_from`: `fresh` (default) keeps the seeded head for the stream's classes,
    /// `load` takes the file's head too (same classes and shapes).
    #[serde(default, skip_serializing_if = "InitHead::is_fresh")]
    pub init_head: InitHead,
    /// Tensor-name prefixes not to train (`[stem, layer1]`, `[fc1]`): frozen weights never move
    /// and a frozen batch norm keeps its running statistics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
}

/// The distribution of `model.init`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightInit {
    /// PyTorch's default for linear and convolutional layers: weights and biases
    /// U(±1/√fan_in) (Kaiming-uniform with a = √5).
    #[default]
    Pytorch,
    /// Glorot & Bengio (AISTATS 2010), eq. 16: weights U(±√(6/(fan_in + fan_out))), biases 0;
    /// what Mammoth's MNIST MLP uses (`backbone/__init__.py::xavier`).
    Xavier,
}

impl WeightInit {
    fn is_pytorch(&self) -> bool {
        *self == WeightInit::Pytorch
    }
}

/// `model.dwa`: DenseFormer's depth-weighted averaging (Pagliardini et al., NeurIPS 2024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DwaConfig {
    /// k: block `i`'s average takes the outputs `j ≤ i` with `j ≡ i (mod k)`. Default 1 (all).
    pub dilation: usize,
    /// p: an average after every p-th block only. Default 1 (every block).
    pub period: usize,
}

impl Default for DwaConfig {
    fn default() -> Self {
        Self {
            dilation: 1,
            period: 1,
        }
    }
}

/// `model.lora`: PaLoRA's low-rank adapters (Dimitriadis, Frossard & Fleuret, ICLR 2025).
/// Every hidden linear layer of the MLP carries one adapter `(Aₜ, Bₜ)` per task of the stream,
/// `W(λ) = W + s·Σₜ λₜ BₜAₜ` with `s = lora_alpha / rank` (docs/EXTENSIONS.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// r: the adapters' rank. Default 1 (the paper's MultiMNIST setting).
    pub rank: usize,
    /// `lora_alpha`: the scale is `s = lora_alpha / r`. Default 1.
    pub lora_alpha: f32,
    /// After this many stream tasks the backbone (every body tensor that is not an adapter)
    /// gets no gradient: pure parameter-efficient fine-tuning of the adapters and heads.
    /// Absent (default): the backbone trains throughout, as in the paper.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_backbone_after: Option<usize>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 1,
            lora_alpha: 1.0,
            freeze_backbone_after: None,
        }
    }
}

/// The softplus β used when `model.softplus_beta` is unset (Srinivas et al.'s initialisation).
pub const DEFAULT_SOFTPLUS_BETA: f32 = 5.0;

/// What `model.init_from` does with the file's classifier head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InitHead {
    /// The head stays as seeded for the stream's classes (a pre-trained head is for other ones).
    #[default]
    Fresh,
    /// The head is loaded too; its tensors must be in the file with the model's shapes.
    Load,
}

impl InitHead {
    fn is_fresh(&self) -> bool {
        *self == InitHead::Fresh
    }
}

fn default_model_kind() -> ModelKind {
    ModelKind::Mlp
}
fn default_hidden() -> Vec<usize> {
    vec![100, 100]
}
fn default_activation() -> ActivationKind {
    ActivationKind::Relu
}
fn default_channels() -> Vec<usize> {
    vec![32, 64]
}
fn default_width() -> usize {
    20
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: default_model_kind(),
            hidden: default_hidden(),
            activation: default_activation(),
            dropout: 0.0,
            softplus_beta: None,
            learn_beta: false,
            dwa: None,
            lora: None,
            lipschitz_bn: false,
            channels: default_channels(),
            width: default_width(),
            options: serde_yaml::Mapping::new(),
            init: WeightInit::Pytorch,
            init_from: None,
            init_head: InitHead::Fresh,
            freeze: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// Constant learning rate.
    Constant,
    /// Multiply by `gamma` at each epoch in `milestones` (epochs counted within a task).
    Step { milestones: Vec<usize>, gamma: f32 },
    /// Cosine decay from lr to `min_lr` over each task's steps.
    Cosine {
        #[serde(default)]
        min_lr: f32,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// `sgd` (default), `adam` or `adamw`.
    #[serde(default = "default_opt")]
    pub kind: OptimizerKind,
    /// Learning rate. Default 0.03 (Mammoth's best for seq-mnist SGD).
    #[serde(default = "default_lr")]
    pub lr: f32,
    /// SGD momentum. Default 0.
    #[serde(default)]
    pub momentum: f32,
    /// SGD Nesterov momentum. Default false.
    #[serde(default)]
    pub nesterov: bool,
    /// L2 weight decay (coupled for SGD and Adam, decoupled for AdamW). Default 0 (AdamW: 0.01).
    #[serde(default)]
    pub weight_decay: Option<f32>,
    /// Adam betas. Default [0.9, 0.999].
    #[serde(default = "default_betas")]
    pub betas: [f32; 2],
    /// Adam epsilon. Default 1e-8.
    #[serde(default = "default_eps")]
    pub eps: f32,
    /// Rebuild optimizer state at each task start (Mammoth: true; Avalanche keeps it). Default true.
    #[serde(default = "yes")]
    pub reset_each_task: bool,
    /// Learning-rate schedule within each task. Default constant.
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Wrap the optimizer in Lookahead (Zhang et al., 2019). Default: absent (off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookahead: Option<LookaheadConfig>,
}

/// Slow weights φ beside the fast weights θ the optimizer trains: Lookahead (every `k` inner
/// steps φ ← φ + α(θ − φ), θ ← φ) or a per-step exponential moving average of θ, with or
/// without periodic resets of θ to φ (see [`SlowMode`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookaheadConfig {
    /// How φ follows θ. Default `lookahead` (left out of `config.yaml`, so runs from before the
    /// key existed still resume).
    #[serde(skip_serializing_if = "SlowMode::is_lookahead")]
    pub mode: SlowMode,
    /// `lookahead`: inner (fast) steps between two syncs; `ema-reset`: steps between two resets
    /// of θ to φ; unused by `ema`. Default 5 (Lookahead's code).
    pub k: usize,
    /// Slow-weights step size α ∈ (0, 1]: per sync for `lookahead`, per step for the EMA modes
    /// (an EMA decay d is α = 1 − d). Default 0.5 (Lookahead's code).
    pub alpha: f32,
    /// The weights evaluated (and saved as `task-<t>.safetensors`) after each task: the fast
    /// weights θ (default) or the slow weights φ (of the last sync for `lookahead`, the current
    /// average for the EMA modes). Training is the same either way.
    pub evaluate_with: EvaluateWith,
}

impl SlowMode {
    fn is_lookahead(&self) -> bool {
        *self == SlowMode::Lookahead
    }
}

/// How the slow weights follow the fast ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlowMode {
    /// Zhang et al. (NeurIPS 2019): every k steps φ ← φ + α(θ − φ), then θ ← φ.
    #[default]
    Lookahead,
    /// After every step φ ← φ + α(θ − φ); θ is never touched, so training is the plain
    /// optimizer's. With `evaluate_with: slow`, the temporal ensemble of Soutif-Cormerais et al.
    /// (CoLLAs 2023).
    Ema,
    /// After every step φ ← φ + α(θ − φ), and every k steps θ ← φ: Hare & Tortoise (Lee et al.,
    /// ICML 2024), the fast "hare" periodically reset to the slow "tortoise".
    EmaReset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvaluateWith {
    Fast,
    Slow,
}

impl Default for LookaheadConfig {
    fn default() -> Self {
        Self {
            mode: SlowMode::Lookahead,
            k: 5,
            alpha: 0.5,
            evaluate_with: EvaluateWith::Fast,
        }
    }
}

fn default_opt() -> OptimizerKind {
    OptimizerKind::Sgd
}
fn default_lr() -> f32 {
    0.03
}
fn default_betas() -> [f32; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f32 {
    1e-8
}
fn default_schedule() -> Schedule {
    Schedule::Constant
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: default_opt(),
            lr: default_lr(),
            momentum: 0.0,
            nesterov: false,
            weight_decay: None,
            betas: default_betas(),
            eps: default_eps(),
            reset_each_task: true,
            schedule: default_schedule(),
            lookahead: None,
        }
    }
}

impl OptimizerConfig {
    pub fn weight_decay(&self) -> f32 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::Adamw => 0.01,
            _ => 0.0,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Epochs per task. Default 1.
    #[serde(default = "one")]
    pub epochs: usize,
    /// Minibatch size of the incoming stream. Default 10.
    #[serde(default = "default_bs")]
    pub batch_size: usize,
    /// Batch size for evaluation. Default 1000.
    #[serde(default = "default_ebs")]
    pub eval_batch_size: usize,
    /// Write the loss to train_log.csv every this many steps (0 = never). Default 50.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Rescale the gradient when its global L2 norm over the trainable parameters exceeds this
    /// value, before the algorithm's `edit_gradients` (PyTorch's `clip_grad_norm_`). Default: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// `sequential` (default): each task trains on from the previous one. `independent`: each
    /// task fine-tunes θ₀ on its own and the consolidation strategy merges the task vectors
    /// (the LiNeS / task-arithmetic multi-task protocol).
    #[serde(default, skip_serializing_if = "TrainingMode::is_sequential")]
    pub mode: TrainingMode,
    /// Latency-aware ("real-time") online evaluation of a one-pass stream. Absent = off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realtime: Option<RealTimeConfig>,
}

/// `training.realtime`: the stream does not wait for training (Ghunaim et al., "Real-Time
/// Evaluation in Online Continual Learning: A New Hope", CVPR 2023; FLAME, Courdier & Fleuret
/// 2020). One incoming batch arrives per unit of time, a naive step's compute. Every batch is
/// first predicted with the current weights (online accuracy); a step costing `C` units keeps the
/// learner busy, so it trains on a batch only when it is free: with a constant `C`, on one of every
/// ⌈C⌉ batches. With a label delay `Δ` the batch trained on at arrival `i` is batch `i − Δ`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealTimeConfig {
    /// A step's cost `C` relative to a naive step: `counted` (default), the step's own sample
    /// passes ([`crate::StepCost::relative`]), or a fixed number ≥ 1.
    pub cost: StepCostRule,
    /// `Δ`, in batches. Default 0.
    pub label_delay: usize,
}

impl Default for RealTimeConfig {
    fn default() -> Self {
        Self {
            cost: StepCostRule::Rule(CostCounted::Counted),
            label_delay: 0,
        }
    }
}

/// `training.realtime.cost`: a number, or `counted`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged, expecting = "a number ≥ 1 or `counted`")]
pub enum StepCostRule {
    Fixed(f64),
    Rule(CostCounted),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CostCounted {
    Counted,
}

/// How tasks follow each other, see [`TrainingConfig::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainingMode {
    #[default]
    Sequential,
    Independent,
}

impl TrainingMode {
    pub fn is_sequential(&self) -> bool {
        *self == TrainingMode::Sequential
    }
}

fn one() -> usize {
    1
}
fn default_bs() -> usize {
    10
}
fn default_ebs() -> usize {
    1000
}
fn default_log_every() -> usize {
    50
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: default_bs(),
            eval_batch_size: default_ebs(),
            log_every: default_log_every(),
            clip_grad_norm: None,
            mode: TrainingMode::Sequential,
            realtime: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Root of run directories. Default `runs`.
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
}

fn default_dir() -> PathBuf {
    PathBuf::from("runs")
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self { dir: default_dir() }
    }
}

/// Parse YAML text into a config, applying `key=value` overrides first.
/// `origin` names the file in error messages.
/// A resolved config (a run's config.yaml) as runs are compared: without `output` (where a run
/// went does not change what it computed), without unset (`null`) keys, and without the model keys
/// its `model.kind` does not read. Config files written before those keys were left out compare
/// equal to today's.
pub fn comparable_config(v: &serde_yaml::Value) -> serde_yaml::Value {
    fn drop_nulls(v: &mut serde_yaml::Value) {
        if let Some(m) = v.as_mapping_mut() {
            m.retain(|_, x| !x.is_null());
            for (_, x) in m.iter_mut() {
                drop_nulls(x);
            }
        }
    }
    let mut v = v.clone();
    drop_nulls(&mut v);
    if let Some(m) = v.as_mapping_mut() {
        m.remove("output");
        m.remove("device");
    }
    drop_other_model_keys(&mut v);
    v
}

/// Remove from a config's `model` section the keys its `kind` does not read.
fn drop_other_model_keys(v: &mut serde_yaml::Value) {
    let Some(model) = v.get_mut("model").and_then(|m| m.as_mapping_mut()) else {
        return;
    };
    let unused: &[&str] = match model.get("kind").and_then(|k| k.as_str()).unwrap_or("mlp") {
        "mlp" => &["channels", "width"],
        "cnn" => &["hidden", "activation", "dropout", "width"],
        "resnet18" => &["hidden", "activation", "dropout", "channels"],
        // A registered backbone reads `options` only.
        _ => &["hidden", "activation", "dropout", "channels", "width"],
    };
    for k in unused {
        model.remove(*k);
    }
}

pub fn parse_config(text: &str, origin: &str, overrides: &[String]) -> Result<ExperimentConfig> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| Error::Config {
        file: origin.to_string(),
        path: location(&e),
        message: format!("invalid YAML: {e}"),
    })?;
    // Overrides descend into the top level, and their errors would blame a key.
    if !value.is_mapping() {
        let found = match &value {
            serde_yaml::Value::Null => "empty",
            serde_yaml::Value::Sequence(_) => "a list",
            _ => "a single value",
        };
        return Err(Error::Config {
            file: origin.to_string(),
            path: "(top level)".into(),
            message: format!(
                "the file's top level must be a mapping of keys (name:, benchmark:, ...), but it \
                 is {found}; see configs/quickstart.yaml"
            ),
        });
    }
    for o in overrides {
        apply_override(&mut value, o).map_err(|message| Error::Config {
            file: origin.to_string(),
            path: o.split('=').next().unwrap_or("").to_string(),
            message,
        })?;
    }
    from_value(value, origin, "")
}

fn location(e: &serde_yaml::Error) -> String {
    e.location()
        .map(|l| format!("line {} column {}", l.line(), l.column()))
        .unwrap_or_else(|| "(document)".into())
}

/// Deserialize a YAML value into `T`, turning serde's message into one that names the key path,
/// what was expected, and the closest valid key for a typo. `prefix` is prepended to the path
/// (e.g. `algorithm` for an algorithm's own config).
pub fn from_value<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    origin: &str,
    prefix: &str,
) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.inner().to_string();
        let mut path = e.path().to_string();
        if path == "." {
            path.clear();
        }
        let full = match (prefix.is_empty(), path.is_empty()) {
            (true, _) => path,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}.{path}"),
        };
        Error::Config {
            file: origin.to_string(),
            path: if full.is_empty() {
                "(top level)".into()
            } else {
                full
            },
            message: improve_message(&inner),
        }
    })
}

/// serde says "unknown field `momentun`, expected one of `lr`, `momentum`, ..."; add the nearest
/// candidate, and say so plainly when a section takes no keys at all.
fn improve_message(msg: &str) -> String {
    let candidates = |m: &str| -> Vec<String> {
        m.split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s.to_string())
            .collect()
    };
    for kind in ["unknown field", "unknown variant"] {
        if let Some(rest) = msg.strip_prefix(kind) {
            let names = candidates(rest);
            if let Some((given, valid)) = names.split_first() {
                if valid.is_empty() {
                    return format!("{kind} `{given}`: this section takes no keys");
                }
                let list = valid.join(", ");
                return match closest(given, valid) {
                    Some(best) => {
                        format!("{kind} `{given}`; did you mean `{best}`? (valid: {list})")
                    }
                    None => format!("{kind} `{given}`; valid: {list}"),
                };
            }
        }
    }
    msg.to_string()
}

/// The candidate closest to `given` by edit distance, if it is plausibly a typo of it.
pub fn closest<'a>(given: &str, candidates: &'a [String]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(given, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

/// Apply one `a.b.c=value` override; the value is parsed as YAML (so `0.1`, `true`, `[1, 2]` work).
pub fn apply_override(root: &mut serde_yaml::Value, spec: &str) -> std::result::Result<(), String> {
    let (key, raw) = spec
        .split_once('=')
        .ok_or_else(|| format!("override `{spec}` must look like key.path=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("override `{spec}` has an empty key"));
    }
    let value: serde_yaml::Value =
        serde_yaml::from_str(raw).map_err(|e| format!("cannot parse value `{raw}`: {e}"))?;
    let mut node = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| format!("`{}` is not a mapping", parts[..i].join(".")))?;
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert(serde_yaml::Value::Mapping(Default::default()));
    }
    Ok(())
}

impl ExperimentConfig {
    /// Fill defaults that depend on other keys, so the resolved config states them.
    /// The config as it is written into a run's config.yaml: every default filled in, and
    /// nothing that is unset (`null`) or that the chosen model kind does not read.
    pub fn resolved_yaml(&self) -> Result<String> {
        let mut v = serde_yaml::to_value(self).map_err(|e| Error::msg(e.to_string()))?;
        drop_other_model_keys(&mut v);
        serde_yaml::to_string(&v).map_err(|e| Error::msg(e.to_string()))
    }

    pub fn resolve_defaults(&mut self) {
        self.optimizer.weight_decay = Some(self.optimizer.weight_decay());
    }

    /// Check cross-field constraints that serde cannot express.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |path: &str, message: String| Error::Config {
            file: origin.to_string(),
            path: path.to_string(),
            message,
        };
        let b = &self.benchmark;
        if b.tasks == 0 {
            return Err(err("benchmark.tasks", "must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&b.validation_fraction) {
            return Err(err(
                "benchmark.validation_fraction",
                format!("must be in [0, 1), found {}", b.validation_fraction),
            ));
        }
        if b.eval_on == EvalSplit::Validation && b.validation_fraction == 0.0 {
            return Err(err(
                "benchmark.eval_on",
                "`validation` needs benchmark.validation_fraction > 0".into(),
            ));
        }
        if b.kind != StreamKind::Split
            && b.scenario == Scenario::TaskIl
            && b.task_il_head == TaskIlHead::Masked
        {
            // Permuted/rotated tasks share their classes, so a masked shared head cannot separate them.
            return Err(err(
                "benchmark.task_il_head",
                format!(
                    "{:?} task-IL needs `multi` (every task reuses the same classes)",
                    b.kind
                )
                .to_lowercase(),
            ));
        }
        // LiNeS `gamma: auto` / `beta: auto` (also in a strategy's `lines:` block) choose on the
        // validation split.
        if let Some(c) = &self.consolidation {
            for (key, v) in [
                ("consolidation.gamma", &c["gamma"]),
                ("consolidation.beta", &c["beta"]),
                ("consolidation.lines.gamma", &c["lines"]["gamma"]),
                ("consolidation.lines.beta", &c["lines"]["beta"]),
            ] {
                if v.as_str() == Some("auto") && b.validation_fraction == 0.0 {
                    return Err(err(
                        key,
                        "`auto` chooses on validation data: set benchmark.validation_fraction > 0"
                            .into(),
                    ));
                }
            }
        }
        if self.training.mode == TrainingMode::Independent {
            let algo = self.algorithm.get("name").unwrap_or(&self.algorithm);
            if algo.as_str() != Some("naive") {
                return Err(err(
                    "training.mode",
                    "`independent` fine-tunes θ₀ on each task alone: it needs `algorithm: naive`"
                        .into(),
                ));
            }
            if self.consolidation.is_none() {
                return Err(err(
                    "training.mode",
                    "`independent` merges the task vectors: it needs a `consolidation` strategy with `anchor: initial`".into(),
                ));
            }
        }
        if let Some(rt) = &self.training.realtime {
            if self.training.epochs != 1 {
                return Err(err(
                    "training.realtime",
                    format!(
                        "evaluates a one-pass stream: it needs training.epochs: 1, found {}",
                        self.training.epochs
                    ),
                ));
            }
            if let StepCostRule::Fixed(c) = rt.cost {
                if !(c.is_finite() && c >= 1.0) {
                    return Err(err(
                        "training.realtime.cost",
                        format!(
                            "must be `counted` or a number ≥ 1 (a naive step costs 1), found {c}"
                        ),
                    ));
                }
            }
            if self.training.mode == TrainingMode::Independent {
                return Err(err(
                    "training.realtime",
                    "evaluates one sequential stream; remove it or training.mode: independent"
                        .into(),
                ));
            }
        }
        if b.base_classes == Some(0) {
            return Err(err(
                "benchmark.base_classes",
                "must be at least 1 (remove the key for no pre-training task)".into(),
            ));
        }
        if b.base_epochs == Some(0) {
            return Err(err("benchmark.base_epochs", "must be at least 1".into()));
        }
        if b.base_epochs.is_some() && b.base_classes.is_none() {
            return Err(err(
                "benchmark.base_epochs",
                "applies with benchmark.base_classes only; remove it or set base_classes".into(),
            ));
        }
        if b.base_classes.is_some() && b.scenario == Scenario::DomainIl {
            return Err(err(
                "benchmark.base_classes",
                "needs `scenario: class-il` or `task-il` (domain-IL tasks share their output units); remove it".into(),
            ));
        }
        let split_only = [
            ("benchmark.base_classes", b.base_classes.is_some()),
            ("benchmark.classes_per_task", b.classes_per_task.is_some()),
            ("benchmark.classes", b.classes.is_some()),
            ("benchmark.class_order", b.class_order != ClassOrder::Fixed),
        ];
        for (key, given) in split_only {
            if given && b.kind != StreamKind::Split {
                return Err(err(key, "applies to `kind: split` only; remove it".into()));
            }
        }
        if b.angles.is_some() && b.kind != StreamKind::Rotated {
            return Err(err(
                "benchmark.angles",
                "applies to `kind: rotated` only; remove it".into(),
            ));
        }
        if let Some(a) = &b.angles {
            if a.len() != b.tasks {
                return Err(err(
                    "benchmark.angles",
                    format!(
                        "has {} angles for {} tasks; give one per task",
                        a.len(),
                        b.tasks
                    ),
                ));
            }
        }
        let a = &self.augmentation;
        a.check(crate::data::discovery::input_shape(&b.dataset))
            .map_err(|(path, message)| err(&path, message))?;
        if a.normalize.is_some() && b.normalize {
            return Err(err(
                "augmentation.normalize",
                "benchmark.normalize: true standardises with the dataset's own statistics \
                 already; keep one of the two"
                    .into(),
            ));
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(err(
                "optimizer.lr",
                format!("must be a positive number, found {}", o.lr),
            ));
        }
        if o.kind != OptimizerKind::Sgd && (o.momentum != 0.0 || o.nesterov) {
            return Err(err(
                "optimizer.momentum",
                format!(
                    "momentum/nesterov apply to sgd only; {:?} has betas",
                    o.kind
                )
                .to_lowercase(),
            ));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(err(
                "optimizer.momentum",
                format!("must be in [0, 1), found {}", o.momentum),
            ));
        }
        if o.nesterov && o.momentum == 0.0 {
            return Err(err(
                "optimizer.nesterov",
                "needs optimizer.momentum > 0".into(),
            ));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(err(
                "optimizer.betas",
                format!("each must be in [0, 1), found {:?}", o.betas),
            ));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(err(
                "optimizer.eps",
                format!("must be > 0, found {}", o.eps),
            ));
        }
        match &o.schedule {
            Schedule::Constant => {}
            Schedule::Step { gamma, .. } => {
                if !(gamma.is_finite() && *gamma > 0.0) {
                    return Err(err(
                        "optimizer.schedule.gamma",
                        format!("must be > 0, found {gamma}"),
                    ));
                }
            }
            Schedule::Cosine { min_lr } => {
                if !(0.0..=o.lr).contains(min_lr) {
                    return Err(err(
                        "optimizer.schedule.min_lr",
                        format!("must be in [0, optimizer.lr = {}], found {min_lr}", o.lr),
                    ));
                }
            }
        }
        if let Some(w) = o.weight_decay {
            if !(w.is_finite() && w >= 0.0) {
                return Err(err(
                    "optimizer.weight_decay",
                    format!("must be ≥ 0, found {w}"),
                ));
            }
        }
        if let Some(la) = &o.lookahead {
            if la.k == 0 {
                return Err(err("optimizer.lookahead.k", "must be at least 1".into()));
            }
            if !(la.alpha > 0.0 && la.alpha <= 1.0) {
                return Err(err(
                    "optimizer.lookahead.alpha",
                    format!("must be in (0, 1], found {}", la.alpha),
                ));
            }
            if la.mode == SlowMode::Ema && la.evaluate_with == EvaluateWith::Fast {
                return Err(err(
                    "optimizer.lookahead.evaluate_with",
                    "`mode: ema` never changes the trained weights, so with `fast` it does \
                     nothing; set `evaluate_with: slow`"
                        .into(),
                ));
            }
            if la.evaluate_with == EvaluateWith::Slow && self.consolidation.is_some() {
                return Err(err(
                    "optimizer.lookahead.evaluate_with",
                    "`slow` cannot be combined with a consolidation strategy (not implemented)"
                        .into(),
                ));
            }
        }
        let t = &self.training;
        if t.epochs == 0 {
            return Err(err("training.epochs", "must be at least 1".into()));
        }
        if t.batch_size == 0 {
            return Err(err("training.batch_size", "must be at least 1".into()));
        }
        if t.eval_batch_size == 0 {
            return Err(err("training.eval_batch_size", "must be at least 1".into()));
        }
        if let Some(c) = t.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(err(
                    "training.clip_grad_norm",
                    format!("must be a finite number > 0 (or left out), found {c}"),
                ));
            }
        }
        let m = &self.model;
        if !(0.0..1.0).contains(&m.dropout) {
            return Err(err(
                "model.dropout",
                format!("must be in [0, 1), found {}", m.dropout),
            ));
        }
        // A layer of width 0 has no weights: its outputs are constant and the loss NaN.
        if m.kind == ModelKind::Mlp && m.hidden.contains(&0) {
            return Err(err(
                "model.hidden",
                format!("every width must be at least 1, found {:?}", m.hidden),
            ));
        }
        let mlp_only = [
            (
                "activation",
                m.activation == ActivationKind::CenteredSoftplus,
            ),
            ("softplus_beta", m.softplus_beta.is_some()),
            ("learn_beta", m.learn_beta),
            ("lora", m.lora.is_some()),
        ];
        if m.lipschitz_bn && m.kind != ModelKind::Resnet18 {
            return Err(err(
                "model.lipschitz_bn",
                format!(
                    "is built for kind: resnet18 only; {} has no batch norm",
                    m.kind.name()
                ),
            ));
        }
        if let Some((key, _)) = mlp_only.iter().find(|(_, set)| *set) {
            if m.kind != ModelKind::Mlp {
                return Err(err(
                    &format!("model.{key}"),
                    format!(
                        "is built for kind: mlp only; {} does not read it (docs/EXTENSIONS.md)",
                        m.kind.name()
                    ),
                ));
            }
        }
        if m.dwa.is_some() && !matches!(m.kind, ModelKind::Mlp | ModelKind::Resnet18) {
            return Err(err(
                "model.dwa",
                format!(
                    "is built for kind: mlp and resnet18 only; {} does not read it \
                     (docs/EXTENSIONS.md)",
                    m.kind.name()
                ),
            ));
        }
        if (m.softplus_beta.is_some() || m.learn_beta)
            && m.activation != ActivationKind::CenteredSoftplus
        {
            let key = if m.learn_beta {
                "learn_beta"
            } else {
                "softplus_beta"
            };
            return Err(err(
                &format!("model.{key}"),
                "is read with `activation: centered-softplus` only".into(),
            ));
        }
        if let Some(b) = m.softplus_beta {
            if !(b.is_finite() && b > 0.0) {
                return Err(err(
                    "model.softplus_beta",
                    format!("must be a finite number > 0, found {b}"),
                ));
            }
        }
        if let Some(d) = m.dwa {
            if d.dilation == 0 || d.period == 0 {
                let key = if d.dilation == 0 {
                    "dilation"
                } else {
                    "period"
                };
                return Err(err(
                    &format!("model.dwa.{key}"),
                    "must be at least 1".into(),
                ));
            }
            if m.kind == ModelKind::Mlp && m.hidden.windows(2).any(|w| w[0] != w[1]) {
                return Err(err(
                    "model.dwa",
                    format!(
                        "averages hidden outputs, which needs equal widths; found {:?}",
                        m.hidden
                    ),
                ));
            }
        }
        if let Some(l) = m.lora {
            if l.rank == 0 {
                return Err(err("model.lora.rank", "must be at least 1".into()));
            }
            if !(l.lora_alpha.is_finite() && l.lora_alpha > 0.0) {
                return Err(err(
                    "model.lora.lora_alpha",
                    format!("must be a finite number > 0, found {}", l.lora_alpha),
                ));
            }
            if l.freeze_backbone_after == Some(0) {
                return Err(err(
                    "model.lora.freeze_backbone_after",
                    "must be at least 1 (a number of tasks); leave it out to train the backbone \
                     throughout"
                        .into(),
                ));
            }
            if m.hidden.is_empty() {
                return Err(err(
                    "model.lora",
                    "adapts the hidden layers, and `model.hidden` is empty".into(),
                ));
            }
            if l.freeze_backbone_after
                .is_some_and(|n| n >= self.benchmark.tasks)
            {
                return Err(err(
                    "model.lora.freeze_backbone_after",
                    format!(
                        "freezes after that many tasks, and the stream has {}: the backbone would \
                         never freeze; set it below benchmark.tasks or leave it out",
                        self.benchmark.tasks
                    ),
                ));
            }
            if self.consolidation.is_some() {
                // The strategies merge tensors one by one: averaging the factors Aₜ, Bₜ is not
                // averaging the adapters' updates BₜAₜ.
                return Err(err(
                    "model.lora",
                    "a consolidation strategy would merge the adapters' factors A and B one by                      one, not their products BₜAₜ; remove model.lora or consolidation"
                        .into(),
                ));
            }
        }
        if m.kind == ModelKind::Cnn && (m.channels.is_empty() || m.channels.contains(&0)) {
            return Err(err(
                "model.channels",
                format!(
                    "give at least one block, each of at least 1 channel; found {:?}",
                    m.channels
                ),
            ));
        }
        if m.kind == ModelKind::Resnet18 && m.width == 0 {
            return Err(err("model.width", "must be at least 1".into()));
        }
        if !m.options.is_empty() && !matches!(m.kind, ModelKind::Other(_)) {
            return Err(err(
                "model.options",
                format!(
                    "only registered backbones take options; {} is configured by the keys of \
                     `model:` itself (see docs/config.md)",
                    m.kind.name()
                ),
            ));
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return Err(err(
                "name",
                format!("`{}` must be a non-empty name without slashes", self.name),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "name: t\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il }\n";

    fn err_of(text: &str, overrides: &[&str]) -> String {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        parse_config(text, "exp.yaml", &o).unwrap_err().to_string()
    }

    #[test]
    fn resolved_yaml_omits_unset_and_unread_keys_and_compares_equal_to_older_files() {
        let mut c = parse_config(MIN, "exp.yaml", &[]).unwrap();
        c.resolve_defaults();
        let text = c.resolved_yaml().unwrap();
        assert!(
            !text.contains("null") && !text.contains("channels"),
            "{text}"
        );
        // Reading it back gives the same config.
        assert_eq!(parse_config(&text, "r.yaml", &[]).unwrap(), c);
        // A config.yaml written with `null`s and every backbone's keys compares equal.
        let new: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let mut old = serde_yaml::to_value(&c).unwrap();
        assert!(
            old["model"]["width"].is_number(),
            "the other backbones' keys are there"
        );
        old["benchmark"]["classes_per_task"] = serde_yaml::Value::Null;
        assert_eq!(comparable_config(&old), comparable_config(&new));
        let cnn = parse_config(MIN, "exp.yaml", &["model.kind=cnn".into()]).unwrap();
        let t = cnn.resolved_yaml().unwrap();
        assert!(t.contains("channels") && !t.contains("hidden"), "{t}");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse_config(MIN, "exp.yaml", &[]).unwrap();
        assert_eq!(c.seed, 0);
        assert_eq!(c.model.hidden, vec![100, 100]);
        assert_eq!(c.training.batch_size, 10);
        assert_eq!(c.optimizer.lr, 0.03);
        assert!(c.optimizer.reset_each_task);
        assert_eq!(c.algorithm["name"].as_str(), Some("naive"));
    }

    #[test]
    fn unknown_key_names_file_path_and_suggestion() {
        let m = err_of(&format!("{MIN}optimizer: {{ lr_deacy: 0.1 }}\n"), &[]);
        assert!(m.starts_with("exp.yaml: optimizer"), "{m}");
        assert!(m.contains("unknown field `lr_deacy`"), "{m}");
        let m = err_of(&format!("{MIN}trainig: {{ epochs: 2 }}\n"), &[]);
        assert!(m.contains("did you mean `training`"), "{m}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let m = err_of(MIN, &["training.epochs=many"]);
        assert!(m.contains("training.epochs"), "{m}");
        assert!(m.contains("invalid type"), "{m}");
    }

    #[test]
    fn unknown_variant_lists_valid_values() {
        let m = err_of(MIN, &["benchmark.scenario=class_il"]);
        assert!(m.contains("benchmark.scenario"), "{m}");
        assert!(m.contains("did you mean `class-il`"), "{m}");
    }

    #[test]
    fn overrides_set_nested_keys() {
        let c = parse_config(
            MIN,
            "x",
            &["optimizer.lr=0.5".into(), "model.hidden=[10]".into()],
        )
        .unwrap();
        assert_eq!(c.optimizer.lr, 0.5);
        assert_eq!(c.model.hidden, vec![10]);
        assert!(err_of(MIN, &["optimizer.lr"]).contains("key.path=value"));
    }

    #[test]
    fn validation_catches_cross_field_errors() {
        let c = parse_config(MIN, "x", &["optimizer.lr=-1".into()]).unwrap();
        assert!(c
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("optimizer.lr"));
    }

    /// The extension keys of the MLP: absent from a default config's YAML; refused, in one line
    /// naming the key, on another backbone, without centered-softplus, or out of range.
    #[test]
    fn mlp_extension_keys_are_checked_and_absent_by_default() {
        let plain = parse_config(MIN, "x", &[])
            .unwrap()
            .resolved_yaml()
            .unwrap();
        for key in ["softplus_beta", "learn_beta", "dwa", "lipschitz_bn"] {
            assert!(!plain.contains(key), "{plain}");
        }
        let ok = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            let c = parse_config(MIN, "x", &o).unwrap();
            c.validate("x").unwrap();
            c
        };
        let c = ok(&[
            "model.activation=centered-softplus",
            "model.learn_beta=true",
            "model.dwa={}",
        ]);
        assert_eq!(c.model.dwa, Some(DwaConfig::default()));
        assert!(c.resolved_yaml().unwrap().contains("learn_beta: true"));
        let bad = |o: &[&str], key: &str| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            let e = parse_config(MIN, "x", &o)
                .unwrap()
                .validate("x")
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{o:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        };
        bad(
            &["model.kind=cnn", "model.activation=centered-softplus"],
            "model.activation",
        );
        bad(&["model.kind=cnn", "model.dwa={}"], "model.dwa");
        // The ResNet-18 averages within its stages, whatever `hidden` (an MLP key) says.
        ok(&[
            "model.kind=resnet18",
            "model.hidden=[10, 20]",
            "model.dwa={}",
        ]);
        bad(
            &["model.kind=resnet18", "model.dwa={period: 0}"],
            "model.dwa.period",
        );
        bad(&["model.lipschitz_bn=true"], "model.lipschitz_bn");
        bad(&["model.softplus_beta=2"], "model.softplus_beta");
        bad(
            &[
                "model.activation=centered-softplus",
                "model.softplus_beta=0",
            ],
            "model.softplus_beta",
        );
        bad(&["model.dwa={dilation: 0}"], "model.dwa.dilation");
        bad(&["model.hidden=[10, 20]", "model.dwa={}"], "model.dwa");
        // PaLoRA adapters.
        assert!(!plain.contains("lora"), "{plain}");
        let c = ok(&["model.lora={}"]);
        assert_eq!(c.model.lora, Some(LoraConfig::default()));
        let y = c.resolved_yaml().unwrap();
        assert!(
            y.contains("rank: 1") && !y.contains("freeze_backbone_after"),
            "{y}"
        );
        let c = ok(&["model.lora={rank: 4, lora_alpha: 8, freeze_backbone_after: 1}"]);
        assert_eq!(c.model.lora.map(|l| l.freeze_backbone_after), Some(Some(1)));
        bad(&["model.kind=cnn", "model.lora={}"], "model.lora");
        bad(&["model.kind=resnet18", "model.lora={}"], "model.lora");
        bad(&["model.lora={rank: 0}"], "model.lora.rank");
        bad(&["model.lora={lora_alpha: 0}"], "model.lora.lora_alpha");
        bad(
            &["model.lora={freeze_backbone_after: 0}"],
            "model.lora.freeze_backbone_after",
        );
        bad(&["model.hidden=[]", "model.lora={}"], "model.lora");
        bad(
            &["benchmark.tasks=2", "model.lora={freeze_backbone_after: 2}"],
            "model.lora.freeze_backbone_after",
        );
        bad(&["model.lora={}", "consolidation=lines"], "model.lora");
        let e = parse_config(MIN, "x", &["model.lora={ranks: 2}".to_string()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks"), "{e}");
    }

    #[test]
    fn augmentation_is_off_by_default_and_its_values_are_checked_against_the_dataset() {
        let c = parse_config(MIN, "x", &[]).unwrap();
        assert!(c.augmentation.is_off());
        assert!(!c.resolved_yaml().unwrap().contains("augmentation"));
        let cifar =
            "name: t\nbenchmark: { dataset: cifar10, kind: split, tasks: 5, scenario: class-il }\n";
        let bad = |o: &[&str], key: &str| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            let e = parse_config(cifar, "exp.yaml", &o)
                .unwrap()
                .validate("exp.yaml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("exp.yaml") && e.contains(key), "{o:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        };
        bad(
            &["augmentation.random_crop.padding=33"],
            "augmentation.random_crop.padding",
        );
        bad(
            &["augmentation.horizontal_flip=-0.1"],
            "augmentation.horizontal_flip",
        );
        bad(
            &["augmentation.normalize={mean: [0.5, 0.5, 0.5], std: [0.2, 0, 0.2]}"],
            "augmentation.normalize.std",
        );
        bad(
            &["augmentation.normalize={mean: [0.5], std: [0.2]}"],
            "augmentation.normalize.mean",
        );
        bad(
            &["augmentation.normalize={mean: [0.5, 0.5], std: [0.2]}"],
            "augmentation.normalize",
        );
        bad(
            &[
                "benchmark.normalize=true",
                "augmentation.normalize={mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]}",
            ],
            "augmentation.normalize",
        );
        let e = parse_config(
            cifar,
            "exp.yaml",
            &["augmentation.random_crop.pad=4".into()],
        );
        assert!(e.unwrap_err().to_string().contains("padding"));
        let ok = parse_config(
            cifar,
            "x",
            &[
                "augmentation.random_crop.padding=4".into(),
                "augmentation.horizontal_flip=0.5".into(),
            ],
        )
        .unwrap();
        ok.validate("x").unwrap();
        assert!(ok.resolved_yaml().unwrap().contains("horizontal_flip: 0.5"));
    }

    #[test]
    fn optimizer_and_stream_specific_keys_are_checked() {
        let bad = |o: &[&str], key: &str| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            let c = parse_config(MIN, "x", &o).unwrap();
            let e = c.validate("x").unwrap_err().to_string();
            assert!(e.contains(key), "{o:?}: {e}");
        };
        bad(
            &["optimizer.kind=adam", "optimizer.betas=[1.0, 0.999]"],
            "optimizer.betas",
        );
        bad(&["optimizer.eps=0"], "optimizer.eps");
        bad(
            &["optimizer.lookahead={mode: ema}"],
            "optimizer.lookahead.evaluate_with",
        );
        bad(&["optimizer.lookahead={k: 0}"], "optimizer.lookahead.k");
        bad(
            &[
                "optimizer.lookahead={evaluate_with: slow}",
                "consolidation={name: average}",
            ],
            "optimizer.lookahead.evaluate_with",
        );
        let e = err_of(MIN, &["optimizer.lookahead={k: 5, beta: 0.5}"]);
        assert!(
            e.contains("optimizer.lookahead") && e.contains("beta"),
            "{e}"
        );
        let c = parse_config(MIN, "x", &["optimizer.lookahead={}".into()]).unwrap();
        assert_eq!(c.optimizer.lookahead, Some(LookaheadConfig::default()));
        for alpha in ["0", "-0.5", "1.5", ".nan"] {
            bad(
                &[&format!("optimizer.lookahead={{alpha: {alpha}}}")],
                "optimizer.lookahead.alpha",
            );
        }
        bad(
            &["optimizer.schedule={kind: step, milestones: [1], gamma: -0.1}"],
            "optimizer.schedule.gamma",
        );
        bad(
            &["optimizer.schedule={kind: cosine, min_lr: 1.0}"],
            "optimizer.schedule.min_lr",
        );
        bad(
            &["optimizer.kind=adam", "optimizer.momentum=0.9"],
            "optimizer.momentum",
        );
        bad(
            &[
                "benchmark.kind=permuted",
                "benchmark.scenario=domain-il",
                "benchmark.classes_per_task=2",
            ],
            "benchmark.classes_per_task",
        );
        bad(&["benchmark.angles=[0, 1, 2, 3, 4]"], "benchmark.angles");
        bad(&["name=.hidden"], "name");
    }
}
