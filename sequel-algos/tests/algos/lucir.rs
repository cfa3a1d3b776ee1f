//! Trainer-driven tests of `lucir` (sequel-algos/src/lucir.rs): what its classifier, its
//! less-forget and margin terms and its class-balanced finetuning change, and what they must leave
//! alone.

use candle_core::{Device, Tensor, D};
use sequel_algos::exemplars::features_of;
use sequel_algos::lucir::{cosine, less_forget, Lucir, LucirConfig};
use sequel_algos::testing::{mini_trainer, observe_run, observed, probe_run, probed, Observer};
use sequel_core::algorithm::task_samples;
use sequel_core::data::{GatherBuf, SampleRef, Split};
use sequel_core::model::{Model, ModelOutput};
use sequel_core::{Algorithm, EvalCtx, Result, TaskCtx};

fn lucir(f: impl FnOnce(&mut LucirConfig)) -> Lucir {
    let mut cfg = LucirConfig {
        buffer_size: 20,
        ..Default::default()
    };
    f(&mut cfg);
    Lucir::new(cfg).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn model_weights(m: &dyn Model) -> Vec<Vec<f32>> {
    m.params()
        .iter()
        .map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// The classifier and the model at the points of a task that matter.
#[derive(Default, Clone)]
struct Snap {
    weight: Vec<Vec<f32>>,
    sigma: f32,
    model: Vec<Vec<f32>>,
}

/// Snapshots of LUCIR per task: after `before_task` (imprinted), after training (before
/// `after_task`) and after `after_task` (exemplars, class-balanced finetuning).
#[derive(Default)]
struct Watch {
    started: Vec<Snap>,
    trained: Vec<Snap>,
    finished: Vec<Snap>,
}

fn snap(l: &Lucir, model: &dyn Model) -> Snap {
    let c = l.classifier().expect("classifier exists");
    Snap {
        weight: rows(c.weight.as_tensor()),
        sigma: c.sigma.as_tensor().to_vec1::<f32>().unwrap()[0],
        model: model_weights(model),
    }
}

impl Observer<Lucir> for Watch {
    fn before_task(&mut self, l: &mut Lucir, ctx: &mut TaskCtx) -> Result<()> {
        l.before_task(ctx)?;
        self.started.push(snap(l, ctx.model));
        Ok(())
    }
    fn after_task(&mut self, l: &mut Lucir, ctx: &mut TaskCtx) -> Result<()> {
        self.trained.push(snap(l, ctx.model));
        l.after_task(ctx)?;
        self.finished.push(snap(l, ctx.model));
        Ok(())
    }
}

fn watched(
    l: Lucir,
    overrides: &[&str],
) -> (sequel_core::Trainer, Vec<Snap>, Vec<Snap>, Vec<Snap>) {
    let (t, _) = observe_run(l, Watch::default(), overrides);
    let w = &observed::<Lucir, Watch>(&t).observer;
    let (a, b, c) = (w.started.clone(), w.trained.clone(), w.finished.clone());
    (t, a, b, c)
}

#[test]
fn the_trainer_optimizer_trains_the_cosine_classifier_and_old_weights_stay_fixed() {
    let (_, started, trained, _) = watched(lucir(|c| c.cbf_epochs = 0), &["benchmark.tasks=2"]);
    // Task 1: every seen class's weight and σ move (the seam works: the trainer stepped them).
    assert_ne!(started[0].weight[..2], trained[0].weight[..2]);
    assert_ne!(started[0].sigma, trained[0].sigma);
    // Unseen classes' rows get no gradient (the cross-entropy spans the seen classes only).
    assert_eq!(started[0].weight[2..], trained[0].weight[2..]);
    // Task 2: the old classes' rows are fixed, the new ones learn.
    assert_eq!(started[1].weight[..2], trained[1].weight[..2]);
    assert_ne!(started[1].weight[2..4], trained[1].weight[2..4]);
}

#[test]
fn new_class_weights_are_imprinted_from_normalised_mean_features() {
    let (t, _, _, finished) = watched(lucir(|c| c.cbf_epochs = 0), &["benchmark.tasks=2"]);
    let w = &observed::<Lucir, Watch>(&t).observer;
    let imprinted = &w.started[1].weight;
    // The model at task 2's start is the one after task 1.
    let model = with_weights(t.model.as_ref(), &finished[0].model);
    let samples = task_samples(&t.stream, 1);
    let (feats, units) = features_of(
        model.as_ref(),
        &t.stream,
        &samples,
        &Device::Cpu,
        &mut GatherBuf::default(),
    )
    .unwrap();
    let norm = |r: &[f32]| r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let old_mean = (norm(&finished[0].weight[0]) + norm(&finished[0].weight[1])) / 2.0;
    for u in 2..4u32 {
        let mut mean = vec![0f64; feats[0].len()];
        for (f, _) in feats.iter().zip(&units).filter(|(_, &y)| y == u) {
            mean.iter_mut().zip(f).for_each(|(m, &v)| *m += v as f64);
        }
        let n = norm(&mean.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let row = &imprinted[u as usize];
        assert!((norm(row) - old_mean).abs() < 1e-4 * old_mean, "unit {u}");
        for (a, m) in row.iter().zip(&mean) {
            assert!((*a as f64 - m / n * old_mean).abs() < 1e-4, "unit {u}");
        }
    }
    // Without imprinting the rows stay as drawn.
    let (_, s, _, _) = watched(
        lucir(|c| {
            c.cbf_epochs = 0;
            c.imprint_weights = false
        }),
        &["benchmark.tasks=2"],
    );
    assert_eq!(s[1].weight[2..], s[0].weight[2..]);
}

#[test]
fn evaluation_scores_are_sigma_times_cosine_over_the_seen_classes_whatever_the_feature_norm() {
    let (t, _) = probe_run(lucir(|_| {}), &["benchmark.tasks=2"]);
    let l = &probed::<Lucir>(&t).algo;
    let refs: Vec<SampleRef> = t.stream.eval_indices(0).0[..20]
        .iter()
        .map(|&index| SampleRef { task: 0, index })
        .collect();
    let b = t
        .stream
        .gather(&refs, Split::Test, &mut GatherBuf::default(), &Device::Cpu)
        .unwrap();
    let out = t.model.forward(&b.x, false).unwrap();
    let ctx = EvalCtx {
        stream: &t.stream,
        model: t.model.as_ref(),
        device: &Device::Cpu,
    };
    let z = rows(&l.predict(&out, 0, &ctx).unwrap().unwrap());
    let c = l.classifier().unwrap();
    let sigma = c.sigma.as_tensor().to_vec1::<f32>().unwrap()[0];
    let cos = rows(&cosine(&out.features, c.weight.as_tensor()).unwrap());
    assert!(sigma != 1.0);
    for (zr, cr) in z.iter().zip(&cos) {
        for u in 0..4 {
            assert!(
                (zr[u] - sigma * cr[u]).abs() < 1e-4,
                "{} vs {}",
                zr[u],
                sigma * cr[u]
            );
        }
        // Classes not learned yet never win.
        assert!(zr[4..].iter().all(|&v| v < -1e29));
    }
    // Scaling the features changes nothing; the backbone's own logits are not the scores.
    let scaled = ModelOutput {
        features: (&out.features * 37.0).unwrap(),
        logits: out.logits.clone(),
    };
    let z2 = rows(&l.predict(&scaled, 0, &ctx).unwrap().unwrap());
    for (a, b) in z.iter().flatten().zip(z2.iter().flatten()) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0));
    }
    assert_ne!(
        out.logits
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap(),
        Tensor::new(z.clone(), &Device::Cpu)
            .unwrap()
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    );
}

