//! LUCIR — Learning a Unified Classifier Incrementally via Rebalancing (Hou, Pan, Loy, Wang &
//! Lin, CVPR 2019).
//!
//! **Cosine normalisation.** The class scores are LUCIR's own classifier, not the backbone's
//! linear head (which stays untrained): with `f̄ = f(x)/‖f(x)‖` the backbone's normalised
//! features and `w̄_c` the normalised weight of class `c`,
//!
//! `p_c(x) = softmax_c(σ · ⟨w̄_c, f̄(x)⟩)`,  `σ` learned (from 1).
//!
//! The weights and `σ` are the algorithm's own parameters ([`Algorithm::own_params`]), updated by
//! the trainer's optimizer with the backbone's.
//!
//! **Objective** on task `t` with `|C_old|` old and `|C_new|` new classes, on the task's data plus
//! the exemplars of the old classes:
//!
//! `L = L_ce + λ · L_dis^G + λ_mr · L_mr`
//!
//! - `L_ce`: cross-entropy over the classes seen so far (the paper's classifier has no units for
//!   future classes; in multi-head task-IL over the sample's own head).
//! - Less-forget constraint: `L_dis^G = 1 − ⟨f̄*(x), f̄(x)⟩` (batch mean), `f̄*` the normalised
//!   features of the model at the start of the task (a fork, in evaluation mode), with the
//!   adaptive weight `λ = λ_base · √(|C_old| / |C_new|)`. Zero on the first task.
//! - Margin ranking on each old-class sample of the batch (exemplars): its ground-truth cosine
//!   `⟨w̄_y, f̄⟩` against the `K` largest cosines of the **new** classes,
//!   `L_mr = (1 / (|O|·K)) Σ_{x ∈ O} Σ_{k=1..K} max(0, m − ⟨w̄_y, f̄⟩ + ⟨w̄_{n_k}, f̄⟩)`
//!   (on cosines, not scaled by σ, as the authors' code).
//!
//! As in the authors' code the old classes' weights are fixed while a new task is learned (their
//! rows get no gradient), and the new classes' weights are **imprinted** at the task's start
//! (`imprint_weights`): the normalised mean of the class's normalised features, scaled to the mean
//! norm of the old weights. The first task's weights are drawn uniformly in `±1/√d` from the
//! algorithm's random stream.
//!
//! **Exemplars**: `buffer_size` samples split evenly over the classes seen, chosen by iCaRL's
//! herding after each task ([`crate::exemplars::update_exemplars`]).
//!
//! **Class-balanced finetuning** (CBF, as in the authors'
//! `cbf_class_incremental_cosine_imagenet.py`): after each task `t ≥ 1` and the exemplar update,
//! the classifier — every seen class's weight and `σ` — is fine-tuned on the exemplars alone
//! (class-balanced) for `cbf_epochs` epochs of SGD (momentum 0.9) at `cbf_lr`, batches of
//! `cbf_batch_size`, on `L_ce + λ_mr · L_mr`, with the backbone frozen in evaluation mode (its
//! features are detached, so `L_dis^G` would be constant and is left out). This is the authors'
//! "both old and novel embeddings" option; the backbone is never changed by it.
//!
//! **Evaluation**: the cosine classifier over the classes seen so far (`σ·⟨w̄_c, f̄⟩`, unseen
//! units never win); with `nme: true`, the nearest mean of exemplars ([`crate::exemplars`]).
//! Before the first task (the untrained row of the matrix) the backbone's logits are used. The
//! training log's accuracy is the backbone head's and means nothing for LUCIR.
//!
//! Defaults: `λ_base = 5`, `K = 2`, `m = 0.5`, `λ_mr = 1` (the paper / the authors' CIFAR-100
//! script); `cbf_epochs`, `cbf_lr` and `cbf_batch_size` are this implementation's choice. Class-IL
//! and task-IL only: domain-IL reuses the output units, so there are no old and new classes.

use std::ops::Range;

