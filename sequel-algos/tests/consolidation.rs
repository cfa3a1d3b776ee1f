//! Consolidation end to end on the embedded fmnist-mini: every strategy over 5 tasks, both
//! accuracy matrices, the wiring (`evaluate`, `continue_from`, `anchor`), per-task heads, and config
//! errors.

use std::path::Path;
use std::sync::Mutex;

use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;
use sequel_core::experiment::Finished;
use sequel_core::trainer::Silent;
use sequel_core::{Algorithm, AlgorithmConfig};

fn config(out: &Path, extra: &str) -> String {
    format!(
        "name: cons\nseed: 0\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il, train_subset: 300 }}\n\
         model: {{ kind: mlp, hidden: [32, 32] }}\n\
         optimizer: {{ kind: sgd, lr: 0.05 }}\n\
         training: {{ epochs: 1, batch_size: 10 }}\n\
         output: {{ dir: {} }}\n{extra}",
        out.display()
    )
}

fn run_with(reg: &Registry, text: &str, overrides: &[&str]) -> sequel_core::Result<Finished> {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let p = prepare(text, "test.yaml", &o, reg)?;
    execute(p, &mut Silent, None)
}

fn run(text: &str, overrides: &[&str]) -> sequel_core::Result<Finished> {
    run_with(&Registry::builtin(), text, overrides)
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap()
}

#[test]
fn every_strategy_runs_five_tasks_and_writes_both_matrices() {
    let tmp = tempfile::tempdir().unwrap();
    let specs = [
        ("lines", "{name: lines, gamma: 0.5}"),
        ("average", "{name: average}"),
        ("ema", "{name: ema, mu: 0.5}"),
        (
            "ta",
            "{name: task-arithmetic, lambda: 0.5, anchor: initial}",
        ),
        ("ties", "{name: ties, k: 30, lambda: 1.0}"),
        (
            "ties-lines",
            "{name: ties, anchor: initial, lines: {beta: 0.5}}",
        ),
        ("dare", "{name: dare, p: 0.3, anchor: initial}"),
        ("dare-ties", "{name: dare, merge: ties, k: 50}"),
        ("magmax", "{name: magmax}"),
        (
            "average-lines",
            "{name: average, lines: {gamma: 0.3, head: keep}}",
        ),
    ];
    for (name, spec) in specs {
        let f = run(
            &config(tmp.path(), ""),
            &[&format!("consolidation={spec}"), &format!("name={name}")],
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let raw = f.outcome.raw.as_ref().expect("raw matrix");
        assert_eq!(f.outcome.matrix.rows.len(), 5, "{name}");
        assert_eq!(raw.rows.len(), 5, "{name}");
        assert_eq!(raw.init, f.outcome.matrix.init);
        for row in f.outcome.matrix.rows.iter().chain(&raw.rows) {
            assert!(
                row.iter().all(|a| (0.0..=1.0).contains(a)),
                "{name}: {row:?}"
            );
        }
        let csv = read(&f.dir, "accuracy_matrix_raw.csv");
        assert_eq!(csv.lines().count(), 1 + 1 + 5, "{name}: {csv}");
        let metrics = read(&f.dir, "metrics.csv");
        assert!(
            metrics
                .lines()
                .next()
                .unwrap()
                .ends_with(",peak_rss_mb,avg_acc_raw,learning_acc_raw,forgetting_raw"),
            "{name}: {metrics}"
        );
        assert_eq!(metrics.lines().count(), 1 + 5);
        let summary: serde_yaml::Value =
            serde_yaml::from_str(&read(&f.dir, "summary.json")).unwrap();
        assert!(summary["final_raw"]["avg_acc"].is_number(), "{name}");
        assert!(summary["final_raw"]["forgetting"].is_number(), "{name}");
        // The resolved config states the wiring.
        let resolved = read(&f.dir, "config.yaml");
        for key in ["anchor:", "continue_from:", "evaluate:"] {
            assert!(resolved.contains(key), "{name}: {resolved}");
        }
        // Every strategy learns the last task with the consolidated weights (class-IL, 2 classes).
        assert!(
            f.outcome.matrix.rows[4][4] > 0.5 || raw.rows[4][4] > 0.5,
            "{name}: {:?}",
            f.outcome.matrix.rows
        );
    }
}

#[test]
fn a_run_without_consolidation_writes_no_raw_matrix_and_the_old_metrics_header() {
    let tmp = tempfile::tempdir().unwrap();
    let f = run(&config(tmp.path(), ""), &[]).unwrap();
    assert!(f.outcome.raw.is_none());
    assert!(!f.dir.join("accuracy_matrix_raw.csv").exists());
    assert_eq!(
        read(&f.dir, "metrics.csv").lines().next().unwrap(),
        "task,avg_acc,avg_acc_pooled,avg_inc_acc,learning_acc,forgetting,forgetting_chaudhry,bwt,fwt,train_s,eval_s,peak_rss_mb"
    );
    assert!(!read(&f.dir, "summary.json").contains("final_raw"));
}

#[test]
fn lines_gamma_one_is_the_identity_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = run(&config(tmp.path(), ""), &["name=plain"]).unwrap();
    for anchor in ["previous", "initial"] {
        let f = run(
            &config(tmp.path(), ""),
            &[
                &format!("consolidation={{name: lines, gamma: 1.0, anchor: {anchor}}}"),
                &format!("name=id-{anchor}"),
            ],
        )
        .unwrap();
        let raw = f.outcome.raw.clone().unwrap();
        assert_eq!(f.outcome.matrix, raw, "{anchor}");
        assert_eq!(f.outcome.matrix, plain.outcome.matrix, "{anchor}");
    }
}

