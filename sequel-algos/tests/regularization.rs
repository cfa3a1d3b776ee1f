//! Regularization and distillation methods on the embedded fmnist-mini, through the real trainer:
//! the tests that catch the bugs public libraries shipped (a penalty that is always 0, SI identical
//! to naive, an anchor that moves every step, a teacher that is not frozen).

use std::path::Path;

use candle_core::Tensor;
use sequel_algos::ewc::{Ewc, EwcConfig};
use sequel_algos::ewc_online::{OnlineEwc, OnlineEwcConfig};
use sequel_algos::lwf::{Lwf, LwfConfig};
use sequel_algos::mas::{Mas, MasConfig};
use sequel_algos::run::{execute, prepare};
use sequel_algos::si::{Si, SiConfig};
use sequel_algos::Registry;
use sequel_core::config::parse_config;
use sequel_core::data::{GatherBuf, SampleRef, Split};
use sequel_core::model::Model;
use sequel_core::rng::{SeededRng, Stream};
use sequel_core::trainer::Silent;
use sequel_core::{Algorithm, Trainer};

/// The five methods with the YAML key of their strength.
const METHODS: [(&str, &str); 5] = [
    ("ewc", "lambda"),
    ("ewc-online", "lambda"),
    ("si", "c"),
    ("mas", "lambda"),
    ("lwf", "alpha"),
];

fn config(out: &Path, tasks: usize, subset: usize) -> String {
    format!(
        "name: reg\nseed: 0\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: {tasks}, classes_per_task: 2, scenario: class-il, train_subset: {subset} }}\n\
         model: {{ kind: mlp, hidden: [32] }}\n\
         optimizer: {{ kind: sgd, lr: 0.05 }}\n\
         training: {{ epochs: 1, batch_size: 10, log_every: 1 }}\n\
         output: {{ dir: {} }}\n",
        out.display()
    )
}

fn run(text: &str, overrides: &[String]) -> sequel_core::experiment::Finished {
    let p = prepare(text, "test.yaml", overrides, &Registry::builtin()).unwrap();
    execute(p, &mut Silent, None).unwrap()
}

fn files(dir: &Path, tasks: usize) -> Vec<(String, Vec<u8>)> {
    let mut names = vec!["accuracy_matrix.csv".to_string()];
    names.extend((1..=tasks).map(|t| format!("checkpoints/task-{t}.safetensors")));
    names
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap();
            (n, bytes)
        })
        .collect()
}

/// The losses of train_log.csv (the column after task, epoch, step).
fn losses(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("train_log.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(3).unwrap().to_string())
        .collect()
}

#[test]
fn zero_strength_is_naive_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), 3, 40);
    let naive = run(&text, &["name=naive".into()]);
    let want = files(&naive.dir, 3);
    for (name, key) in METHODS {
        let f = run(
            &text,
            &[
                format!("algorithm={{name: {name}, {key}: 0}}"),
                format!("name={name}-0"),
            ],
        );
        let got = files(&f.dir, 3);
        for ((n, a), (_, b)) in want.iter().zip(&got) {
            assert!(a == b, "{name} with {key} = 0: {n} differs from naive");
        }
        assert_eq!(losses(&f.dir), losses(&naive.dir), "{name}: losses");
    }
}

#[test]
fn positive_strength_changes_the_trajectory_from_task_2_on() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), 3, 40);
    let naive = run(&text, &["name=naive".into()]);
    let want = files(&naive.dir, 3);
    for (name, key) in METHODS {
        let f = run(
            &text,
            &[
                format!("algorithm={{name: {name}, {key}: 1}}"),
                format!("name={name}"),
            ],
        );
        let got = files(&f.dir, 3);
        // Task 1 has no penalty: same weights as naive. Tasks 2 and 3 differ.
        assert!(got[1] == want[1], "{name}: task 1 must equal naive");
        assert!(got[2] != want[2], "{name}: task 2 identical to naive");
        assert!(got[3] != want[3], "{name}: task 3 identical to naive");
        let (ln, lf) = (losses(&naive.dir), losses(&f.dir));
        let first_task_steps = 4;
        assert_eq!(ln[..first_task_steps], lf[..first_task_steps], "{name}");
        assert_ne!(ln[first_task_steps..], lf[first_task_steps..], "{name}");
    }
}

fn trainer(algorithm: Box<dyn Algorithm>, overrides: &[&str]) -> Trainer {
    let tmp = std::env::temp_dir();
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let mut cfg = parse_config(&config(&tmp, 2, 40), "test.yaml", &o).unwrap();
    cfg.validate("test.yaml").unwrap();
    cfg.resolve_defaults();
    sequel_core::experiment::build_trainer(&cfg, "test.yaml", algorithm, None).unwrap()
}