use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use sequel_core::algorithm::task_samples;
use sequel_core::data::{Batch, GatherBuf, SampleRef, Split, TaskStream};
use sequel_core::model::{Model, ModelOutput, ParamSet, Role};
use sequel_core::optim::Sgd;
use sequel_core::step::{finite_loss, optimize_with};
use sequel_core::{Algorithm, AlgorithmConfig, Error, EvalCtx, Result, StateIo, StepCtx, TaskCtx};

use crate::check;
use crate::exemplars::{class_means, features_of, nme_scores, update_exemplars};
use crate::exemplars::{ClassMeans, ExemplarSet};

/// YAML keys of `algorithm: { name: lucir, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LucirConfig {
    /// Exemplar memory in samples, split evenly over the classes seen.
    pub buffer_size: usize,
    /// λ_base of the less-forget constraint's adaptive weight.
    pub lambda_base: f64,
    /// Weight of the margin ranking loss.
    pub lambda_mr: f64,
    /// K: hard negatives (new classes) per old-class sample.
    #[serde(rename = "K")]
    pub k: usize,
    /// Margin m of the ranking loss (on cosines).
    pub margin: f64,
    /// Initialise each new class's weight from its normalised mean feature.
    pub imprint_weights: bool,
    /// Epochs of class-balanced finetuning after each task from the second on (0: none).
    pub cbf_epochs: usize,
    /// Learning rate of the class-balanced finetuning.
    pub cbf_lr: f64,
    /// Batch size of the class-balanced finetuning.
    pub cbf_batch_size: usize,
    /// Evaluate with the nearest mean of exemplars instead of the cosine classifier.
    pub nme: bool,
}

impl Default for LucirConfig {
    fn default() -> Self {
        Self {
            buffer_size: 200,
            lambda_base: 5.0,
            lambda_mr: 1.0,
            k: 2,
            margin: 0.5,
            imprint_weights: true,
            cbf_epochs: 20,
            cbf_lr: 0.01,
            cbf_batch_size: 128,
            nme: false,
        }
    }
}

impl AlgorithmConfig for LucirConfig {
    const NAME: &'static str = "lucir";
    const SUMMARY: &'static str = "LUCIR: cosine classifier, less-forget feature constraint, margin ranking on exemplars, class-balanced finetuning (Hou et al. 2019)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Lucir::new(self)?))
    }
}

/// The cosine-normalised classifier: one weight row per output unit and the scale σ.
pub struct Cosine {
    pub weight: Var,
    pub sigma: Var,
    params: ParamSet,
}

impl Cosine {
    fn from_tensors(weight: &Tensor, sigma: &Tensor) -> Result<Self> {
        let (weight, sigma) = (Var::from_tensor(weight)?, Var::from_tensor(sigma)?);
        let mut params = ParamSet::new();
        params.push("lucir.weight", 1, Role::Head, weight.clone());
        params.push("lucir.sigma", 1, Role::Head, sigma.clone());
        Ok(Self {
            weight,
            sigma,
            params,
        })
    }

    /// The weights, rows `< fixed` cut from the graph (they receive no gradient).
    fn rows(&self, fixed: usize) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let u = w.dim(0)?;
        Ok(match fixed.min(u) {
            0 => w.clone(),
            f if f == u => w.detach(),
            f => Tensor::cat(&[w.narrow(0, 0, f)?.detach(), w.narrow(0, f, u - f)?], 0)?,
        })
    }

    /// `σ · ⟨w̄_c, f̄⟩` for every unit.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        scaled(&cosine(features, &self.rows(0)?)?, self.sigma.as_tensor())
    }
}

