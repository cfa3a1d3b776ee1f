//! ER-AML — Experience Replay with an asymmetric metric-learning loss (Caccia, Aljundi, Asadi,
//! Tuytelaars, Pineau & Belilovsky, "New Insights on Reducing Abrupt Representation Change in
//! Online Continual Learning", ICLR 2022, §4). ER-ACE ([`crate::er_ace`]) is its sibling.
//!
//! From the second task on, every step: the *incoming* batch gets a supervised metric-learning
//! loss on the penultimate features, the *replayed* batch the plain cross-entropy,
//!
//! `L(θ) = L_AML(x, y) + CE( f_θ(x′), y′ )`,  `(x′, y′) ~ M`,
//!
//! `L_AML = −(1/|V|) Σ_{i∈V} (1/|P_i|) Σ_{c∈P_i} log( exp(s_ic/τ) / Σ_{c′∈C} exp(s_ic′/τ) )`,
//!
//! with `s_ic = cos(h(x_i), h(c))` the cosine similarity of the features `h`, and for each
//! incoming sample `x_i` one positive `x_i⁺` (same label) and one negative `x_i⁻` (another label)
//! drawn uniformly from the pool below. `C = {x_j⁺, x_j⁻ : j ∈ V}` is every drawn sample of the
//! step and `P_i ⊂ C` those with `x_i`'s label (its own positive, and any other drawn sample of
//! its class). With a single incoming sample this is the paper's
//! `−log( e^{s⁺/τ} / (e^{s⁺/τ} + e^{s⁻/τ}) )`; with a batch, the other anchors' draws serve as
//! extra positives and negatives, as in the SupCon form Avalanche's `AMLCriterion` uses. The
//! classifier only learns from the replayed samples, so incoming data no longer pushes the old
//! classes' logits down — the abrupt representation change the paper measures.
//!
//! **Pool and fallback.** Positives and negatives of `x_i` are drawn from the memory together
//! with the *other* incoming samples (as Avalanche's `AMLCriterion`): early in a task the memory
//! may hold no sample of a new class, and the batch's other samples of it stand in. **Rule:** an
//! incoming sample with no positive or no negative in the pool (`V` is the rest) gets no AML term
//! that step — it is still offered to the memory; if no incoming sample has both, the step's loss
//! is the replay CE alone. Labels are output units (in domain-IL a unit recurs across tasks and
//! counts as one label).
//!
//! **Deviations and choices.** Task 1 is the plain cross-entropy of the incoming batch (nothing
//! to protect yet; Avalanche's ER-AML fills its memory at task end, so its first task is CE too).
//! No `τ/τ_base` factor (an artefact of the SupCon code, a constant ≈1.43 on the term); features
//! are normalised as `h/(‖h‖ + 10⁻⁵)`. The incoming batch, the replay draw and the positives and
//! negatives go through one training-mode forward pass (batch-norm statistics span them all); a
//! positive taken from the incoming batch is forwarded again as its own row. Every draw comes from
//! `ctx.rng`; the memory is the trainer's (reservoir, `insert: step`).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use sequel_core::data::{Batch, GatherBuf, SampleRef};
use sequel_core::loss::task_loss;
use sequel_core::rng::SeededRng;
use sequel_core::{Algorithm, AlgorithmConfig, Memory, MemoryConfig, Result, StepCtx};

use crate::check;

/// YAML keys of `algorithm: { name: er-aml, ... }`, besides the memory's (`buffer_size: 200`,
/// `buffer_policy: reservoir`, `insert: step`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErAmlConfig {
    /// Samples drawn from the memory per step for the replay CE (the stream batch size).
    pub replay_batch_size: usize,
    /// The temperature τ of the metric loss (0.1, the authors' and Avalanche's value).
    pub temperature: f64,
    #[serde(skip)]
    pub memory: MemoryConfig,
}

impl Default for ErAmlConfig {
    fn default() -> Self {
        Self {
            replay_batch_size: 10,
            temperature: 0.1,
            memory: MemoryConfig::default(),
        }
    }
}