/// Add N(0, 0.05²) noise to every trainable weight.
fn perturb(model: &dyn Model) {
    let mut rng = SeededRng::new(99, Stream::Init);
    for p in model.params().trainable() {
        let n = p.var.elem_count();
        let noise: Vec<f32> = (0..n).map(|_| rng.normal() * 0.05).collect();
        let noise = Tensor::from_vec(noise, p.var.shape(), p.var.device()).unwrap();
        p.var.set(&(p.var.as_tensor() + noise).unwrap()).unwrap();
    }
}

#[test]
fn after_task_1_each_term_is_strictly_positive_at_a_perturbed_point() {
    fn check<A: Algorithm + 'static>(name: &str, algo: A, penalty: impl Fn(&A, &dyn Model) -> f64) {
        let mut t = trainer(Box::new(algo), &[]);
        t.run(&mut Silent).unwrap();
        let a = t.algorithm::<A>().unwrap();
        let at_anchor = penalty(a, t.model.as_ref());
        if name == "ewc" {
            // Separate mode keeps task 1's anchor: Σₖ Fₖ(θ − θ*ₖ)² > 0 even at the newest one.
            assert!(at_anchor > 0.0, "{name}: {at_anchor}");
        } else {
            assert!(at_anchor.abs() < 1e-6, "{name}: {at_anchor} at the anchor");
        }
        perturb(t.model.as_ref());
        let p = penalty(a, t.model.as_ref());
        assert!(p > 0.0, "{name}: penalty {p} at a perturbed point");
    }
    check("ewc", Ewc::new(EwcConfig::default()).unwrap(), |a, m| {
        a.penalty(m).unwrap().unwrap()
    });
    check(
        "ewc-online",
        OnlineEwc::new(OnlineEwcConfig::default()).unwrap(),
        |a, m| a.penalty(m).unwrap().unwrap(),
    );
    check("si", Si::new(SiConfig::default()).unwrap(), |a, m| {
        a.penalty(m).unwrap().unwrap()
    });
    check("mas", Mas::new(MasConfig::default()).unwrap(), |a, m| {
        a.penalty(m).unwrap().unwrap()
    });
    // LwF: the distillation term on a batch of task 1, with the teacher of the last task.
    let mut t = trainer(Box::new(Lwf::new(LwfConfig::default()).unwrap()), &[]);
    t.run(&mut Silent).unwrap();
    let refs: Vec<SampleRef> = t.stream.tasks[0].train[..10]
        .iter()
        .map(|&index| SampleRef { task: 0, index })
        .collect();
    let batch = t
        .stream
        .gather(
            &refs,
            Split::Train,
            &mut GatherBuf::default(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
    let lwf = t.algorithm::<Lwf>().unwrap();
    let term = |m: &dyn Model| -> f32 {
        let out = m.forward(&batch.x, true).unwrap();
        lwf.distillation(&out.logits, &batch.x)
            .unwrap()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    // The teacher is the model at the start of task 2, the live model has trained since.
    assert!(term(t.model.as_ref()) > 0.0);
    perturb(t.model.as_ref());
    assert!(term(t.model.as_ref()) > 0.0, "lwf");
}

#[test]
fn the_ewc_fisher_skips_batch_norm_statistics() {
    let mut t = trainer(
        Box::new(Ewc::new(EwcConfig::default()).unwrap()),
        &[
            "model={kind: resnet18, width: 2}",
            "benchmark.train_subset=10",
        ],
    );
    t.run(&mut Silent).unwrap();
    let ewc = t.algorithm::<Ewc>().unwrap();
    let params = t.model.params();
    let f = ewc.last_fisher().unwrap();
    assert_eq!(f.0.len(), params.trainable().count());
    assert!(f.0.len() < params.len(), "norm statistics must be left out");
    assert!(f.sum().unwrap() > 0.0);
    perturb(t.model.as_ref());
    assert!(ewc.penalty(t.model.as_ref()).unwrap().unwrap() > 0.0);
}

#[test]
fn every_method_survives_five_tasks_in_every_scenario() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), 5, 100);
    let scenarios: [(&str, &[&str]); 7] = [
        ("split-class-il", &[]),
        ("split-task-il", &["benchmark.scenario=task-il"]),
        (
            "split-task-il-multi",
            &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"],
        ),
        ("split-domain-il", &["benchmark.scenario=domain-il"]),
        (
            "permuted-domain-il",
            &[
                "benchmark.kind=permuted",
                "benchmark.classes_per_task=null",
                "benchmark.scenario=domain-il",
            ],
        ),
        (
            "permuted-task-il",
            &[
                "benchmark.kind=permuted",
                "benchmark.classes_per_task=null",
                "benchmark.scenario=task-il",
                "benchmark.task_il_head=multi",
            ],
        ),
        (
            "permuted-class-il",
            &[
                "benchmark.kind=permuted",
                "benchmark.classes_per_task=null",
                "benchmark.scenario=class-il",
            ],
        ),
    ];
    let methods = [
        "{name: ewc}",
        "{name: ewc, fisher: {kind: true}}",
        "{name: ewc, fisher: {kind: true, mode: minibatch, batch_size: 8}}",
        "{name: ewc-online, gamma: 0.9, fisher: {samples: 20}}",
        "{name: si}",
        "{name: mas}",
        "{name: mas, importance: {mode: minibatch}}",
        "{name: lwf}",
    ];
    for (scen, over) in scenarios {
        for (i, m) in methods.iter().enumerate() {
            // The estimator variants once per stream kind, the defaults everywhere.
            let variant = matches!(i, 1 | 2 | 3 | 6);
            if variant && !matches!(scen, "split-task-il-multi" | "permuted-class-il") {
                continue;
            }
            let mut o: Vec<String> = over.iter().map(|s| s.to_string()).collect();
            o.push(format!("algorithm={m}"));
            o.push(format!("name={scen}-{i}"));
            let f = run(&text, &o);
            let rows = &f.outcome.matrix.rows;
            assert_eq!(rows.len(), 5, "{scen} {m}");
            assert!(
                rows.iter().flatten().all(|a| a.is_finite()),
                "{scen} {m}: {rows:?}"
            );
            assert!(
                rows.iter().flatten().all(|a| (0.0..=1.0).contains(a)),
                "{scen} {m}: {rows:?}"
            );
            // With 10 steps per task the newest task is at least partly learned. (Masked and
            // class-IL split heads need longer to separate a new pair of classes, as naive does.)
            let bar = match scen {
                "split-task-il-multi" | "split-domain-il" => 0.8,
                s if s.starts_with("split") => 0.45,
                _ => 0.12,
            };
            assert!(rows[4][4] > bar, "{scen} {m}: {:?}", rows[4]);
        }
    }
}

