//! End-to-end runs on the embedded fmnist-mini: the loop, the run directory, determinism,
//! naive vs joint behaviour, and the failure paths a user can hit.

use std::path::Path;

use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;
use sequel_core::trainer::Silent;
use sequel_core::{Algorithm, AlgorithmConfig, StepCtx};

fn config(out: &Path, extra: &str) -> String {
    format!(
        "name: e2e\nseed: 0\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il }}\n\
         model: {{ kind: mlp, hidden: [64, 64] }}\n\
         optimizer: {{ kind: sgd, lr: 0.03 }}\n\
         training: {{ epochs: 1, batch_size: 10 }}\n\
         output: {{ dir: {} }}\n{extra}",
        out.display()
    )
}

fn run(text: &str, overrides: &[&str]) -> sequel_core::Result<sequel_core::experiment::Finished> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let p = prepare(text, "test.yaml", &o, &Registry::builtin())?;
    execute(p, &mut Silent, None)
}

#[test]
fn a_run_writes_the_documented_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let f = run(&config(tmp.path(), ""), &[]).unwrap();
    assert_eq!(f.dir, tmp.path().join("e2e").join("seed-0"));
    for file in [
        "config.yaml",
        "accuracy_matrix.csv",
        "metrics.csv",
        "summary.json",
        "train_log.csv",
    ] {
        assert!(f.dir.join(file).is_file(), "{file} missing");
    }
    for t in 1..=5 {
        assert!(
            f.dir
                .join(format!("checkpoints/task-{t}.safetensors"))
                .is_file(),
            "checkpoint {t}"
        );
    }
    // No staging leftovers.
    let names: Vec<String> = std::fs::read_dir(tmp.path().join("e2e"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["seed-0".to_string()]);
    let csv = std::fs::read_to_string(f.dir.join("accuracy_matrix.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 1 + 5, "{csv}");
    let metrics = std::fs::read_to_string(f.dir.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 1 + 5);
    let resolved = std::fs::read_to_string(f.dir.join("config.yaml")).unwrap();
    assert!(
        resolved.contains("eval_batch_size: 1000"),
        "defaults must be filled in:\n{resolved}"
    );
    let summary: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(f.dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["status"].as_str(), Some("completed"));
    assert_eq!(summary["tasks_completed"].as_u64(), Some(5));
    // The untrained model is near chance on 10 classes; after training task 1 the model knows it.
    let m = &f.outcome.matrix;
    let init_mean = m.init.iter().sum::<f64>() / 5.0;
    assert!(init_mean < 0.3, "{:?}", m.init);
    assert!(
        m.rows[0][0] > 0.8,
        "task 1 should be learned: {:?}",
        m.rows[0]
    );
}

#[test]
fn same_config_and_seed_give_byte_identical_accuracy_matrix() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let extra = "model: { kind: mlp, hidden: [32], dropout: 0.2 }\n";
    // Dropout and a seeded class order exercise every random stream.
    let over = ["benchmark.class_order=seeded"];
    let text = |d: &Path| config(d, "").replace("model: { kind: mlp, hidden: [64, 64] }\n", extra);
    let ra = run(&text(a.path()), &over).unwrap();
    let rb = run(&text(b.path()), &over).unwrap();
    let rc = run(&text(c.path()), &[over[0], "seed=1"]).unwrap();
    let read = |d: &Path| std::fs::read(d.join("accuracy_matrix.csv")).unwrap();
    assert_eq!(read(&ra.dir), read(&rb.dir));
    assert_ne!(
        read(&ra.dir),
        read(&rc.dir),
        "another seed must change the run"
    );
}

#[test]
fn naive_forgets_in_class_il_but_not_in_task_il_and_joint_is_far_above() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "");
    let naive = run(&text, &[]).unwrap().outcome.results.matrix;
    let naive_til = run(&text, &["benchmark.scenario=task-il", "name=til"])
        .unwrap()
        .outcome
        .results
        .matrix;
    let joint = run(&text, &["algorithm.name=joint", "name=joint"])
        .unwrap()
        .outcome
        .results
        .matrix;
    let fin = |m: &sequel_core::metrics::AccuracyMatrix| m.metrics_after(5);
    let (n, nt, j) = (fin(&naive), fin(&naive_til), fin(&joint));
    // Class-IL naive keeps roughly one task's worth: the last task.
    assert!(n.avg_acc < 0.35, "naive class-IL avg {:.3}", n.avg_acc);
    assert!(naive.rows[4][4] > 0.8);
    assert!(n.forgetting.unwrap() > 0.5);
    assert!(nt.avg_acc > 0.75, "naive task-IL avg {:.3}", nt.avg_acc);
    assert!(
        j.avg_acc > n.avg_acc + 0.3,
        "joint {:.3} vs naive {:.3}",
        j.avg_acc,
        n.avg_acc
    );
}

