//! Trainer-driven tests of `gdumb` (sequel-algos/src/gdumb.rs).

use candle_core::Device;
use sequel_algos::gdumb::*;
use sequel_algos::testing::{mini_trainer, observe_run, observed, probe_run, probed_mut, Observer};
use sequel_core::data::{GatherBuf, Split};
use sequel_core::trainer::Silent;
use sequel_core::{Algorithm, Error, Result, TaskCtx};

fn gdumb(k: usize, epochs: usize) -> Gdumb {
    Gdumb::new(GdumbConfig {
        buffer_size: k,
        fit_epochs: epochs,
        ..Default::default()
    })
    .unwrap()
}

/// What a test wants to see of GDumb after each task.
struct Watch {
    counts: Vec<Vec<usize>>,
    weights: Vec<Vec<f32>>,
    /// Scramble the weights before each task after the first (the fit must not start there).
    scramble: bool,
}

fn flat(model: &dyn sequel_core::model::Model) -> Vec<f32> {
    model
        .params()
        .iter()
        .flat_map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

impl Observer<Gdumb> for Watch {
    fn before_task(&mut self, g: &mut Gdumb, ctx: &mut TaskCtx) -> Result<()> {
        g.before_task(ctx)?;
        if self.scramble && ctx.task > 0 {
            for p in ctx.model.params().iter() {
                p.var.set(&(p.var.as_tensor() * -3.0)?)?;
            }
        }
        Ok(())
    }
    fn after_task(&mut self, g: &mut Gdumb, ctx: &mut TaskCtx) -> Result<()> {
        g.after_task(ctx)?;
        let b = g.memory().unwrap().buffer().unwrap();
        self.counts.push(b.unit_counts(ctx.stream.num_units));
        self.weights.push(flat(ctx.model));
        Ok(())
    }
}

fn watch(scramble: bool) -> Watch {
    Watch {
        counts: Vec::new(),
        weights: Vec::new(),
        scramble,
    }
}

#[test]
fn memory_stays_class_balanced_and_the_stream_gives_no_steps() {
    let (t, out) = observe_run(gdumb(30, 1), watch(false), &[]);
    assert!(out.times.iter().all(|x| x.steps == 0));
    let w = &observed::<Gdumb, Watch>(&t).observer;
    for (task, counts) in w.counts.iter().enumerate() {
        let seen = &counts[..2 * (task + 1)];
        assert_eq!(seen.iter().sum::<usize>(), 30, "task {task}: {counts:?}");
        let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(hi - lo <= 1, "task {task}: {counts:?}");
        assert!(counts[2 * (task + 1)..].iter().all(|&c| c == 0));
    }
}

#[test]
fn each_fit_starts_from_the_initial_weights() {
    // Scrambling the weights before tasks 2.. changes nothing if (and only if) every fit
    // starts from θ₀: the memory and the algorithm's random stream are the same in both runs.
    let runs: Vec<Vec<Vec<f32>>> = [false, true]
        .into_iter()
        .map(|scramble| {
            let over = ["benchmark.tasks=3"];
            let (t, _) = observe_run(gdumb(20, 2), watch(scramble), &over);
            observed::<Gdumb, Watch>(&t).observer.weights.clone()
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
    // And the fit did move the weights away from θ₀.
    let t = mini_trainer(Box::new(sequel_algos::naive::Naive), &["benchmark.tasks=3"]);
    assert_ne!(runs[0][2], flat(t.model.as_ref()));
}

#[test]
fn the_fit_learns_the_memory() {
    let (mut t, _) = probe_run(gdumb(20, 32), &["benchmark.tasks=2"]);
    let buffer = probed_mut::<Gdumb>(&mut t)
        .algo
        .memory()
        .unwrap()
        .buffer()
        .unwrap()
        .clone();
    let b = t
        .stream
        .gather(
            buffer.samples(),
            Split::Train,
            &mut GatherBuf::default(),
            &Device::Cpu,
        )
        .unwrap();
    let pred: Vec<u32> = t
        .model
        .forward(&b.x, false)
        .unwrap()
        .logits
        .argmax(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    let ok = pred.iter().zip(&b.units).filter(|(p, y)| p == y).count();
    assert!(ok >= 18, "{ok}/20 of the memory fitted");
}

#[test]
fn schedule_is_warm_up_then_warm_restarts() {
    let g = Gdumb::new(GdumbConfig {
        max_lr: 0.1,
        min_lr: 0.0,
        ..Default::default()
    })
    .unwrap();
    let lr: Vec<f64> = (0..9).map(|e| g.learning_rate(e)).collect();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(lr[0], 0.01)); // warm-up
                                 // Cycles of 1, 2, 4 epochs starting at epochs 1, 2, 4, 8.
    for e in [1, 2, 4, 8] {
        assert!(close(lr[e], 0.1), "epoch {e}: {}", lr[e]);
    }
    assert!(close(lr[3], 0.05));
    assert!(close(lr[6], 0.05));
    assert!(lr[5] < 0.1 && lr[5] > lr[6] && lr[7] < lr[6]);
}

#[test]
fn invalid_learning_rates_name_the_key() {
    let e = Gdumb::new(GdumbConfig {
        min_lr: 0.1,
        max_lr: 0.01,
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("algorithm.min_lr"), "{e}");
}

fn run_scenario(overrides: &[&str]) {
    let mut t = mini_trainer(Box::new(gdumb(40, 4)), overrides);
    let out = t.run(&mut Silent).unwrap();
    assert!(out.failure.is_none(), "{overrides:?}: {:?}", out.failure);
    assert_eq!(out.matrix.rows.len(), 5);
    // After the last fit the mean accuracy over the five tasks is above chance (1/10 over all
    // units in class-IL, 1/2 within a task in task-IL).
    let last = &out.matrix.rows[4];
    let mean = last.iter().sum::<f64>() / 5.0;
    let chance = if overrides.is_empty() { 0.1 } else { 0.5 };
    assert!(mean > chance, "{overrides:?}: {last:?}");
}

#[test]
fn five_tasks_in_class_il() {
    run_scenario(&[]);
}

#[test]
fn five_tasks_in_task_il_single_head() {
    run_scenario(&["benchmark.scenario=task-il"]);
}

#[test]
fn five_tasks_in_task_il_multi_head() {
    run_scenario(&["benchmark.scenario=task-il", "benchmark.task_il_head=multi"]);
}

#[test]
fn ctrl_c_stops_the_fit() {
    // GDumb trains no step on the stream, so only the fit itself can notice the flag.
    let mut t = mini_trainer(Box::new(gdumb(20, 1000)), &["benchmark.tasks=2"]);
    t.interrupt = Some(std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
        true,
    )));
    let out = t.run(&mut Silent).unwrap();
    match &out.failure {
        Some(Error::Stopped(m)) => assert!(m.contains("GDumb fit after task 1"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(out.matrix.rows.is_empty());
}

#[test]
fn a_diverging_fit_is_reported_as_a_non_finite_loss() {
    let g = Gdumb::new(GdumbConfig {
        buffer_size: 20,
        fit_epochs: 8,
        max_lr: 1e12,
        min_lr: 1e11,
        clip_grad_norm: 0.0,
        ..Default::default()
    })
    .unwrap();
    let mut t = mini_trainer(Box::new(g), &["benchmark.tasks=2"]);
    let out = t.run(&mut Silent).unwrap();
    assert!(
        matches!(out.failure, Some(Error::NonFiniteLoss { task: 1, .. })),
        "{:?}",
        out.failure
    );
    assert!(out.matrix.rows.is_empty());
}

#[test]
fn registry_builds_it_from_yaml_keys() {
    let reg = sequel_algos::Registry::builtin();
    let spec: serde_yaml::Value = serde_yaml::from_str(
        "{ name: gdumb, buffer_size: 500, fit_epochs: 3, fit_batch_size: 8, max_lr: 0.1, min_lr: 0.001, warmup_epochs: 0, momentum: 0.5, weight_decay: 0.0, clip_grad_norm: 5 }",
    )
    .unwrap();
    let (_, resolved) = reg.build_algorithm(&spec, "t.yaml").unwrap();
    assert_eq!(resolved["fit_batch_size"].as_u64(), Some(8));
    let bad: serde_yaml::Value = serde_yaml::from_str("{ name: gdumb, fit_epoch: 3 }").unwrap();
    let e = reg
        .build_algorithm(&bad, "t.yaml")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fit_epoch"), "{e}");
}

/// GDumb's `fit_after` through the real trainer.
mod fit_after {
    use sequel_algos::gdumb::{FitAfter, Gdumb, GdumbConfig};
    use sequel_algos::testing::{probe_run, probed};

    fn gdumb(fit_after: FitAfter) -> Gdumb {
        Gdumb::new(GdumbConfig {
            buffer_size: 40,
            fit_epochs: 4,
            fit_after,
            ..GdumbConfig::default()
        })
        .unwrap()
    }

    /// `last_task` fits once: the model stays at its initial weights until the last task ends, then
    /// is trained; `every_task` trains it after every task.
    #[test]
    fn last_task_fits_once_at_the_end_and_every_task_after_each_task() {
        let (t, out) = probe_run(gdumb(FitAfter::LastTask), &[]);
        let p = probed::<Gdumb>(&t);
        let initial = &p.weights_before[0];
        for k in 0..4 {
            assert_eq!(&p.weights_after[k], initial, "after task {}", k + 1);
        }
        assert_ne!(&p.weights_after[4], initial);
        // The final model learned the memory's ten classes: above the 10 % of chance in class-IL.
        let last = out.matrix.rows.last().unwrap();
        let mean = last.iter().sum::<f64>() / last.len() as f64;
        assert!(mean > 0.1, "{last:?}");

        let (t, _) = probe_run(gdumb(FitAfter::EveryTask), &[]);
        let p = probed::<Gdumb>(&t);
        for k in 0..5 {
            assert_ne!(
                &p.weights_after[k],
                &p.weights_before[0],
                "after task {}",
                k + 1
            );
        }
    }

    #[test]
    fn the_registry_takes_fit_after_and_names_a_bad_value() {
        let reg = sequel_algos::Registry::builtin();
        let (_, resolved) = reg
            .build_algorithm(
                &serde_yaml::from_str("{ name: gdumb, fit_after: last_task }").unwrap(),
                "x.yaml",
            )
            .unwrap();
        assert_eq!(
            resolved.get("fit_after"),
            Some(&serde_yaml::Value::from("last_task"))
        );
        let e = reg
            .build_algorithm(
                &serde_yaml::from_str("{ name: gdumb, fit_after: end }").unwrap(),
                "x.yaml",
            )
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("fit_after") && !e.contains('\n'), "{e}");
    }
}