#[test]
fn less_forget_and_margin_terms_act_from_the_second_task_only() {
    // λ_base and λ_mr change nothing on task 1 (no teacher, no old class) and change task 2.
    let run = |lb: f64, lmr: f64| {
        let (_, _, trained, _) = watched(
            lucir(|c| {
                c.cbf_epochs = 0;
                c.lambda_base = lb;
                c.lambda_mr = lmr;
            }),
            &["benchmark.tasks=2"],
        );
        trained
    };
    let plain = run(0.0, 0.0);
    for (lb, lmr) in [(5.0, 0.0), (0.0, 1.0)] {
        let other = run(lb, lmr);
        assert_eq!(plain[0].model, other[0].model, "λ_base {lb}, λ_mr {lmr}");
        assert_eq!(plain[0].weight, other[0].weight);
        assert_ne!(plain[1].model, other[1].model, "λ_base {lb}, λ_mr {lmr}");
    }
    // The adaptive weight λ = λ_base·√(|C_old| / |C_new|).
    let t = mini_trainer(Box::new(lucir(|_| {})), &[]);
    let l = lucir(|_| {});
    assert_eq!(l.lambda(&t.stream, 0), 0.0);
    assert!((l.lambda(&t.stream, 1) - 5.0).abs() < 1e-12);
    assert!((l.lambda(&t.stream, 4) - 10.0).abs() < 1e-12);
}