#[test]
fn out_of_range_parameters_name_the_file_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), 2, 10);
    for (algo, needle) in [
        (
            "{name: ewc, lambda: -1}",
            "test.yaml: algorithm.lambda: must be a finite number ≥ 0",
        ),
        (
            "{name: si, xi: 0}",
            "test.yaml: algorithm.xi: must be a finite number > 0",
        ),
        (
            "{name: mas, alpha: 2}",
            "test.yaml: algorithm.alpha: must be in [0, 1]",
        ),
        (
            "{name: lwf, temperature: 0}",
            "test.yaml: algorithm.temperature",
        ),
        (
            "{name: ewc, fisher: {kind: exact}}",
            "unknown variant `exact`",
        ),
        (
            "{name: ewc, fisher: {mode: batch}}",
            "algorithm.fisher.mode",
        ),
        (
            "{name: ewc-online, fisher: {batch_size: 0}}",
            "test.yaml: algorithm.fisher.batch_size: must be at least 1",
        ),
        (
            "{name: mas, importance: {samples: 0}}",
            "test.yaml: algorithm.importance.samples: must be at least 1",
        ),
        // The flat keys of earlier versions are refused, not ignored.
        ("{name: ewc, fisher_mode: minibatch}", "fisher_mode"),
    ] {
        let e = prepare(
            &text,
            "test.yaml",
            &[format!("algorithm={algo}")],
            &Registry::builtin(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains(needle), "{algo}: {e}");
    }
}

#[test]
fn fisher_true_round_trips_through_the_resolved_config() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), 2, 10);
    // `true` unquoted is a YAML boolean; both spellings mean the true Fisher.
    for spelling in ["true", "'true'"] {
        let p = prepare(
            &text,
            "test.yaml",
            &[format!(
                "algorithm={{name: ewc, fisher: {{kind: {spelling}}}}}"
            )],
            &Registry::builtin(),
        )
        .unwrap();
        assert!(
            p.resolved_yaml.contains("kind: 'true'"),
            "{}",
            p.resolved_yaml
        );
        assert!(p.resolved_yaml.contains("mode: per-sample"));
        // The resolved config is itself a valid config.
        prepare(&p.resolved_yaml, "resolved.yaml", &[], &Registry::builtin()).unwrap();
    }
}
