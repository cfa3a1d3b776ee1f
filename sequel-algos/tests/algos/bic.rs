//! Trainer-driven tests of `bic` (sequel-algos/src/bic.rs).

use candle_core::Device;
use candle_core::D;
use sequel_algos::bic::*;
use sequel_algos::testing::{probe_run, probed};
use sequel_core::data::{GatherBuf, SampleRef, Split};
use std::collections::HashSet;

#[test]
fn the_correction_is_fitted_on_held_out_samples_only() {
    let (t, _) = probe_run(
        Bic::new(BicConfig::default()).unwrap(),
        &["benchmark.train_subset=100"],
    );
    let p = probed::<Bic>(&t);
    let key = |r: &SampleRef| (r.task, r.index);
    let val: HashSet<(u32, u32)> = p.algo.validation().iter().map(key).collect();
    assert!(!val.is_empty());
    // Never trained on during the last task …
    let last = t.stream.len() - 1;
    let trained: HashSet<(u32, u32)> = p
        .steps
        .iter()
        .filter(|s| s.task == last)
        .flat_map(|s| s.parts[0].iter().map(key))
        .collect();
    assert!(val.is_disjoint(&trained));
    // … balanced over every seen class, old (from memory) and new …
    let mut per_unit = std::collections::BTreeMap::new();
    for &(task, index) in &val {
        let u = t
            .stream
            .unit(task as usize, t.stream.dataset.train.labels[index as usize]);
        *per_unit.entry(u).or_insert(0) += 1;
    }
    assert_eq!(per_unit.len(), 10);
    assert_eq!(
        per_unit.values().collect::<HashSet<_>>().len(),
        1,
        "{per_unit:?}"
    );
    // … and the stored (α, β) is the minimiser on exactly these samples' logits.
    let refs: Vec<SampleRef> = p.algo.validation().to_vec();
    let b = t
        .stream
        .gather(&refs, Split::Train, &mut GatherBuf::default(), &Device::Cpu)
        .unwrap();
    let z = t
        .model
        .forward(&b.x, false)
        .unwrap()
        .logits
        .to_vec2::<f32>()
        .unwrap();
    let bias = p.algo.bias().unwrap().clone();
    assert_eq!(bias.units, t.stream.tasks[last].units);
    let d = BicConfig::default();
    let (a, beta) = fit_bias(&z, &b.units, bias.units.clone(), d.bias_epochs, d.bias_lr);
    assert!((a - bias.alpha).abs() < 1e-9 && (beta - bias.beta).abs() < 1e-9);
    assert!((bias.alpha - 1.0).abs() > 1e-3 || bias.beta.abs() > 1e-3);
}

#[test]
fn evaluation_applies_the_latest_correction() {
    let (t, out) = probe_run(Bic::new(BicConfig::default()).unwrap(), &[]);
    let p = probed::<Bic>(&t);
    let bias = p.algo.bias().unwrap().clone();
    let identity = Bias {
        alpha: 1.0,
        beta: 0.0,
        ..bias.clone()
    };
    let acc = |b: &Bias, j: usize| {
        let (refs, split) = t.stream.eval_refs(j);
        let x = t
            .stream
            .gather(&refs, split, &mut GatherBuf::default(), &Device::Cpu)
            .unwrap();
        let z = correct(&t.model.forward(&x.x, false).unwrap().logits, b).unwrap();
        let pred: Vec<u32> = z.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        pred.iter().zip(&x.units).filter(|(a, b)| a == b).count() as f64 / refs.len() as f64
    };
    let last = out.results.matrix.rows.last().unwrap();
    let corrected: Vec<f64> = (0..5).map(|j| acc(&bias, j)).collect();
    let raw: Vec<f64> = (0..5).map(|j| acc(&identity, j)).collect();
    assert_eq!(&corrected, last);
    assert_ne!(corrected, raw);
}
