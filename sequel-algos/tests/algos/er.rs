//! Trainer-driven tests of `er` (sequel-algos/src/er.rs).

use sequel_algos::er::*;
use sequel_algos::testing::{mini_trainer, probe_run, probed, probed_mut, Probe};
use sequel_core::buffer::InsertAt;
use sequel_core::trainer::Silent;
use sequel_core::{Algorithm, MemoryConfig};

fn er(buffer_size: usize, replay_batch_size: usize, insert: InsertAt) -> Er {
    Er::new(ErConfig {
        replay_batch_size,
        memory: MemoryConfig {
            buffer_size,
            insert,
            ..MemoryConfig::default()
        },
    })
    .unwrap()
}

/// Per step: (task, incoming rows, tasks of the replayed rows).
fn steps(p: &Probe<Er>) -> Vec<(usize, usize, Vec<u32>)> {
    p.steps
        .iter()
        .map(|s| {
            let replayed = s.parts[1..].iter().flatten().map(|r| r.task).collect();
            (s.task, s.parts[0].len(), replayed)
        })
        .collect()
}

#[test]
fn replays_past_samples_and_stores_only_incoming_ones() {
    let (mut t, _) = probe_run(er(30, 7, InsertAt::Step), &["benchmark.tasks=3"]);
    let p = probed::<Er>(&t);
    let w = steps(p);
    // 3 tasks × 50 samples at batch 10.
    assert_eq!(w.len(), 15);
    assert!(w[0].2.is_empty(), "nothing to replay at the first step");
    for (task, incoming, replayed) in &w[1..] {
        assert_eq!(*incoming, 10);
        assert_eq!(replayed.len(), 7);
        assert!(replayed.iter().all(|&r| r as usize <= *task));
    }
    // Later tasks replay earlier ones.
    assert!(w[10..].iter().any(|s| s.2.contains(&0)));
    let buffer = probed_mut::<Er>(&mut t)
        .algo
        .memory()
        .unwrap()
        .buffer()
        .unwrap();
    // Only the 150 stream samples were offered — never the replayed ones.
    assert_eq!(buffer.seen(), 150);
    assert_eq!(buffer.len(), 30);
    let mut refs = buffer.samples().to_vec();
    refs.sort_by_key(|r| (r.task, r.index));
    refs.dedup();
    assert_eq!(refs.len(), 30, "a sample was stored twice");
}

#[test]
fn task_end_insertion_fills_the_buffer_after_each_task_only() {
    let (mut t, _) = probe_run(er(20, 10, InsertAt::TaskEnd), &["benchmark.tasks=2"]);
    let p = probed::<Er>(&t);
    let w = steps(p);
    // Task 1 never replays (the buffer is empty until its end); task 2 always does, task 1's.
    assert!(w[..5].iter().all(|s| s.2.is_empty()));
    assert!(w[5..]
        .iter()
        .all(|s| s.2.len() == 10 && s.2.iter().all(|&r| r == 0)));
    let memory = probed_mut::<Er>(&mut t).algo.memory().unwrap();
    assert_eq!(memory.buffer().unwrap().seen(), 100);
}

#[test]
fn er_changes_the_trajectory_and_reduces_class_il_forgetting() {
    let run = |algo: Box<dyn Algorithm>| {
        let mut t = mini_trainer(algo, &["benchmark.train_subset=100"]);
        t.run(&mut Silent).unwrap().results.matrix
    };
    let naive = run(Box::new(sequel_algos::naive::Naive));
    let er = run(Box::new(er(100, 10, InsertAt::Step)));
    assert_ne!(naive.rows, er.rows);
    let old = |m: &sequel_core::metrics::AccuracyMatrix| m.rows[4][..4].iter().sum::<f64>();
    // Naive keeps (almost) nothing of tasks 1–4 in class-IL; replay must keep something.
    assert!(
        old(&er) > old(&naive) + 0.2,
        "er {:?} naive {:?}",
        er.rows[4],
        naive.rows[4]
    );
}