/// A copy of `model` holding `weights`.
fn with_weights(model: &dyn Model, weights: &[Vec<f32>]) -> Box<dyn Model> {
    let m = model.fork().unwrap();
    for (p, v) in m.params().iter().zip(weights) {
        p.var
            .set(&Tensor::from_vec(v.clone(), p.var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    m
}

#[test]
fn less_forget_holds_the_features_to_the_task_start_model() {
    // 1 − ⟨f̄*, f̄⟩ between the task-start and the trained model on task 1's samples: smaller
    // with the constraint (λ_base = 1 here, λ·lr = 0.03; with λ·lr of order 1 the steps on the
    // normalised features overshoot on these 7-step tasks and the measure stops being monotone).
    let gap = |lb: f64| {
        let (t, started, trained, _) = watched(
            lucir(|c| {
                c.cbf_epochs = 0;
                c.lambda_mr = 0.0;
                c.lambda_base = lb;
            }),
            &["benchmark.tasks=2"],
        );
        let samples = task_samples(&t.stream, 0);
        let b = t
            .stream
            .gather(
                &samples,
                Split::Train,
                &mut GatherBuf::default(),
                &Device::Cpu,
            )
            .unwrap();
        let f = |w: &[Vec<f32>]| {
            with_weights(t.model.as_ref(), w)
                .forward(&b.x, false)
                .unwrap()
                .features
        };
        less_forget(&f(&trained[1].model), &f(&started[1].model))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (free, held) = (gap(0.0), gap(1.0));
    assert!(held < free, "{held} vs {free}");
}

#[test]
fn balanced_finetuning_changes_only_the_seen_classifier() {
    let (_, _, trained, finished) = watched(lucir(|_| {}), &["benchmark.tasks=3"]);
    // No finetuning after task 1.
    assert_eq!(trained[0].weight, finished[0].weight);
    assert_eq!(trained[0].sigma, finished[0].sigma);
    for t in 1..3 {
        let seen = 2 * (t + 1);
        // The backbone is frozen.
        assert_eq!(trained[t].model, finished[t].model, "task {t}");
        // Every seen class's weight (old ones too) and σ are fine-tuned.
        for u in 0..seen {
            assert_ne!(
                trained[t].weight[u], finished[t].weight[u],
                "task {t} unit {u}"
            );
        }
        assert_ne!(trained[t].sigma, finished[t].sigma);
        // Classes not seen yet are untouched.
        assert_eq!(trained[t].weight[seen..], finished[t].weight[seen..]);
    }
    // Off, nothing changes after training.
    let (_, _, trained, finished) = watched(lucir(|c| c.cbf_epochs = 0), &["benchmark.tasks=2"]);
    assert_eq!(trained[1].weight, finished[1].weight);
}

#[test]
fn exemplars_are_balanced_and_replayed_in_the_next_task() {
    let (t, _) = probe_run(lucir(|_| {}), &["benchmark.tasks=3"]);
    let p = probed::<Lucir>(&t);
    let ex = p.algo.exemplars();
    assert_eq!(ex.len(), 6);
    assert!(ex.iter().all(|g| g.samples.len() == 20 / 6));
    // Task 2's steps forwarded the exemplars of task 1's classes.
    let replayed = p
        .steps
        .iter()
        .filter(|s| s.task == 1)
        .flat_map(|s| s.parts[0].iter())
        .filter(|r| r.task == 0)
        .count();
    assert_eq!(replayed, 20);
}

#[test]
fn domain_il_and_too_small_a_memory_are_refused() {
    let t = mini_trainer(
        Box::new(sequel_algos::naive::Naive),
        &["benchmark.scenario=domain-il"],
    );
    let e = lucir(|_| {})
        .check_stream(&t.stream)
        .unwrap_err()
        .to_string();
    assert!(e.contains("benchmark.scenario"), "{e}");
    let t = mini_trainer(Box::new(sequel_algos::naive::Naive), &[]);
    let e = lucir(|c| c.buffer_size = 5)
        .check_stream(&t.stream)
        .unwrap_err()
        .to_string();
    assert!(e.contains("algorithm.buffer_size"), "{e}");
    assert!(lucir(|_| {}).check_stream(&t.stream).is_ok());
}
