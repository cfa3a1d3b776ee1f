//! Trainer-driven tests of `der` (sequel-algos/src/der.rs).

use candle_core::Device;
use candle_core::Tensor;
use sequel_core::data::Batch;
use sequel_core::data::{GatherBuf, SampleRef};
use sequel_core::trainer::Silent;
use sequel_core::Algorithm;
use sequel_core::Trainer;

use sequel_algos::der::*;
use sequel_algos::testing::{mini_trainer, probe_run, probed, probed_mut, Probe};

fn der(alpha: f64) -> Der {
    derpp(alpha, 0.0)
}

fn derpp(alpha: f64, beta: f64) -> Der {
    Der::new(DerppConfig {
        alpha,
        beta,
        ..DerppConfig::default()
    })
    .unwrap()
}

fn weights(t: &Trainer) -> Vec<Vec<f32>> {
    t.model
        .params()
        .iter()
        .map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Accuracy matrix and final weights of a run on fmnist-mini.
fn run(algo: Box<dyn Algorithm>, over: &[&str]) -> (Vec<Vec<f64>>, Vec<Vec<f32>>) {
    let mut t = mini_trainer(algo, over);
    let out = t.run(&mut Silent).unwrap();
    assert!(out.failure.is_none());
    (out.results.matrix.rows, weights(&t))
}

#[test]
fn stored_logits_are_those_of_the_inserting_step() {
    let (mut t, _) = probe_run(der(0.2), &[]);
    let p = probed::<Der>(&t);
    let mut at_step = std::collections::HashMap::new();
    for s in &p.steps {
        for (r, row) in s.parts[0].iter().zip(s.logits.to_vec2::<f32>().unwrap()) {
            at_step.insert((r.task, r.index), row);
        }
    }
    let buffer = probed_mut::<Der>(&mut t)
        .algo
        .memory()
        .unwrap()
        .buffer()
        .unwrap()
        .clone();
    assert_eq!(buffer.len(), 200);
    let slots: Vec<u32> = (0..buffer.len() as u32).collect();
    // Every stored row is bit-identical to the training forward pass of its step.
    for &s in &slots {
        let r = buffer.sample(s as usize);
        assert_eq!(
            buffer.logits(s as usize),
            at_step[&(r.task, r.index)].as_slice(),
            "slot {s} ({r:?})"
        );
    }
    // The trained model gives every stored sample other logits now (training mode, as stored;
    // dropout is off in the test model).
    let batch = buffer
        .gather(&slots, &t.stream, &mut GatherBuf::default(), &Device::Cpu)
        .unwrap();
    let now = t.model.forward(&batch.x, true).unwrap().logits;
    let then = buffer.gather_logits(&slots, &Device::Cpu).unwrap();
    let diff = (now - then)
        .unwrap()
        .abs()
        .unwrap()
        .max(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(diff.iter().all(|&d| d > 1e-4), "{diff:?}");
    // Samples of all five tasks are stored.
    let tasks: std::collections::BTreeSet<u32> = buffer
        .samples()
        .iter()
        .map(|r: &SampleRef| r.task)
        .collect();
    assert_eq!(tasks.len(), 5);
}

#[test]
fn derpp_draws_its_two_batches_independently() {
    let (t, _) = probe_run(derpp(0.2, 1.0), &[]);
    let p: &Probe<Der> = probed(&t);
    // From the second step on, both draws happen; overlap of two independent uniform draws of
    // n₁ and n₂ out of N stored samples is n₁n₂/N on average. A sample is stored at most
    // once, so its reference identifies its slot.
    let (mut observed, mut expected, mut differ) = (0.0, 0.0, 0);
    let mut stored = 0usize;
    for s in &p.steps {
        let (a, b) = (&s.parts[1], &s.parts[2]);
        assert_eq!(a.len(), 10.min(stored));
        assert_eq!(b.len(), 10.min(stored));
        if stored > 0 {
            observed += a.iter().filter(|r| b.contains(r)).count() as f64;
            expected += (a.len() * b.len()) as f64 / stored as f64;
            let key = |v: &Vec<SampleRef>| {
                let mut k: Vec<(u32, u32)> = v.iter().map(|r| (r.task, r.index)).collect();
                k.sort();
                k
            };
            differ += usize::from(key(a) != key(b));
        }
        stored = (stored + s.parts[0].len()).min(200);
    }
    assert!(p.steps[0].parts[1].is_empty() && p.steps[0].parts[2].is_empty());
    assert!(differ > p.steps.len() * 9 / 10, "{differ}");
    assert!(
        (observed - expected).abs() < 0.2 * expected,
        "overlap {observed} vs {expected}"
    );
}

#[test]
fn zero_weights_remove_the_terms() {
    let naive = run(Box::new(sequel_algos::naive::Naive), &[]);
    assert_eq!(run(Box::new(derpp(0.0, 0.0)), &[]), naive);
    assert_eq!(run(Box::new(der(0.0)), &[]), naive);
    // DER++ with β = 0 is DER: same draws, same MSE term.
    assert_eq!(
        run(Box::new(derpp(0.5, 0.0)), &[]),
        run(Box::new(der(0.5)), &[])
    );
}

#[test]
fn each_term_changes_the_trajectory() {
    let naive = run(Box::new(sequel_algos::naive::Naive), &[]);
    let d = run(Box::new(der(0.2)), &[]);
    assert_ne!(d.0, naive.0);
    assert_ne!(d.1, naive.1);
    let dpp = run(Box::new(derpp(0.2, 1.0)), &[]);
    assert_ne!(dpp.1, d.1);
    let ce_only = run(Box::new(derpp(0.0, 1.0)), &[]);
    assert_ne!(ce_only.1, naive.1);
    assert_ne!(ce_only.1, dpp.1);
}

fn batch_of(units: &[u32], tasks: &[u32]) -> Batch {
    let dev = Device::Cpu;
    let n = units.len();
    Batch {
        x: Tensor::zeros((n, 1, 1, 1), candle_core::DType::F32, &dev).unwrap(),
        y: Tensor::new(units, &dev).unwrap(),
        units: units.to_vec(),
        tasks: tasks.to_vec(),
        refs: vec![SampleRef { task: 0, index: 0 }; n],
        incoming: n,
    }
}

#[test]
fn mse_equals_a_hand_computation() {
    let dev = Device::Cpu;
    let class_il = mini_trainer(Box::new(sequel_algos::naive::Naive), &[]).stream;
    let multi = mini_trainer(
        Box::new(sequel_algos::naive::Naive),
        &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"],
    )
    .stream;
    let f: Vec<f32> = (0..20).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
    let z: Vec<f32> = (0..20).map(|i| ((i * 3 % 13) as f32 - 6.0) / 4.0).collect();
    let ft = Tensor::from_vec(f.clone(), (2, 10), &dev).unwrap();
    let zt = Tensor::from_vec(z.clone(), (2, 10), &dev).unwrap();
    // Sample 0 of task 0 (units 0–1), sample 1 of task 3 (units 6–7).
    let b = batch_of(&[1, 6], &[0, 3]);
    let sq = |i: usize| ((f[i] - z[i]) as f64).powi(2);
    let all = (0..20).map(sq).sum::<f64>() / 20.0;
    let own = [0, 1, 16, 17].into_iter().map(sq).sum::<f64>() / 4.0;
    let got = |s| {
        logit_mse(&ft, &b, &zt, s)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    assert!(
        (got(&class_il) - all).abs() < 1e-6,
        "{} vs {all}",
        got(&class_il)
    );
    assert!((got(&multi) - own).abs() < 1e-6, "{} vs {own}", got(&multi));
    assert!((all - own).abs() > 1e-2);
    // Zero when the logits are the stored ones.
    let same = logit_mse(&zt, &b, &zt, &class_il)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(same, 0.0);
}

#[test]
fn multi_head_replay_trains_the_heads_of_replayed_tasks() {
    let over = [
        "benchmark.scenario=task-il",
        "benchmark.task_il_head=multi",
        "benchmark.tasks=2",
    ];
    for (algo, moves) in [(der(0.2), true), (der(0.0), false)] {
        let (t, _) = probe_run(algo, &over);
        let p = probed::<Der>(&t);
        let head0 = |w: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            t.model
                .params()
                .iter()
                .zip(w)
                .filter(|(p, _)| p.head == Some(0))
                .map(|(_, v)| v.clone())
                .collect()
        };
        // Task 1's head across the training of task 2.
        let (before, after) = (head0(&p.weights_before[1]), head0(&p.weights_after[1]));
        assert!(!before.is_empty());
        assert_eq!(before != after, moves);
    }
}

#[test]
fn both_run_five_tasks_in_every_scenario() {
    let reg = sequel_algos::Registry::builtin();
    for name in ["der", "derpp"] {
        for over in [
            &[][..],
            &["benchmark.scenario=task-il"][..],
            &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"][..],
        ] {
            let spec: serde_yaml::Value =
                serde_yaml::from_str(&format!("{{ name: {name} }}")).unwrap();
            let (algo, resolved) = reg.build_algorithm(&spec, "t.yaml").unwrap();
            assert_eq!(resolved.get("name").and_then(|n| n.as_str()), Some(name));
            assert!(resolved.get("alpha").is_some());
            let mut t = mini_trainer(algo, over);
            let out = t.run(&mut Silent).unwrap();
            assert!(out.failure.is_none(), "{name} {over:?}");
            assert_eq!(out.matrix.rows.len(), 5);
        }
    }
}

#[test]
fn out_of_range_weights_are_config_errors() {
    let reg = sequel_algos::Registry::builtin();
    for (spec, key) in [
        ("{ name: der, alpha: -1 }", "algorithm.alpha"),
        ("{ name: derpp, beta: .nan }", "algorithm.beta"),
        (
            "{ name: derpp, replay_batch_size: 0 }",
            "algorithm.replay_batch_size",
        ),
    ] {
        let v: serde_yaml::Value = serde_yaml::from_str(spec).unwrap();
        match reg.build_algorithm(&v, "t.yaml") {
            Err(sequel_core::Error::Config { path, .. }) => assert_eq!(path, key),
            Err(e) => panic!("{spec}: {e}"),
            Ok(_) => panic!("{spec} accepted"),
        }
    }
}