/// Rows of `x` divided by their L2 norm.
fn normalise(x: &Tensor) -> Result<Tensor> {
    let x = x.flatten_from(1)?.to_dtype(DType::F32)?;
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// `⟨w̄_c, f̄⟩`: `B × U` cosines of the features against every weight row.
pub fn cosine(features: &Tensor, weight: &Tensor) -> Result<Tensor> {
    Ok(normalise(features)?.matmul(&normalise(weight)?.t()?)?)
}

/// `σ · cos`.
pub fn scaled(cos: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    Ok(cos.broadcast_mul(sigma)?)
}

/// The less-forget constraint `mean_x (1 − ⟨f̄*(x), f̄(x)⟩)`.
pub fn less_forget(features: &Tensor, old_features: &Tensor) -> Result<Tensor> {
    let dot = (normalise(features)? * normalise(&old_features.detach())?)?.sum(D::Minus1)?;
    Ok((1.0 - dot)?.mean_all()?)
}

/// The margin ranking loss over the rows whose unit is below `new.start` (old classes): each
/// one's ground-truth cosine against its `k` largest cosines among the `new` units, hinge at
/// `margin`, averaged over the `|O|·k` pairs. `None` when the batch has no old-class row.
pub fn margin_ranking(
    cos: &Tensor,
    units: &[u32],
    new: Range<usize>,
    k: usize,
    margin: f64,
) -> Result<Option<Tensor>> {
    let old: Vec<u32> = (0..units.len() as u32)
        .filter(|&i| (units[i as usize] as usize) < new.start)
        .collect();
    let k = k.min(new.len());
    if old.is_empty() || k == 0 {
        return Ok(None);
    }
    let dev = cos.device();
    let rows = cos.index_select(&Tensor::new(old.as_slice(), dev)?, 0)?;
    let y: Vec<u32> = old.iter().map(|&i| units[i as usize]).collect();
    let gt = rows.gather(&Tensor::from_vec(y, (old.len(), 1), dev)?, 1)?;
    // The hard negatives: the k largest new-class cosines of each row (chosen on the host).
    let scores = rows
        .narrow(1, new.start, new.len())?
        .detach()
        .to_vec2::<f32>()?;
    let mut idx = Vec::with_capacity(old.len() * k);
    for row in &scores {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        idx.extend(order[..k].iter().map(|&j| (new.start + j) as u32));
    }
    let neg = rows.gather(&Tensor::from_vec(idx, (old.len(), k), dev)?, 1)?;
    let hinge = ((neg.broadcast_sub(&gt)? + margin)?.relu())?;
    Ok(Some(hinge.mean_all()?))
}

pub struct Lucir {
    cfg: LucirConfig,
    cls: Option<Cosine>,
    /// The model at the start of the task (rebuilt by `before_task`).
    teacher: Option<Box<dyn Model>>,
    exemplars: Vec<ExemplarSet>,
    /// Output units of the classes seen so far.
    seen: usize,
    means: Option<ClassMeans>,
    gather: GatherBuf,
}

impl Lucir {
    pub fn new(cfg: LucirConfig) -> Result<Self> {
        check::at_least_one("buffer_size", cfg.buffer_size)?;
        check::non_negative("lambda_base", cfg.lambda_base)?;
        check::non_negative("lambda_mr", cfg.lambda_mr)?;
        check::at_least_one("K", cfg.k)?;
        check::non_negative("margin", cfg.margin)?;
        check::non_negative("cbf_lr", cfg.cbf_lr)?;
        check::at_least_one("cbf_batch_size", cfg.cbf_batch_size)?;
        Ok(Self {
            cfg,
            cls: None,
            teacher: None,
            exemplars: Vec::new(),
            seen: 0,
            means: None,
            gather: GatherBuf::default(),
        })
    }

    /// The cosine classifier (created before the first task).
    pub fn classifier(&self) -> Option<&Cosine> {
        self.cls.as_ref()
    }

    pub fn exemplars(&self) -> &[ExemplarSet] {
        &self.exemplars
    }

    /// λ = λ_base · √(|C_old| / |C_new|) on task `task`.
    pub fn lambda(&self, stream: &TaskStream, task: usize) -> f64 {
        let u = &stream.tasks[task].units;
        self.cfg.lambda_base * (u.start as f64 / u.len().max(1) as f64).sqrt()
    }

    /// `L_ce + λ_mr · L_mr` of a batch with features `feats` on task `task`; weight rows
    /// `< fixed` get no gradient.
    fn classifier_loss(
        &self,
        cls: &Cosine,
        feats: &Tensor,
        batch: &Batch,
        stream: &TaskStream,
        task: usize,
        fixed: usize,
    ) -> Result<Tensor> {
        let units = &stream.tasks[task].units;
        let cos = cosine(feats, &cls.rows(fixed)?)?;
        let z = scaled(&cos, cls.sigma.as_tensor())?;
        let mut loss = if stream.mask_in_training() {
            sequel_core::loss::task_loss(&z, batch, stream)?
        } else {
            candle_nn::loss::cross_entropy(&z.narrow(1, 0, units.end)?, &batch.y)?
        };
        if self.cfg.lambda_mr > 0.0 {
            let mr = margin_ranking(
                &cos,
                &batch.units,
                units.clone(),
                self.cfg.k,
                self.cfg.margin,
            )?;
            if let Some(mr) = mr {
                loss = (loss + (mr * self.cfg.lambda_mr)?)?;
            }
        }
        Ok(loss)
    }

    /// The classifier on `device` (a resumed one is loaded on the host); created on first use.
    fn ensure_classifier(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if let Some(c) = &self.cls {
            if !c.weight.device().same_device(ctx.device) {
                let w = c.weight.as_tensor().to_device(ctx.device)?;
                let s = c.sigma.as_tensor().to_device(ctx.device)?;
                self.cls = Some(Cosine::from_tensors(&w, &s)?);
            }
            return Ok(());
        }
        let first = task_samples(ctx.stream, ctx.task);
        let one = first.get(..1).unwrap_or_default();
        let (f, _) = features_of(ctx.model, ctx.stream, one, ctx.device, &mut self.gather)?;
        let d = f
            .first()
            .map(Vec::len)
            .ok_or_else(|| Error::msg("LUCIR: the first task has no training sample"))?;
        let u = ctx.stream.num_units;
        let bound = 1.0 / (d as f32).sqrt();
        let w: Vec<f32> = (0..u * d)
            .map(|_| (2.0 * ctx.rng.uniform_f32() - 1.0) * bound)
            .collect();
        self.cls = Some(Cosine::from_tensors(
            &Tensor::from_vec(w, (u, d), ctx.device)?,
            &Tensor::new(&[1f32], ctx.device)?,
        )?);
        Ok(())
    }

    /// Imprint the weights of task `t`'s classes: normalised mean of their normalised features,
    /// scaled to the mean norm of the old classes' weights.
    fn imprint(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        let units = ctx.stream.tasks[ctx.task].units.clone();
        let Some(cls) = &self.cls else { return Ok(()) };
        let samples = task_samples(ctx.stream, ctx.task);
        let (feats, ys) = features_of(
            ctx.model,
            ctx.stream,
            &samples,
            ctx.device,
            &mut self.gather,
        )?;
        let mut w = cls.weight.as_tensor().to_vec2::<f32>()?;
        let norm = |r: &[f32]| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let old = w[..units.start].iter().map(|r| norm(r)).sum::<f64>() / units.start as f64;
        for u in units {
            let mut mean = vec![0f64; w[u].len()];
            for (f, _) in feats.iter().zip(&ys).filter(|(_, &y)| y as usize == u) {
                mean.iter_mut().zip(f).for_each(|(m, &v)| *m += v as f64);
            }
            let n = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
            if n > 0.0 {
                w[u] = mean.iter().map(|m| (m / n * old) as f32).collect();
            }
        }
        let (rows, d) = (w.len(), w[0].len());
        let flat: Vec<f32> = w.into_iter().flatten().collect();
        cls.weight
            .set(&Tensor::from_vec(flat, (rows, d), ctx.device)?)?;
        Ok(())
    }

    /// Class-balanced finetuning of the classifier on the exemplars, the backbone frozen.
    fn balanced_finetune(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        let Some(cls) = &self.cls else { return Ok(()) };
        let mut refs: Vec<SampleRef> = self
            .exemplars
            .iter()
            .flat_map(|g| g.samples.iter().copied())
            .collect();
        let mut opt = Sgd::new(self.cfg.cbf_lr as f32, 0.9, false, 0.0);
        let no_rows = vec![false; ctx.stream.len()];
        for epoch in 0..self.cfg.cbf_epochs {
            ctx.rng.shuffle(&mut refs);
            for (step, chunk) in refs.chunks(self.cfg.cbf_batch_size).enumerate() {
                if ctx.interrupted() {
                    return Err(Error::Stopped(
                        "stopped during LUCIR's class-balanced finetuning".into(),
                    ));
                }
                let b = ctx
                    .stream
                    .gather(chunk, Split::Train, &mut self.gather, ctx.device)?;
                let feats = sequel_core::model::forward_batch(ctx.model, &b, false)?
                    .features
                    .detach();
                let loss = self.classifier_loss(cls, &feats, &b, ctx.stream, ctx.task, 0)?;
                finite_loss(&loss, (ctx.task + 1, epoch + 1, step + 1))?;
                optimize_with(
                    &loss,
                    ctx.model,
                    Some(&cls.params),
                    ctx.stream,
                    &no_rows,
                    None,
                    &mut opt,
                    |_| Ok(()),
                )?;
            }
        }
        Ok(())
    }
}

impl Algorithm for Lucir {
    fn check_stream(&mut self, stream: &TaskStream) -> Result<()> {
        if stream
            .tasks
            .windows(2)
            .any(|w| w[1].units.start < w[0].units.end)
        {
            return Err(Error::Config {
                file: String::new(),
                path: "benchmark.scenario".into(),
                message: "LUCIR learns new classes per task (class-il or task-il); this scenario \
                          reuses the output units across tasks"
                    .into(),
            });
        }
        if self.cfg.buffer_size < stream.num_units {
            return Err(check::invalid(
                "buffer_size",
                format!(
                    "LUCIR keeps at least one exemplar per class: {} are needed, got {}",
                    stream.num_units, self.cfg.buffer_size
                ),
            ));
        }
        Ok(())
    }

    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.ensure_classifier(ctx)?;
        self.seen = ctx.stream.tasks[ctx.task].units.end;
        self.teacher = None;
        if ctx.task > 0 {
            self.teacher = Some(ctx.model.fork()?);
            if self.cfg.imprint_weights {
                self.imprint(ctx)?;
            }
        }
        Ok(())
    }

    fn trains_on_the_stream(&self) -> bool {
        false
    }

    fn training_samples(&mut self, ctx: &mut TaskCtx) -> Result<Vec<SampleRef>> {
        Ok(crate::exemplars::task_and_exemplars(
            ctx.stream,
            ctx.task,
            &self.exemplars,
        ))
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let f = ctx.forward(&[batch])?;
        let cls = self
            .cls
            .as_ref()
            .ok_or_else(|| Error::msg("LUCIR: no classifier (before_task never ran)"))?;
        let old = ctx.stream.tasks[ctx.task].units.start;
        let feats = &f.out.features;
        let mut loss = self.classifier_loss(cls, feats, batch, ctx.stream, ctx.task, old)?;
        if let Some(teacher) = &self.teacher {
            let lambda = self.lambda(ctx.stream, ctx.task);
            let old_feats = teacher.forward(&batch.x, false)?.features;
            ctx.charge(batch.len(), 0);
            loss = (loss + (less_forget(feats, &old_feats)? * lambda)?)?;
        }
        Ok(loss)
    }

    fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.teacher = None;
        update_exemplars(
            &mut self.exemplars,
            self.cfg.buffer_size,
            ctx.model,
            ctx.stream,
            ctx.task,
            ctx.device,
            &mut self.gather,
        )?;
        if ctx.task > 0 && self.cfg.cbf_epochs > 0 {
            self.balanced_finetune(ctx)?;
        }
        Ok(())
    }

    fn before_eval(&mut self, ctx: &EvalCtx) -> Result<()> {
        self.means = if self.cfg.nme && !self.exemplars.is_empty() {
            Some(class_means(
                &self.exemplars,
                ctx.model,
                ctx.stream,
                ctx.device,
            )?)
        } else {
            None
        };
        Ok(())
    }

    fn predict(&self, out: &ModelOutput, _task: usize, _ctx: &EvalCtx) -> Result<Option<Tensor>> {
        if let Some(c) = &self.means {
            return nme_scores(&out.features, &c.means, &c.penalty).map(Some);
        }
        let Some(cls) = self.cls.as_ref().filter(|_| self.seen > 0) else {
            return Ok(None);
        };
        let z = cls.logits(&out.features)?;
        let u = z.dim(1)?;
        let mask: Vec<f32> = (0..u)
            .map(|j| if j < self.seen { 0.0 } else { -1e30 })
            .collect();
        Ok(Some(z.broadcast_add(&Tensor::from_vec(
            mask,
            (1, u),
            z.device(),
        )?)?))
    }

    fn own_params(&self) -> Option<&ParamSet> {
        self.cls.as_ref().map(|c| &c.params)
    }

    fn state(&mut self, io: &mut StateIo) -> Result<()> {
        let mut w = self.cls.as_ref().map(|c| c.weight.as_tensor().clone());
        let mut s = self.cls.as_ref().map(|c| c.sigma.as_tensor().clone());
        io.field("weight", &mut w)?;
        io.field("sigma", &mut s)?;
        io.field("exemplars", &mut self.exemplars)?;
        io.field("seen", &mut self.seen)?;
        if io.is_loading() {
            self.cls = match (w, s) {
                (Some(w), Some(s)) => Some(Cosine::from_tensors(&w, &s)?),
                _ => None,
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[[f32; 3]]) -> Tensor {
        Tensor::from_vec(v.concat(), (v.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn logits_are_scale_times_cosine_whatever_the_feature_norm() {
        let w = t(&[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]]);
        let cls = Cosine::from_tensors(&w, &Tensor::new(&[4f32], &Device::Cpu).unwrap()).unwrap();
        let f = t(&[[3.0, 4.0, 0.0]]);
        let z = cls.logits(&f).unwrap().to_vec2::<f32>().unwrap();
        let want = [4.0 * 0.6, 4.0 * 0.8, 4.0 * 1.4 / 2f32.sqrt()];
        for (a, b) in z[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{z:?}");
        }
        let big = cls
            .logits(&(f * 1000.0).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (a, b) in big[0].iter().zip(&z[0]) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn margin_ranking_uses_old_rows_and_the_k_hardest_new_classes() {
        // Units 0–1 old, 2–4 new. Row 0 (old, y = 0): gt 0.9, new cosines 0.8, 0.1, 0.7.
        let cos = Tensor::new(
            &[
                [0.9f32, 0.0, 0.8, 0.1, 0.7],
                [0.0, 0.0, 0.9, 0.9, 0.9],
                [0.2, 0.5, -1.0, 0.3, 0.0],
            ],
            &Device::Cpu,
        )
        .unwrap();
        // Row 1 is a new-class sample: ignored. Row 2 (y = 1): gt 0.5 vs 0.3, 0.0.
        let l = margin_ranking(&cos, &[0, 2, 1], 2..5, 2, 0.5)
            .unwrap()
            .unwrap();
        let want = ((0.5 - 0.9 + 0.8) + (0.5 - 0.9 + 0.7) + (0.5 - 0.5 + 0.3) + 0.0) / 4.0;
        assert!((l.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
        assert!(margin_ranking(&cos, &[2, 3, 4], 2..5, 2, 0.5)
            .unwrap()
            .is_none());
    }

    #[test]
    fn less_forget_is_zero_on_the_same_direction() {
        let f = t(&[[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]);
        let l = less_forget(&f, &(&f * 5.0).unwrap()).unwrap();
        assert!(l.to_scalar::<f32>().unwrap().abs() < 1e-6);
        let g = t(&[[-1.0, -2.0, -3.0], [1.0, 0.0, 0.0]]);
        let l = less_forget(&f, &g).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - 1.5).abs() < 1e-6, "{l}");
    }
}
