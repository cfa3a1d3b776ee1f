//! LwF — Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).
//!
//! At the start of task t > 1 the model is forked into a frozen teacher `f_old` (a deep copy with its
//! own weights, evaluated in evaluation mode, never trained). Every step of task t:
//!
//! `L(θ) = CE_t(θ) + α · Σ_h KL( softmax(f_old(x)_h / T) ‖ softmax(f_θ(x)_h / T) )`
//!
//! averaged over the batch, where `h` ranges over the *previously seen* output units: one softmax
//! over the union of the units of tasks `1..t−1` with a single head (class-IL, domain-IL, masked
//! task-IL), or one softmax per old task's head in multi-head task-IL (summed over heads). On task 1
//! there is no teacher and the term is absent.
//!
//! **Conventions.** α is the paper's λₒ (default 1, the paper's and Avalanche's value); T is the
//! temperature (default 2, all references). The paper writes `L_old` as the cross-entropy
//! `−Σ p̃_old log p̃` of the softened distributions; the KL used here differs from it by the
//! teacher's entropy, a constant in θ — same gradients, but the term is 0 when the student
//! equals the teacher. No T² factor (as the paper, Avalanche and Mammoth). The paper's warm-up
//! phase (training the new head alone first) is not done.
//!
//! **Why `Model::fork`.** The teacher must be a deep, frozen copy. Forking once per task costs one
//! copy of the weights; the alternative — swapping a snapshot in and out of the live model at every
//! step — would copy all weights twice per step and leave the model in the teacher's state if
//! anything failed in between. The teacher's logits cost one extra forward pass per step (no
//! backward: they are detached). With `alpha: 0` no teacher is made and training is bit-identical
//! to `naive`.

use std::ops::Range;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::data::Batch;
use sequel_core::model::Model;
use sequel_core::{Algorithm, AlgorithmConfig, Result, StepCtx, TaskCtx};

use crate::check;

/// YAML keys of `algorithm: { name: lwf, ... }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LwfConfig {
    /// Weight α (the paper's λₒ) of the distillation term. Default 1.0.
    pub alpha: f64,
    /// Softmax temperature T > 0. Default 2.0.
    pub temperature: f64,
}

impl Default for LwfConfig {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            temperature: 2.0,
        }
    }
}

impl AlgorithmConfig for LwfConfig {
    const NAME: &'static str = "lwf";
    const SUMMARY: &'static str =
        "Learning without Forgetting: distillation from the task-start model (Li & Hoiem 2017)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(Lwf::new(self)?))
    }
}

pub struct Lwf {
    alpha: f64,
    temperature: f64,
    teacher: Option<Box<dyn Model>>,
    /// The groups of old units distilled together (one group, or one per old head).
    heads: Vec<Vec<u32>>,
}

impl Lwf {
    pub fn new(cfg: LwfConfig) -> Result<Self> {
        check::non_negative("alpha", cfg.alpha)?;
        check::positive("temperature", cfg.temperature)?;
        Ok(Self {
            alpha: cfg.alpha,
            temperature: cfg.temperature,
            teacher: None,
            heads: Vec::new(),
        })
    }

    /// The distillation term (without α) of a batch, or `None` on the first task.
    pub fn distillation(&self, student: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(teacher) = &self.teacher else {
            return Ok(None);
        };
        let old = teacher.forward(x, false)?.logits.detach();
        let mut total: Option<Tensor> = None;
        for units in &self.heads {
            let term = distillation_kl(student, &old, units, self.temperature)?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        Ok(total)
    }
}

/// `mean over rows of KL(softmax(z_old[:, S]/T) ‖ softmax(z[:, S]/T))` for the unit set `S`;
/// the teacher logits are treated as constants.
pub fn distillation_kl(
    student: &Tensor,
    teacher: &Tensor,
    units: &[u32],
    t: f64,
) -> Result<Tensor> {
    let pick = |z: &Tensor| -> Result<Tensor> {
        match contiguous(units) {
            Some(r) => Ok(z.narrow(D::Minus1, r.start, r.len())?),
            None => {
                let idx = Tensor::new(units, z.device())?;
                Ok(z.index_select(&idx, D::Minus1)?)
            }
        }
    };
    let zs = (pick(student)? / t)?;
    let zt = (pick(&teacher.detach())? / t)?;
    let log_p = candle_nn::ops::log_softmax(&zs, D::Minus1)?;
    let log_q = candle_nn::ops::log_softmax(&zt, D::Minus1)?;
    let q = log_q.exp()?;
    let kl = (q * (log_q - log_p)?)?.sum(D::Minus1)?;
    Ok(kl.mean_all()?)
}

fn contiguous(units: &[u32]) -> Option<Range<usize>> {
    let first = *units.first()? as usize;
    units
        .iter()
        .enumerate()
        .all(|(i, &u)| u as usize == first + i)
        .then(|| first..first + units.len())
}

/// The old units to distil at task `t`: the sorted union of tasks `0..t`'s units, or one group per
/// old task in multi-head task-IL.
fn old_unit_groups(stream: &sequel_core::data::TaskStream, t: usize) -> Vec<Vec<u32>> {
    if stream.mask_in_training() {
        return stream.tasks[..t]
            .iter()
            .map(|task| task.units.clone().map(|u| u as u32).collect())
            .collect();
    }
    let mut all: Vec<u32> = stream.tasks[..t]
        .iter()
        .flat_map(|task| task.units.clone().map(|u| u as u32))
        .collect();
    all.sort_unstable();
    all.dedup();
    vec![all]
}

impl Algorithm for Lwf {
    /// The teacher and its unit groups are rebuilt by `before_task` from the restored model, so
    /// LwF has no state to save.
    fn before_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        if ctx.task == 0 || self.alpha == 0.0 {
            return Ok(());
        }
        self.teacher = Some(ctx.model.fork()?);
        self.heads = old_unit_groups(ctx.stream, ctx.task);
        Ok(())
    }

    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        let f = ctx.forward(&[batch])?;
        let ce = ctx.task_loss(&f.out.logits, batch)?;
        if self.alpha == 0.0 {
            return Ok(ce);
        }
        match self.distillation(&f.out.logits, &batch.x)? {
            Some(d) => {
                ctx.charge(batch.len(), 0);
                Ok((ce + (d * self.alpha)?)?)
            }
            None => Ok(ce),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mini_trainer, observe_run, observed, Observer};

