//! Trainer-driven tests of `cls_er` (sequel-algos/src/cls_er.rs).

use candle_core::D;
use sequel_algos::cls_er::*;
use sequel_algos::testing::{mini_trainer, probe_run, probed};
use sequel_core::data::GatherBuf;
use sequel_core::model::Model;
use sequel_core::trainer::Silent;
use sequel_core::Algorithm;

fn cls_er(lambda: f64) -> ClsEr {
    ClsEr::new(ClsErConfig {
        lambda,
        replay_batch_size: 10,
        ..ClsErConfig::default()
    })
    .unwrap()
}

/// Per task, the predicted units of `model` on the evaluation split, and the accuracy.
fn predictions(model: &dyn Model, t: &sequel_core::Trainer) -> Vec<(Vec<u32>, f64)> {
    (0..t.stream.len())
        .map(|j| {
            let (refs, split) = t.stream.eval_refs(j);
            let b = t
                .stream
                .gather(
                    &refs,
                    split,
                    &mut GatherBuf::default(),
                    &candle_core::Device::Cpu,
                )
                .unwrap();
            let z = model.forward(&b.x, false).unwrap().logits;
            let p: Vec<u32> = z.argmax(D::Minus1).unwrap().to_vec1().unwrap();
            let ok = p.iter().zip(&b.units).filter(|(a, b)| a == b).count();
            (p, ok as f64 / b.len() as f64)
        })
        .collect()
}

#[test]
fn evaluation_uses_the_stable_model_and_training_the_working_one() {
    let (t, out) = probe_run(cls_er(2.0), &["benchmark.train_subset=100"]);
    let p = probed::<ClsEr>(&t);
    let stable = predictions(p.algo.stable().unwrap(), &t);
    let working = predictions(t.model.as_ref(), &t);
    let last = out.results.matrix.rows.last().unwrap();
    for (j, (_, acc)) in stable.iter().enumerate() {
        assert_eq!(*acc, last[j], "task {j}");
    }
    // The working model predicts differently (so the check above could fail).
    assert!(stable.iter().zip(&working).any(|(s, w)| s.0 != w.0));
    // After evaluation the model holds the working weights again: those after the last task.
    let now: Vec<Vec<f32>> = t
        .model
        .params()
        .iter()
        .map(|p| p.var.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(&now, p.weights_after.last().unwrap());
}

#[test]
fn the_memories_are_moving_averages_of_the_working_model() {
    // r = 0: the memories stay at the initial weights; r = 1, α = 0: they copy the working one.
    let frozen = ClsEr::new(ClsErConfig {
        r_p: 0.0,
        r_s: 0.0,
        ..ClsErConfig::default()
    })
    .unwrap();
    let (t, _) = probe_run(frozen, &[]);
    let p = probed::<ClsEr>(&t);
    let w = |m: &dyn Model| -> Vec<Vec<f32>> {
        m.params()
            .iter()
            .map(|p| p.var.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    assert_eq!(w(p.algo.stable().unwrap()), p.weights_before[0]);
    assert_eq!(w(p.algo.plastic().unwrap()), p.weights_before[0]);
    let copy = ClsEr::new(ClsErConfig {
        alpha_p: 0.0,
        alpha_s: 0.0,
        r_s: 1.0,
        ..ClsErConfig::default()
    })
    .unwrap();
    let (t, _) = probe_run(copy, &[]);
    let p = probed::<ClsEr>(&t);
    assert_eq!(
        w(p.algo.stable().unwrap()),
        *p.weights_after.last().unwrap()
    );
    assert_eq!(
        w(p.algo.plastic().unwrap()),
        *p.weights_after.last().unwrap()
    );
}

#[test]
fn zero_lambda_trains_as_er() {
    let weights = |algo: Box<dyn Algorithm>| {
        let mut t = mini_trainer(algo, &[]);
        t.run(&mut Silent).unwrap();
        t.model
            .params()
            .iter()
            .map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect::<Vec<_>>()
    };
    let er = sequel_algos::er::Er::new(sequel_algos::er::ErConfig::default()).unwrap();
    assert_eq!(weights(Box::new(cls_er(0.0))), weights(Box::new(er)));
    assert_ne!(
        weights(Box::new(cls_er(2.0))),
        weights(Box::new(cls_er(0.0)))
    );
}