#[test]
fn permuted_and_rotated_streams_train_in_domain_il() {
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["permuted", "rotated"] {
        let text = config(tmp.path(), "");
        let f = run(
            &text,
            &[
                &format!("benchmark.kind={kind}"),
                "benchmark.scenario=domain-il",
                "benchmark.tasks=3",
                &format!("name={kind}"),
            ],
        )
        .unwrap();
        let m = &f.outcome.matrix;
        assert_eq!(m.rows.len(), 3);
        assert!(m.rows[2][2] > 0.5, "{kind}: {:?}", m.rows);
    }
}

#[test]
fn cnn_and_resnet_backbones_train_through_the_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let text = config(tmp.path(), "");
    // Batch-norm running statistics lag behind fast-moving weights early on, so the ResNet gets
    // more steps before its evaluation-mode accuracy means anything.
    for (name, model, subset) in [
        (
            "cnn",
            "model={kind: cnn, channels: [8, 16]}",
            "benchmark.train_subset=100",
        ),
        (
            "resnet",
            "model={kind: resnet18, width: 4}",
            "benchmark.train_subset=200",
        ),
    ] {
        let f = run(
            &text,
            &[
                model,
                "benchmark.tasks=2",
                "benchmark.classes_per_task=2",
                subset,
                "training.epochs=3",
                &format!("name={name}"),
            ],
        )
        .unwrap();
        let m = &f.outcome.matrix;
        assert_eq!(m.rows.len(), 2);
        // Trained on two classes, the model must beat the 50 % of always answering one of them.
        assert!(
            m.rows[0][0] > 0.6 && m.rows[1][1] > 0.6,
            "{name}: {:?}",
            m.rows
        );
    }
}

/// Records the weights of task 1's head around task 2.
#[derive(Default)]
struct HeadWatch {
    before: Option<Vec<Vec<f32>>>,
    after: Option<Vec<Vec<f32>>>,
}

fn head_values(ctx: &sequel_core::TaskCtx, head: usize) -> Vec<Vec<f32>> {
    ctx.model
        .params()
        .iter()
        .filter(|p| p.head == Some(head))
        .map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

impl Algorithm for HeadWatch {
    fn before_task(&mut self, ctx: &mut sequel_core::TaskCtx) -> sequel_core::Result<()> {
        if ctx.task == 1 {
            self.before = Some(head_values(ctx, 0));
        }
        Ok(())
    }
    fn after_task(&mut self, ctx: &mut sequel_core::TaskCtx) -> sequel_core::Result<()> {
        if ctx.task == 1 {
            self.after = Some(head_values(ctx, 0));
            assert_eq!(
                self.before.as_ref().unwrap().len(),
                2,
                "weight and bias of head 0"
            );
            assert_eq!(
                self.before, self.after,
                "task 1's head must not move while training task 2"
            );
        }
        Ok(())
    }
}

#[test]
fn multi_head_task_il_leaves_other_tasks_heads_untouched_even_with_weight_decay() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::builtin();
    reg.add::<HeadWatchConfig>();
    for (i, opt) in [
        "{kind: sgd, lr: 0.03, momentum: 0.9, weight_decay: 0.01}",
        "{kind: adam, lr: 0.001, weight_decay: 0.01}",
    ]
    .into_iter()
    .enumerate()
    {
        let p = prepare(
            &config(tmp.path(), "algorithm: { name: head-watch }\n"),
            "t.yaml",
            &[
                "benchmark.scenario=task-il".into(),
                "benchmark.task_il_head=multi".into(),
                "benchmark.tasks=2".into(),
                "benchmark.classes_per_task=2".into(),
                format!("optimizer={opt}"),
                "optimizer.reset_each_task=false".into(),
                // Each optimizer its own run folder: a finished run is never replaced by another
                // config.
                format!("name=head-watch-{i}"),
            ],
            &reg,
        )
        .unwrap();
        let f = execute(p, &mut Silent, None).unwrap();
        assert!(
            f.outcome.matrix.rows[1][0] > 0.6,
            "task 1 still solved: {:?}",
            f.outcome.matrix.rows
        );
    }
}