impl AlgorithmConfig for ErAmlConfig {
    const NAME: &'static str = "er-aml";
    const SUMMARY: &'static str = "ER with a metric-learning loss on the incoming batch (positives/negatives from memory), CE on replay (Caccia et al. 2022)";
    fn build(self) -> Result<Box<dyn Algorithm>> {
        Ok(Box::new(ErAml::new(self)?))
    }
    fn memory(&mut self) -> Option<&mut MemoryConfig> {
        Some(&mut self.memory)
    }
}

pub struct ErAml {
    replay_batch_size: usize,
    temperature: f64,
    memory: Memory,
    gather: GatherBuf,
}

impl ErAml {
    pub fn new(cfg: ErAmlConfig) -> Result<Self> {
        check::at_least_one("replay_batch_size", cfg.replay_batch_size)?;
        check::positive("temperature", cfg.temperature)?;
        Ok(Self {
            replay_batch_size: cfg.replay_batch_size,
            temperature: cfg.temperature,
            memory: Memory::new(cfg.memory, false)?,
            gather: GatherBuf::default(),
        })
    }
}

/// A candidate positive or negative: a stored sample or another incoming one, with its label.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    sample: SampleRef,
    unit: u32,
    /// The incoming row it is, if it is one (never its own anchor's positive or negative).
    row: Option<usize>,
}

/// For each incoming row (labels `units`): `Some((positive, negative))` drawn uniformly from
/// `pool`, or `None` when the pool has no sample of its label or none of another label.
fn draw_pairs(
    units: &[u32],
    pool: &[Candidate],
    rng: &mut SeededRng,
) -> Vec<Option<(SampleRef, SampleRef)>> {
    let mut out = Vec::with_capacity(units.len());
    for (i, &y) in units.iter().enumerate() {
        // Never the anchor itself: not its own row, nor a stored copy of the same sample.
        let anchor = pool.iter().find(|c| c.row == Some(i)).map(|c| c.sample);
        let usable = |c: &&Candidate| c.row != Some(i) && Some(c.sample) != anchor;
        let pos: Vec<&Candidate> = pool.iter().filter(usable).filter(|c| c.unit == y).collect();
        let neg: Vec<&Candidate> = pool.iter().filter(usable).filter(|c| c.unit != y).collect();
        if pos.is_empty() || neg.is_empty() {
            out.push(None);
            continue;
        }
        let p = pos[rng.below(pos.len() as u64) as usize].sample;
        let n = neg[rng.below(neg.len() as u64) as usize].sample;
        out.push(Some((p, n)));
    }
    out
}

/// `h / (‖h‖ + 10⁻⁵)` row by row.
fn normalize(h: &Tensor) -> Result<Tensor> {
    let norm = (h.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-5)?;
    Ok(h.broadcast_div(&norm)?)
}

