//! Trainer-driven tests of `importance` (sequel-algos/src/importance.rs).

use candle_core::Device;
use sequel_algos::importance::*;
use sequel_core::algorithm::task_samples;

#[test]
fn statistics_are_detached_even_when_candle_gradients_are_not() {
    // A batch-norm scale's gradient is computed from tracked activations; the statistic must not
    // keep that graph, or a penalty on it would back-propagate into the old forward pass.
    let t = sequel_algos::testing::mini_trainer(
        Box::new(sequel_algos::naive::Naive),
        &[
            "model={kind: resnet18, width: 2}",
            "benchmark.train_subset=4",
        ],
    );
    let samples = task_samples(&t.stream, 0);
    let stat = mean_gradient_statistic(
        t.model.as_ref(),
        &t.stream,
        &Device::Cpu,
        &samples,
        1,
        Reduce::Square,
        |out, batch| {
            Ok(vec![(
                1.0,
                sequel_core::loss::task_loss(&out.logits, batch, &t.stream)?,
            )])
        },
    )
    .unwrap();
    assert!(stat.0.iter().all(|s| !s.track_op()));
    assert!(stat.sum().unwrap() > 0.0);
}

/// The per-sample statistics through `per_sample_statistic` (all samples at once, what EWC's and
/// MAS's estimators use on an MLP) equal the batch-1 loop of `mean_gradient_statistic`, to 1e-5
/// relative, for the empirical Fisher, the true Fisher and MAS, in every kind of head — frozen
/// layers included.
#[test]
fn the_vectorised_per_sample_statistics_equal_the_batch_1_loop() {
    use sequel_algos::importance::{training_log_probs, training_logits};
    use sequel_core::model::ModelOutput;
    let scenarios: [&[&str]; 4] = [
        &[],
        &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"],
        &["benchmark.scenario=task-il"],
        &["model.freeze=[fc1]"],
    ];
    for over in scenarios {
        let mut over: Vec<&str> = over.to_vec();
        over.extend(["benchmark.train_subset=60", "model.hidden=[12, 8]"]);
        let t = sequel_algos::testing::mini_trainer(Box::new(sequel_algos::naive::Naive), &over);
        // Task 2, so multi-head models have two heads and masking matters.
        let samples = task_samples(&t.stream, 1);
        let s = &t.stream;
        let dev = Device::Cpu;
        let m = t.model.as_ref();
        type Loop<'a> = Box<
            dyn FnMut(
                    &ModelOutput,
                    &sequel_core::data::Batch,
                ) -> sequel_core::Result<Vec<(f64, candle_core::Tensor)>>
                + 'a,
        >;
        type Vect<'a> = Box<
            dyn FnMut(
                    &candle_core::Tensor,
                    &sequel_core::data::Batch,
                ) -> sequel_core::Result<SampleTerms>
                + 'a,
        >;
        let cases: Vec<(&str, Reduce, Loop, Vect)> = vec![
            (
                "empirical Fisher",
                Reduce::Square,
                Box::new(|o, b| Ok(vec![(1.0, sequel_core::loss::task_loss(&o.logits, b, s)?)])),
                Box::new(|z, b| {
                    let l = training_log_probs(z, b, s)?
                        .gather(&b.y.unsqueeze(1)?, 1)?
                        .squeeze(1)?;
                    Ok(vec![(l.ones_like()?, l)])
                }),
            ),
            (
                "true Fisher",
                Reduce::Square,
                Box::new(|o, b| {
                    let lp = training_log_probs(&o.logits, b, s)?.squeeze(0)?;
                    let p: Vec<f32> = lp.exp()?.to_vec1()?;
                    p.iter()
                        .enumerate()
                        .filter(|(_, &pc)| pc > 0.0)
                        .map(|(c, &pc)| Ok((pc as f64, lp.get(c)?)))
                        .collect()
                }),
                Box::new(|z, b| {
                    let lp = training_log_probs(z, b, s)?;
                    let p = lp.exp()?.detach();
                    (0..lp.dim(1)?)
                        .map(|c| {
                            Ok((
                                p.narrow(1, c, 1)?.squeeze(1)?,
                                lp.narrow(1, c, 1)?.squeeze(1)?,
                            ))
                        })
                        .collect()
                }),
            ),
            (
                "MAS",
                Reduce::Abs,
                Box::new(|o, b| {
                    let f = training_logits(&o.logits, b, s)?;
                    Ok(vec![(1.0, f.sqr()?.sum_all()?)])
                }),
                Box::new(|z, b| {
                    let f = training_logits(z, b, s)?.sqr()?.sum(1)?;
                    Ok(vec![(f.ones_like()?, f)])
                }),
            ),
        ];
        for (name, reduce, looped, vectorised) in cases {
            let want = mean_gradient_statistic(m, s, &dev, &samples, 1, reduce, looped).unwrap();
            let got = per_sample_statistic(m, s, &dev, &samples, reduce, vectorised)
                .unwrap()
                .expect("an MLP has only dense layers");
            assert_eq!(got.0.len(), want.0.len());
            let (g, w) = (got.flat().unwrap(), want.flat().unwrap());
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(scale > 0.0, "{name} {over:?}");
            for (i, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1e-6 * scale),
                    "{name} {over:?} element {i}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn backbones_with_other_layers_fall_back_to_the_loop() {
    let t = sequel_algos::testing::mini_trainer(
        Box::new(sequel_algos::naive::Naive),
        &[
            "model={kind: cnn, channels: [2]}",
            "benchmark.train_subset=4",
        ],
    );
    let samples = task_samples(&t.stream, 0);
    let r = per_sample_statistic(
        t.model.as_ref(),
        &t.stream,
        &Device::Cpu,
        &samples,
        Reduce::Square,
        |z, _| Ok(vec![(z.ones_like()?, z.clone())]),
    )
    .unwrap();
    assert!(r.is_none());
}