#[test]
fn continue_from_trained_trains_on_the_raw_weights_and_consolidated_diverges() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = run(&config(tmp.path(), ""), &["name=plain"]).unwrap();
    // MagMax trains on from the raw weights by default: its raw matrix is plain fine-tuning's.
    let mm = run(
        &config(tmp.path(), ""),
        &["consolidation=magmax", "name=mm"],
    )
    .unwrap();
    assert_eq!(mm.outcome.raw.as_ref().unwrap(), &plain.outcome.matrix);
    assert_ne!(mm.outcome.matrix, plain.outcome.matrix);
    let resolved = read(&mm.dir, "config.yaml");
    assert!(resolved.contains("continue_from: trained"), "{resolved}");
    assert!(resolved.contains("anchor: initial"), "{resolved}");
    // Continuing from the consolidated model changes what is trained.
    let mm2 = run(
        &config(tmp.path(), ""),
        &[
            "consolidation={name: magmax, continue_from: consolidated}",
            "name=mm2",
        ],
    )
    .unwrap();
    assert_ne!(mm2.outcome.raw.as_ref().unwrap(), &plain.outcome.matrix);
    // `evaluate: trained` puts the trained weights in the main matrix.
    let ev = run(
        &config(tmp.path(), ""),
        &["consolidation={name: magmax, evaluate: trained}", "name=ev"],
    )
    .unwrap();
    assert_eq!(ev.outcome.matrix, plain.outcome.matrix);
    assert_eq!(ev.outcome.raw.as_ref().unwrap(), &plain.outcome.matrix);
}

#[test]
fn dare_runs_are_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = "consolidation={name: dare, p: 0.5, anchor: initial}";
    let a = run(&config(tmp.path(), ""), &[spec, "name=a"]).unwrap();
    let b = run(&config(tmp.path(), ""), &[spec, "name=b"]).unwrap();
    assert_eq!(
        read(&a.dir, "accuracy_matrix.csv"),
        read(&b.dir, "accuracy_matrix.csv")
    );
}

/// Records each task's head right after its training (before consolidation) into [`HEADS`].
struct HeadRecorder;

