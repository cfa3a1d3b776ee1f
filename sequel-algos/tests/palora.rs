//! PaLoRA adapters (`model.lora`) in the trainer: task `t` trains adapter `t` alone, a frozen
//! backbone stays bit-identical, task-IL evaluates each task through its own adapter and
//! class-IL through the merge.

use std::sync::Mutex;

use candle_core::Tensor;
use sequel_algos::er::{Er, ErConfig};
use sequel_algos::naive::Naive;
use sequel_algos::testing::mini_trainer;
use sequel_core::algorithm::{Algorithm, EvalCtx};
use sequel_core::data::GatherBuf;
use sequel_core::model::ModelOutput;
use sequel_core::trainer::{Silent, Trainer};
use sequel_core::MemoryConfig;
use sequel_core::Result;

/// Every tensor of the model by name, as bits.
fn tensors(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    t.model
        .params()
        .iter()
        .map(|p| {
            let v: Vec<f32> = p.var.flatten_all().unwrap().to_vec1().unwrap();
            (p.name.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// Train stream task `t` as the trainer's loop does (one epoch).
fn train(trainer: &mut Trainer, t: usize) {
    let order = trainer.begin_task(t).unwrap();
    let mut buf = GatherBuf::default();
    let device = trainer.device().clone();
    for (step, chunk) in order.chunks(10).enumerate() {
        let batch = trainer
            .stream
            .gather_train(chunk, &mut buf, &device)
            .unwrap();
        trainer.step(t, 0, step, &batch).unwrap();
    }
    trainer.end_task(t).unwrap();
}

/// With `freeze_backbone_after: 1` (SGD with momentum and weight decay, so a zero gradient
/// would still move a tensor): after task 1 every backbone tensor and every other task's
/// adapter stays bit-identical while task 2 trains; task 2's adapter and head move. Without
/// the freeze the backbone moves, so the check is not vacuous. During task 1 only adapter 0
/// (with the backbone and head 1) moves.
#[test]
fn a_frozen_backbone_stays_bit_identical_and_only_the_task_adapter_trains() {
    for freeze in [true, false] {
        let lora = if freeze {
            "model.lora={ freeze_backbone_after: 1 }"
        } else {
            "model.lora={}"
        };
        let mut t = mini_trainer(
            Box::new(Naive),
            &[
                lora,
                "benchmark.scenario=task-il",
                "benchmark.task_il_head=multi",
                "optimizer.momentum=0.9",
                "optimizer.weight_decay=0.01",
                "optimizer.reset_each_task=false",
            ],
        );
        assert_eq!(t.model.adapters().unwrap().tasks(), 5);
        let start = tensors(&t);
        train(&mut t, 0);
        let after1 = tensors(&t);
        train(&mut t, 1);
        let after2 = tensors(&t);
        let changed = |a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)], name: &str| {
            let i = a.iter().position(|(n, _)| n == name).unwrap();
            a[i].1 != b[i].1
        };
        for (name, _) in &start {
            let adapter = name.contains(".lora_");
            let head = name.starts_with("head");
            if adapter {
                let task: usize = name.rsplit('.').next().unwrap().parse().unwrap();
                // Only the task's own adapter is reached (B starts at 0, so A's first gradients
                // are zero, but weight decay moves it).
                assert_eq!(changed(&start, &after1, name), task == 0, "{name}");
                assert_eq!(changed(&after1, &after2, name), task == 1, "{name}");
            } else if head {
                let task: usize = name.split('.').nth(1).unwrap().parse().unwrap();
                assert_eq!(changed(&after1, &after2, name), task == 1, "{name}");
            } else {
                assert!(changed(&start, &after1, name), "{name}: trained in task 1");
                assert_eq!(
                    changed(&after1, &after2, name),
                    !freeze,
                    "{name}, freeze {freeze}"
                );
            }
        }
        assert_eq!(t.model.adapters().unwrap().backbone_frozen(), freeze);
    }
}

/// Naive fine-tuning that records the adapters' preference `λ` each time a batch of task `j`
/// is scored.
#[derive(Default)]
struct Spy {
    seen: Mutex<Vec<(usize, Vec<f32>)>>,
}

impl Algorithm for Spy {
    fn predict(&self, _out: &ModelOutput, task: usize, ctx: &EvalCtx) -> Result<Option<Tensor>> {
        let lambda = ctx.model.adapters().expect("adapters").preference();
        self.seen.lock().unwrap().push((task, lambda));
        Ok(None)
    }
}

fn preferences(t: &Trainer) -> Vec<(usize, Vec<f32>)> {
    t.algorithm::<Spy>().unwrap().seen.lock().unwrap().clone()
}

/// The trainer scores task `j` through adapter `j` in task-IL, and through the average of the
/// adapters trained so far in class-IL (none before the first task).
#[test]
fn evaluation_uses_one_hot_in_task_il_and_the_merge_in_class_il() {
    let mut t = mini_trainer(
        Box::new(Spy::default()),
        &["model.lora={}", "benchmark.scenario=task-il"],
    );
    t.run(&mut Silent).unwrap();
    let seen = preferences(&t);
    assert!(seen.len() >= 6 * 5, "{}", seen.len());
    for (j, lambda) in seen {
        let mut one_hot = vec![0.0f32; 5];
        one_hot[j] = 1.0;
        assert_eq!(lambda, one_hot, "task {j}");
    }
    let mut c = mini_trainer(Box::new(Spy::default()), &["model.lora={}"]);
    c.run(&mut Silent).unwrap();
    let seen = preferences(&c);
    // Evaluations of all 5 tasks before training and after each task, in order.
    let per_row = seen.len() / 6;
    assert_eq!(seen.len(), per_row * 6);
    for (row, chunk) in seen.chunks(per_row).enumerate() {
        let expected: Vec<f32> = (0..5)
            .map(|u| if u < row { 1.0 / row as f32 } else { 0.0 })
            .collect();
        for (_, lambda) in chunk {
            assert_eq!(lambda, &expected, "after {row} tasks");
        }
    }
}

/// With the backbone frozen after task 1 and separate heads, naive fine-tuning cannot change
/// what any earlier task sees through its own adapter, so every column of the accuracy matrix
/// is constant below its diagonal.
#[test]
fn a_frozen_backbone_with_separate_heads_keeps_earlier_task_il_accuracies() {
    let mut t = mini_trainer(
        Box::new(Naive),
        &[
            "model.lora={ rank: 2, freeze_backbone_after: 1 }",
            "benchmark.scenario=task-il",
            "benchmark.task_il_head=multi",
            "training.epochs=4",
            "optimizer.lr=0.1",
        ],
    );
    let out = t.run(&mut Silent).unwrap();
    assert!(out.failure.is_none());
    let rows = &out.matrix.rows;
    assert_eq!(rows.len(), 5);
    for j in 0..5 {
        for r in j + 1..5 {
            assert_eq!(rows[r][j], rows[j][j], "task {j} after task {r}: {rows:?}");
        }
    }
    // Not vacuous: every task's training changed its accuracy (through its adapter and head, the
    // backbone being frozen from task 2 on), and on average above chance (0.5).
    for j in 0..5 {
        assert_ne!(rows[j][j], out.matrix.init[j], "task {j}: {rows:?}");
    }
    let diagonal = (0..5).map(|j| rows[j][j]).sum::<f64>() / 5.0;
    assert!(diagonal > 0.6, "{rows:?}");
}

/// A-GEM's projection mixes the memory's reference gradient, which reaches the backbone, into
/// the step's gradient: a frozen backbone must stay bit-identical through it too (and moves
/// without the freeze, so the check is not vacuous).
#[test]
fn a_frozen_backbone_stays_frozen_under_a_gradient_projection() {
    for freeze in [true, false] {
        let lora = if freeze {
            "model.lora={ freeze_backbone_after: 1 }"
        } else {
            "model.lora={}"
        };
        let spec: serde_yaml::Value =
            serde_yaml::from_str("{ name: agem, buffer_size: 40, replay_batch_size: 20 }").unwrap();
        let (agem, _) = sequel_algos::Registry::builtin()
            .build_algorithm(&spec, "t.yaml")
            .unwrap();
        let mut t = mini_trainer(agem, &[lora, "benchmark.scenario=task-il"]);
        train(&mut t, 0);
        let after1 = tensors(&t);
        train(&mut t, 1);
        train(&mut t, 2);
        let after3 = tensors(&t);
        let backbone = after1
            .iter()
            .zip(&after3)
            .filter(|((n, _), _)| !n.contains(".lora_") && !n.starts_with("head"));
        let moved = backbone.filter(|((_, a), (_, b))| a != b).count();
        if freeze {
            assert_eq!(moved, 0, "a frozen backbone tensor moved");
        } else {
            assert!(moved > 0, "the backbone trains without the freeze");
        }
    }
}

/// Task-IL ER with adapters: replayed samples of task 0, fused with task 1's incoming batch in
/// one `StepCtx::forward`, go through adapter 0, so adapter 0's `B` moves while task 1 trains
/// (plain SGD: a tensor without gradient stays bit-identical); the adapters of tasks not yet
/// seen never move. In class-IL every row of task 1's steps goes through adapter 1, so
/// adapter 0 stays as task 0 left it (the check is not vacuous).
#[test]
fn task_il_replay_trains_each_replayed_task_adapter() {
    for scenario in ["task-il", "class-il"] {
        let er = ErConfig {
            memory: MemoryConfig {
                buffer_size: 50,
                ..MemoryConfig::default()
            },
            ..ErConfig::default()
        };
        let mut t = mini_trainer(
            Box::new(Er::new(er).unwrap()),
            &["model.lora={}", &format!("benchmark.scenario={scenario}")],
        );
        train(&mut t, 0);
        let after1 = tensors(&t);
        train(&mut t, 1);
        let after2 = tensors(&t);
        for ((name, a), (_, b)) in after1.iter().zip(&after2) {
            if !name.contains(".lora_b.") {
                continue;
            }
            let task: usize = name.rsplit('.').next().unwrap().parse().unwrap();
            let moved = a != b;
            let expected = task == 1 || (task == 0 && scenario == "task-il");
            assert_eq!(moved, expected, "{scenario}: {name}");
        }
        let a = t.model.adapters().unwrap();
        assert_eq!(a.per_row(), scenario == "task-il");
    }
}

/// Naive fine-tuning that records, in `before_eval`, the adapters' per-row mode and `λ`.
#[derive(Default)]
struct HookSpy {
    seen: Mutex<Vec<(bool, Vec<f32>)>>,
}

impl Algorithm for HookSpy {
    fn before_eval(&mut self, ctx: &EvalCtx) -> Result<()> {
        let a = ctx.model.adapters().expect("adapters");
        self.seen
            .lock()
            .unwrap()
            .push((a.per_row(), a.preference()));
        Ok(())
    }
}

/// `before_eval` sees the evaluation state: in task-IL per-row mode (λ one-hot of the last
/// trained task for plain forwards), in class-IL the merge of the tasks trained so far.
#[test]
fn before_eval_sees_the_evaluation_state() {
    for scenario in ["task-il", "class-il"] {
        let mut t = mini_trainer(
            Box::new(HookSpy::default()),
            &["model.lora={}", &format!("benchmark.scenario={scenario}")],
        );
        t.run(&mut Silent).unwrap();
        let seen = t
            .algorithm::<HookSpy>()
            .unwrap()
            .seen
            .lock()
            .unwrap()
            .clone();
        assert_eq!(seen.len(), 6, "{seen:?}");
        for (row, (per_row, lambda)) in seen.into_iter().enumerate() {
            let expected: Vec<f32> = if scenario == "task-il" {
                (0..5)
                    .map(|u| f32::from(u == row.saturating_sub(1)))
                    .collect()
            } else {
                (0..5)
                    .map(|u| if u < row { 1.0 / row as f32 } else { 0.0 })
                    .collect()
            };
            assert_eq!(per_row, scenario == "task-il", "{scenario} row {row}");
            assert_eq!(lambda, expected, "{scenario} row {row}");
        }
    }
}