    #[test]
    fn distillation_equals_the_kl_formula_on_constructed_logits() {
        let dev = candle_core::Device::Cpu;
        let z = [[1.0f32, -0.5, 2.0, 0.3], [0.0, 0.7, -1.2, 4.0]];
        let zo = [[0.2f32, 0.1, 1.0, -3.0], [1.5, -0.4, 0.0, 2.0]];
        let student = Tensor::new(&z, &dev).unwrap();
        let teacher = Tensor::new(&zo, &dev).unwrap();
        let t = 2.0;
        let soft = |r: &[f32], units: &[usize]| -> Vec<f64> {
            let e: Vec<f64> = units.iter().map(|&u| (r[u] as f64 / t).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        for units in [vec![0usize, 1, 2], vec![1, 3]] {
            let mut want = 0.0;
            for row in 0..2 {
                let p = soft(&z[row], &units);
                let q = soft(&zo[row], &units);
                want += q
                    .iter()
                    .zip(&p)
                    .map(|(q, p)| q * (q.ln() - p.ln()))
                    .sum::<f64>();
            }
            want /= 2.0;
            let u32s: Vec<u32> = units.iter().map(|&u| u as u32).collect();
            let got = distillation_kl(&student, &teacher, &u32s, t)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            assert!((got - want).abs() < 1e-6, "{units:?}: {got} vs {want}");
            assert!(got > 0.0);
            // Zero when the student is the teacher.
            let same = distillation_kl(&teacher, &teacher, &u32s, t)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(same.abs() < 1e-7, "{same}");
        }
    }

    #[test]
    fn no_distillation_on_the_first_task_and_old_units_afterwards() {
        struct Check {
            seen: Vec<(usize, Option<f32>)>,
        }
        impl Observer<Lwf> for Check {
            fn loss(&mut self, lwf: &mut Lwf, b: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
                let l = lwf.loss(b, ctx)?;
                let o = ctx.incoming_output().unwrap().clone();
                if ctx.step == 0 {
                    let d = lwf.distillation(&o.logits, &b.x)?;
                    self.seen
                        .push((ctx.task, d.map(|d| d.to_scalar::<f32>()).transpose()?));
                }
                if ctx.task == 0 {
                    // Exactly the cross-entropy.
                    let ce = ctx.task_loss(&o.logits, b)?.to_scalar::<f32>()?;
                    assert_eq!(l.to_scalar::<f32>()?, ce);
                }
                Ok(l)
            }
        }
        let check = Check { seen: Vec::new() };
        let lwf = Lwf::new(LwfConfig::default()).unwrap();
        let (t, _) = observe_run(lwf, check, &["benchmark.tasks=3"]);
        let p = observed::<Lwf, Check>(&t);
        let c = &p.observer;
        assert_eq!(c.seen[0], (0, None));
        // At the first step of a later task the student still equals the teacher.
        for &(task, d) in &c.seen[1..] {
            let d = d.unwrap();
            assert!(d.abs() < 1e-6, "task {task}: {d}");
        }
        // Task 3 of split class-IL distils over the units of tasks 1–2.
        assert_eq!(p.algo.heads, vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn multi_head_task_il_distils_each_old_head() {
        let stream = mini_trainer(
            Box::new(crate::naive::Naive),
            &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"],
        )
        .stream;
        assert_eq!(old_unit_groups(&stream, 2), vec![vec![0, 1], vec![2, 3]]);
    }
}