impl Algorithm for HeadRecorder {
    fn after_task(&mut self, ctx: &mut sequel_core::TaskCtx) -> sequel_core::Result<()> {
        let vals = ctx
            .model
            .params()
            .iter()
            .filter(|p| p.head == Some(ctx.task))
            .map(|p| p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        HEADS.lock().unwrap().push(vals);
        Ok(())
    }
}

/// Where the test collects what every built `HeadRecorder` records.
static HEADS: Mutex<Vec<Vec<Vec<f32>>>> = Mutex::new(Vec::new());

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadRecorderConfig {}

impl AlgorithmConfig for HeadRecorderConfig {
    const NAME: &'static str = "head-recorder";
    const SUMMARY: &'static str = "test";
    fn build(self) -> sequel_core::Result<Box<dyn Algorithm>> {
        Ok(Box::new(HeadRecorder))
    }
}

#[test]
fn multi_head_heads_are_kept_as_trained_and_task_il_masking_is_unaffected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::builtin();
    reg.add::<HeadRecorderConfig>();
    let til = [
        "benchmark.scenario=task-il",
        "benchmark.task_il_head=multi",
        "algorithm=head-recorder",
    ];
    // A merge that would move every shared tensor: the per-task heads must not move.
    let mut o = til.to_vec();
    o.extend([
        "consolidation={name: task-arithmetic, lambda: 0.3, anchor: initial}",
        "name=ta",
    ]);
    let f = run_with(&reg, &config(tmp.path(), ""), &o).unwrap();
    let ckpt = candle_core::safetensors::load(
        f.dir.join("checkpoints/task-5.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let recorded = HEADS.lock().unwrap().clone();
    assert_eq!(recorded.len(), 5);
    for (t, rec) in recorded.iter().enumerate() {
        let w = ckpt[&format!("head.{t}.weight")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = ckpt[&format!("head.{t}.bias")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            rec,
            &vec![w, b],
            "head {t} must be the one trained in task {}",
            t + 1
        );
    }
    // The body was consolidated: the checkpoint differs from the trained weights, and task-IL
    // evaluation (masked to each task's head) still works on the consolidated model.
    let raw = f.outcome.raw.as_ref().unwrap();
    assert_ne!(&f.outcome.matrix, raw);
    assert!(
        f.outcome.matrix.metrics_after(5).avg_acc > 0.6,
        "{:?}",
        f.outcome.matrix.rows
    );
    // LiNeS γ = 1 changes nothing in multi-head task-IL either.
    let mut o = til.to_vec();
    o.extend(["consolidation={name: lines, gamma: 1.0}", "name=id"]);
    let f = run_with(&reg, &config(tmp.path(), ""), &o).unwrap();
    assert_eq!(&f.outcome.matrix, f.outcome.raw.as_ref().unwrap());
}

#[test]
fn any_algorithm_combines_with_any_strategy() {
    let tmp = tempfile::tempdir().unwrap();
    let f = run(
        &config(tmp.path(), ""),
        &[
            "algorithm=joint",
            "consolidation={name: ties, anchor: initial}",
            "name=j",
        ],
    )
    .unwrap();
    assert_eq!(f.outcome.matrix.rows.len(), 5);
}

#[test]
fn consolidation_config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |spec: &str| {
        run(&config(tmp.path(), ""), &[&format!("consolidation={spec}")])
            .err()
            .expect("must fail")
            .to_string()
    };
    let e = err("{name: ties, ancor: initial}");
    assert!(e.contains("consolidation"), "{e}");
    assert!(e.contains("did you mean `anchor`"), "{e}");
    let e = err("{name: ties, lambada: 1}");
    assert!(
        e.contains("did you mean `lambda`") && e.contains("shared keys"),
        "{e}"
    );
    let e = err("{name: ties, anchor: prev}");
    assert!(e.contains("consolidation.anchor"), "{e}");
    let e = err("{name: ties, k: 0}");
    assert!(e.starts_with("test.yaml: consolidation.k"), "{e}");
    let e = err("{name: lines}");
    assert!(e.contains("gamma"), "{e}");
    let e = err("{name: lines, gamma: 0.5, lines: {gamma: 0.5}}");
    assert!(e.contains("unknown field `lines`"), "{e}");
    let e = err("{name: merge}");
    assert!(e.contains("unknown consolidation strategy `merge`"), "{e}");
    assert!(
        e.contains("average, dare, ema, lines, magmax, task-arithmetic, ties"),
        "{e}"
    );
}

/// The example of docs/CONSOLIDATION.md: keep half of each task's update.
struct Half;

impl sequel_core::Consolidator for Half {
    fn name(&self) -> &str {
        "half"
    }
    fn consolidate(
        &mut self,
        ctx: &mut sequel_core::ConsolidationCtx,
    ) -> sequel_core::Result<sequel_core::TaskVector> {
        let mut tau = ctx.current()?.clone();
        tau.scale(0.5);
        Ok(tau)
    }
}

#[test]
fn a_user_strategy_registers_and_takes_the_shared_wiring_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let mut reg = Registry::builtin();
    reg.register_consolidator("half", "keep half of each update", |_: NoParams| {
        Ok(Box::new(Half) as Box<dyn sequel_core::Consolidator>)
    });
    let f = run_with(
        &reg,
        &config(tmp.path(), ""),
        &["consolidation={name: half, continue_from: trained}"],
    )
    .unwrap();
    let resolved = read(&f.dir, "config.yaml");
    assert!(resolved.contains("continue_from: trained"), "{resolved}");
    assert!(resolved.contains("anchor: previous"), "{resolved}");
    // Same as task arithmetic with λ = 0.5 and the same wiring.
    let ta = run(
        &config(tmp.path(), ""),
        &[
            "consolidation={name: task-arithmetic, lambda: 0.5, continue_from: trained}",
            "name=ta",
        ],
    )
    .unwrap();
    assert_eq!(f.outcome.matrix, ta.outcome.matrix);
}