/// An algorithm that makes the loss non-finite during task 2.
struct Diverge;
impl Algorithm for Diverge {
    fn loss(
        &mut self,
        batch: &sequel_core::data::Batch,
        ctx: &mut StepCtx,
    ) -> sequel_core::Result<candle_core::Tensor> {
        let l = ctx.ce(batch)?;
        Ok(if ctx.task == 1 && ctx.step == 3 {
            (l * f64::NAN)?
        } else {
            l
        })
    }
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadWatchConfig {}

impl AlgorithmConfig for HeadWatchConfig {
    const NAME: &'static str = "head-watch";
    const SUMMARY: &'static str = "test";
    fn build(self) -> sequel_core::Result<Box<dyn Algorithm>> {
        Ok(Box::new(HeadWatch::default()))
    }
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DivergeConfig {}

impl AlgorithmConfig for DivergeConfig {
    const NAME: &'static str = "diverge";
    const SUMMARY: &'static str = "test";
    fn build(self) -> sequel_core::Result<Box<dyn Algorithm>> {
        Ok(Box::new(Diverge))
    }
}

#[test]
fn non_finite_loss_stops_with_task_epoch_step_and_keeps_finished_tasks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::builtin();
    reg.add::<DivergeConfig>();
    let p = prepare(
        &config(tmp.path(), "algorithm: { name: diverge }\n"),
        "t.yaml",
        &[],
        &reg,
    )
    .unwrap();
    let err = execute(p, &mut Silent, None)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("task 2, epoch 1, step 4"), "{err}");
    let dir = tmp.path().join("e2e").join("seed-0");
    let csv = std::fs::read_to_string(dir.join("accuracy_matrix.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        3,
        "header, init and task 1 only:\n{csv}"
    );
    let summary = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    assert!(summary.contains("failed: loss became NaN"), "{summary}");
}

#[test]
fn unknown_algorithm_lists_the_valid_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let e = run(&config(tmp.path(), "algorithm: { name: naiv }\n"), &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("test.yaml: algorithm.name: unknown algorithm `naiv`"),
        "{e}"
    );
    assert!(e.contains("did you mean `naive`"), "{e}");
    // Every registered name, sorted (computed, so adding an algorithm does not break this test).
    let registry = Registry::builtin();
    let names: Vec<&str> = registry.algorithms().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"naive") && names.contains(&"gem"));
    assert!(e.contains(&format!("valid: {}", names.join(", "))), "{e}");
}

#[test]
fn unknown_algorithm_parameter_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let e = run(
        &config(tmp.path(), "algorithm: { name: naive, lamda: 3 }\n"),
        &[],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("algorithm"), "{e}");
    assert!(e.contains("unknown field `lamda`"), "{e}");
}

#[test]
fn unwritable_output_dir_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let e = run(&config(&file, ""), &[]).err().unwrap().to_string();
    assert!(e.contains("not writable"), "{e}");
    assert!(e.contains("output.dir") && e.contains("--out"), "{e}");
}

#[test]
fn missing_dataset_names_files_and_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let text = config(tmp.path(), "").replace(
        "dataset: fmnist-mini",
        &format!("dataset: mnist, data_dir: {}", empty.display()),
    );
    let e = run(&text, &[]).err().unwrap().to_string();
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
    assert!(e.contains(&empty.display().to_string()), "{e}");
}