/// `L_AML` of anchors `h` (`V × d`, labels `y`) against the contrast set `c` (`K × d`, labels
/// `yc`), see the module documentation. Every anchor must have a positive in `c`.
pub fn aml_loss(h: &Tensor, y: &[u32], c: &Tensor, yc: &[u32], temperature: f64) -> Result<Tensor> {
    let (v, k) = (y.len(), yc.len());
    let s = (normalize(h)?.matmul(&normalize(c)?.t()?)? / temperature)?;
    let log_prob = candle_nn::ops::log_softmax(&s, D::Minus1)?;
    let mut mask = vec![0f32; v * k];
    for (i, &a) in y.iter().enumerate() {
        let pos = yc.iter().filter(|&&b| b == a).count() as f32;
        for (j, &b) in yc.iter().enumerate() {
            if a == b {
                mask[i * k + j] = 1.0 / pos;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (v, k), h.device())?;
    Ok((log_prob.mul(&mask)?.sum_all()? / -(v as f64))?)
}

impl Algorithm for ErAml {
    fn loss(&mut self, batch: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
        if ctx.task == 0 {
            return ctx.ce(batch);
        }
        let mut pool: Vec<Candidate> = Vec::new();
        if let Some(b) = self.memory.buffer() {
            pool.extend((0..b.len()).map(|s| Candidate {
                sample: b.sample(s),
                unit: b.unit(s),
                row: None,
            }));
        }
        pool.extend((0..batch.len()).map(|i| Candidate {
            sample: batch.refs[i],
            unit: batch.units[i],
            row: Some(i),
        }));
        let pairs = draw_pairs(&batch.units, &pool, ctx.rng);
        let valid: Vec<usize> = (0..batch.len()).filter(|&i| pairs[i].is_some()).collect();
        let (pos, neg): (Vec<SampleRef>, Vec<SampleRef>) = pairs.iter().flatten().copied().unzip();
        let replay = self
            .memory
            .draw(self.replay_batch_size, ctx.stream, ctx.device)?;
        let mut gather =
            |refs: &[SampleRef]| ctx.stream.gather_train(refs, &mut self.gather, ctx.device);
        let (pos, neg) = (gather(&pos)?, gather(&neg)?);
        let f = ctx.forward(&[batch, &replay.batch, &pos, &neg])?;
        let mut loss = None;
        if !valid.is_empty() {
            let idx = Tensor::from_vec(
                valid.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
                valid.len(),
                ctx.device,
            )?;
            let anchors = f.output(0)?.features.index_select(&idx, 0)?;
            let y: Vec<u32> = valid.iter().map(|&i| batch.units[i]).collect();
            let contrast = Tensor::cat(&[f.output(2)?.features, f.output(3)?.features], 0)?;
            let yc = [pos.units.as_slice(), neg.units.as_slice()].concat();
            loss = Some(aml_loss(&anchors, &y, &contrast, &yc, self.temperature)?);
        }
        if f.has(1) {
            let ce = task_loss(&f.logits(1)?, &replay.batch, ctx.stream)?;
            loss = Some(match loss {
                Some(l) => (l + ce)?,
                None => ce,
            });
        }
        match loss {
            Some(l) => Ok(l),
            // Nothing to learn from: a zero that still reaches every forwarded parameter.
            None => Ok((f.out.logits.sum_all()? * 0.0)?),
        }
    }

    fn memory(&mut self) -> Option<&mut Memory> {
        Some(&mut self.memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{mini_run, observe_run, observed, probe_run, probed, Observer, SCENARIOS};
    use candle_core::Device;
    use sequel_core::buffer::InsertAt;

    fn er_aml(buffer_size: usize) -> ErAml {
        ErAml::new(ErAmlConfig {
            memory: MemoryConfig {
                buffer_size,
                ..MemoryConfig::default()
            },
            ..ErAmlConfig::default()
        })
        .unwrap()
    }

    fn cos(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (x * x) as f64).sum::<f64>().sqrt() + 1e-5;
        dot / (n(a) * n(b))
    }

    #[test]
    fn aml_loss_matches_the_formula() {
        let dev = Device::Cpu;
        let h = [[1.0f32, 0.5, -0.2], [0.3, -1.0, 0.8]];
        let c = [
            [0.9f32, 0.4, 0.1],
            [0.2, -0.7, 1.0],
            [-1.0, 0.2, 0.3],
            [0.5, 0.5, 0.5],
        ];
        let (y, yc) = ([3u32, 5], [3u32, 5, 5, 1]);
        let tau = 0.1;
        let mut want = 0.0;
        for (i, hi) in h.iter().enumerate() {
            let s: Vec<f64> = c.iter().map(|cj| cos(hi, cj) / tau).collect();
            let lse = s.iter().map(|v| v.exp()).sum::<f64>().ln();
            let pos: Vec<usize> = (0..4).filter(|&j| yc[j] == y[i]).collect();
            want -= pos.iter().map(|&j| s[j] - lse).sum::<f64>() / pos.len() as f64;
        }
        want /= 2.0;
        let got = aml_loss(
            &Tensor::new(&h, &dev).unwrap(),
            &y,
            &Tensor::new(&c, &dev).unwrap(),
            &yc,
            tau,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(1.0),
            "{got} vs {want}"
        );
        // One anchor, one positive, one negative: −log(e^{s⁺/τ} / (e^{s⁺/τ} + e^{s⁻/τ})).
        let one = aml_loss(
            &Tensor::new(&[h[0]], &dev).unwrap(),
            &[3],
            &Tensor::new(&[c[1], c[2]], &dev).unwrap(),
            &[3, 5],
            tau,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        let (sp, sn) = (cos(&h[0], &c[1]) / tau, cos(&h[0], &c[2]) / tau);
        let want = -(sp.exp() / (sp.exp() + sn.exp())).ln();
        assert!((one - want).abs() < 1e-4 * want.max(1.0), "{one} vs {want}");
    }

    #[test]
    fn pairs_have_the_anchor_label_and_another_and_never_the_anchor_itself() {
        let r = |i: u32| SampleRef { task: 0, index: i };
        // Memory: two samples of unit 0, one of unit 1, and a stored copy of incoming row 0
        // (index 10, unit 2). Incoming rows: units 2, 2, 0.
        let mut pool: Vec<Candidate> = [(0u32, 0u32), (1, 0), (2, 1), (10, 2)]
            .iter()
            .map(|&(i, u)| Candidate {
                sample: r(i),
                unit: u,
                row: None,
            })
            .collect();
        for (row, u) in [2u32, 2, 0].into_iter().enumerate() {
            pool.push(Candidate {
                sample: r(10 + row as u32),
                unit: u,
                row: Some(row),
            });
        }
        let unit_of = |s: SampleRef| pool.iter().find(|c| c.sample == s).unwrap().unit;
        let mut rng = SeededRng::new(1, sequel_core::rng::Stream::Algorithm);
        let mut from_memory = 0;
        for _ in 0..50 {
            let pairs = draw_pairs(&[2, 2, 0, 7], &pool, &mut rng);
            // Row 0's only positive is row 1 (its stored copy is itself) and row 1's is row 0
            // (or that copy); unit 7 has no positive at all.
            assert_eq!(pairs[0].unwrap().0, r(11));
            assert_eq!(pairs[1].unwrap().0, r(10));
            assert!(pairs[3].is_none());
            for (i, y) in [2u32, 2, 0].into_iter().enumerate() {
                let (p, n) = pairs[i].unwrap();
                assert_eq!(unit_of(p), y);
                assert_ne!(unit_of(n), y);
                assert!(p != r(10 + i as u32) && n != r(10 + i as u32));
            }
            from_memory += usize::from(pairs[2].unwrap().0.index < 10);
        }
        // Row 2 (unit 0) draws its positive from the memory's two samples of unit 0.
        assert_eq!(from_memory, 50);
    }

    /// ER-AML that recomputes each step's loss from what was forwarded: the metric loss of the
    /// incoming rows that had a positive and a negative in the pool plus the replay CE.
    struct Check {
        /// Per step from task 2 on: (loss, recomputed, ER's joined CE, positives from memory).
        seen: Vec<(f32, f32, f32, usize)>,
    }

    impl Observer<ErAml> for Check {
        fn loss(&mut self, alg: &mut ErAml, b: &Batch, ctx: &mut StepCtx) -> Result<Tensor> {
            let stored: Vec<(SampleRef, u32)> = alg
                .memory
                .buffer()
                .map(|m| (0..m.len()).map(|s| (m.sample(s), m.unit(s))).collect())
                .unwrap_or_default();
            let l = alg.loss(b, ctx)?;
            if ctx.task == 0 {
                assert_eq!(l.to_scalar::<f32>()?, ctx.ce(b)?.to_scalar::<f32>()?);
                return Ok(l);
            }
            let parts = ctx.forwarded_parts().to_vec();
            assert_eq!(parts.len(), 4);
            assert_eq!(parts[0], b.refs);
            let mut buf = GatherBuf::default();
            let g = |refs: &[SampleRef], buf: &mut GatherBuf| {
                ctx.stream
                    .gather(refs, sequel_core::data::Split::Train, buf, ctx.device)
            };
            let (replay, pos, neg) = (
                g(&parts[1], &mut buf)?,
                g(&parts[2], &mut buf)?,
                g(&parts[3], &mut buf)?,
            );
            let valid: Vec<usize> = (0..b.len())
                .filter(|&i| {
                    let others = stored
                        .iter()
                        .map(|s| s.1)
                        .chain((0..b.len()).filter(|&j| j != i).map(|j| b.units[j]));
                    let (mut p, mut n) = (false, false);
                    for u in others {
                        p |= u == b.units[i];
                        n |= u != b.units[i];
                    }
                    p && n
                })
                .collect();
            assert_eq!(pos.len(), valid.len());
            for (k, &i) in valid.iter().enumerate() {
                assert_eq!(pos.units[k], b.units[i]);
                assert_ne!(neg.units[k], b.units[i]);
            }
            let feats = |x: &Batch| ctx.model.forward(&x.x, true).map(|o| o.features);
            let idx = Tensor::new(
                valid.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                ctx.device,
            )?;
            let anchors = feats(b)?.index_select(&idx, 0)?;
            let contrast = Tensor::cat(&[feats(&pos)?, feats(&neg)?], 0)?;
            let y: Vec<u32> = valid.iter().map(|&i| b.units[i]).collect();
            let yc = [pos.units.clone(), neg.units.clone()].concat();
            let aml = aml_loss(&anchors, &y, &contrast, &yc, 0.1)?;
            let ce = task_loss(
                &ctx.model.forward(&replay.x, true)?.logits,
                &replay,
                ctx.stream,
            )?;
            let joined = b.append(&replay)?;
            let er = task_loss(
                &ctx.model.forward(&joined.x, true)?.logits,
                &joined,
                ctx.stream,
            )?;
            let memory = parts[2]
                .iter()
                .filter(|r| stored.iter().any(|s| s.0 == **r))
                .count();
            self.seen.push((
                l.to_scalar()?,
                (aml + ce)?.to_scalar()?,
                er.to_scalar()?,
                memory,
            ));
            Ok(l)
        }
    }

    #[test]
    fn incoming_rows_get_the_metric_loss_and_replayed_rows_the_ce_in_every_scenario() {
        for over in SCENARIOS {
            let check = Check { seen: Vec::new() };
            let over3 = [over, &["benchmark.tasks=3"]].concat();
            let (t, _) = observe_run(er_aml(30), check, &over3);
            let c = &observed::<ErAml, Check>(&t).observer;
            assert_eq!(c.seen.len(), 10, "{over:?}");
            for &(loss, want, er, _) in &c.seen {
                assert!((loss - want).abs() < 1e-5, "{over:?}: {loss} vs {want}");
                assert!((loss - er).abs() > 1e-4, "{over:?}: ER's loss {er}");
            }
            // Positives come from the memory, not only from the incoming batch.
            assert!(c.seen.iter().map(|s| s.3).sum::<usize>() > 0, "{over:?}");
        }
    }

    #[test]
    fn er_aml_changes_the_trajectory_and_reduces_class_il_forgetting() {
        let over = ["benchmark.train_subset=100"];
        let (naive, _) = mini_run(Box::new(crate::naive::Naive), &over);
        let (er, _) = mini_run(
            Box::new(crate::er::Er::new(crate::er::ErConfig::default()).unwrap()),
            &over,
        );
        let (aml, _) = mini_run(Box::new(er_aml(100)), &over);
        assert_ne!(aml, er);
        let old = |m: &[Vec<f64>]| m[4][..4].iter().sum::<f64>();
        assert!(
            old(&aml) > old(&naive) + 0.2,
            "er-aml {:?} naive {:?}",
            aml[4],
            naive[4]
        );
    }

    #[test]
    fn task_end_insertion_still_draws_pairs() {
        let mut alg = er_aml(40);
        alg.memory = Memory::new(
            MemoryConfig {
                buffer_size: 40,
                insert: InsertAt::TaskEnd,
                ..MemoryConfig::default()
            },
            false,
        )
        .unwrap();
        let (t, _) = probe_run(alg, &["benchmark.tasks=2"]);
        let p = probed::<ErAml>(&t);
        // Task 2: the memory holds task 1 only, so positives come from the batch itself.
        for s in &p.steps[5..] {
            assert_eq!(s.parts.len(), 4);
            assert!(!s.parts[2].is_empty());
            assert!(s.parts[2].iter().all(|r| r.task == 1));
        }
    }
}
