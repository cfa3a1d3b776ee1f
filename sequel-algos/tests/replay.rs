//! Every replay method through the registry, the YAML path and the real trainer on the embedded
//! fmnist-mini: five tasks in each scenario, bit-identical reruns, and the memory's effect on
//! class-IL forgetting.

use std::path::Path;

use sequel_algos::run::{execute, prepare};
use sequel_algos::Registry;
use sequel_core::trainer::Silent;

/// Every registered method with a memory (a `buffer_size` key), with a small buffer so that 5
/// short tasks overflow it.
fn methods() -> Vec<String> {
    let reg = Registry::builtin();
    let m: Vec<String> = reg
        .algorithms()
        .into_iter()
        .filter(|(name, _)| {
            let d = reg.algorithm_defaults(name).expect("registered");
            d.get("buffer_size").is_some()
        })
        .map(|(name, _)| {
            // Settings under which every method learns these short tasks at lr 0.1.
            let extra = match name {
                "der" => ", alpha: 0.5",
                "derpp" => ", alpha: 0.5, beta: 0.5",
                "agem" => ", replay_batch_size: 20",
                "gdumb" => ", fit_epochs: 8",
                // The evaluated stable model averages ~1/(1 − α_S) steps: 10-step tasks need a
                // short average.
                "cls-er" => ", alpha_p: 0.5, alpha_s: 0.5",
                // LUCIR's scale σ starts at 1 and 10-step tasks leave it near 2 (≈ 20 after the
                // full protocol's 1200 steps), so the margin ranking on unscaled cosines outweighs
                // the cross-entropy and holds the new classes down.
                "lucir" => ", lambda_mr: 0.0",
                _ => "",
            };
            format!("{{ name: {name}, buffer_size: 40{extra} }}")
        })
        .collect();
    assert!(m.len() >= 8, "{m:?}");
    m
}

fn config(out: &Path, algorithm: &str) -> String {
    format!(
        "name: replay\nseed: 0\n\
         benchmark: {{ dataset: fmnist-mini, kind: split, tasks: 5, classes_per_task: 2, scenario: class-il, train_subset: 100 }}\n\
         model: {{ kind: mlp, hidden: [32] }}\n\
         optimizer: {{ kind: sgd, lr: 0.1 }}\n\
         training: {{ epochs: 1, batch_size: 10, log_every: 0 }}\n\
         algorithm: {algorithm}\n\
         output: {{ dir: {} }}\n",
        out.display()
    )
}

fn run(text: &str, overrides: &[&str]) -> sequel_core::experiment::Finished {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let p = prepare(text, "test.yaml", &o, &Registry::builtin()).unwrap();
    execute(p, &mut Silent, None).unwrap()
}

#[test]
fn every_replay_method_runs_five_tasks_in_every_scenario() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, algo) in methods().iter().enumerate() {
        for (j, scenario) in [
            &["benchmark.scenario=class-il"][..],
            &["benchmark.scenario=task-il"],
            &["benchmark.scenario=task-il", "benchmark.task_il_head=multi"],
        ]
        .iter()
        .enumerate()
        {
            let name = format!("name=r{i}-{j}");
            let mut o = scenario.to_vec();
            o.push(&name);
            let f = run(&config(tmp.path(), algo), &o);
            let m = &f.outcome.matrix;
            assert!(f.outcome.failure.is_none(), "{algo} {scenario:?}");
            assert_eq!(m.rows.len(), 5, "{algo} {scenario:?}");
            // Tasks are learned when they are trained (well above chance on average).
            let chance = if j == 0 { 0.1 } else { 0.5 };
            let diag = (0..5).map(|t| m.rows[t][t]).sum::<f64>() / 5.0;
            assert!(diag > chance + 0.2, "{algo} {scenario:?}: {:?}", m.rows);
        }
    }
}

#[test]
fn replay_runs_are_bit_identical_for_the_same_seed() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, algo) in methods().iter().enumerate() {
        let text = config(tmp.path(), algo);
        let a = run(&text, &[&format!("name=a{i}")]);
        let b = run(&text, &[&format!("name=b{i}")]);
        let read = |d: &Path| std::fs::read(d.join("accuracy_matrix.csv")).unwrap();
        assert_eq!(read(&a.dir), read(&b.dir), "{algo}");
        let c = run(&text, &[&format!("name=c{i}"), "seed=1"]);
        assert_ne!(read(&a.dir), read(&c.dir), "{algo}: the seed must matter");
    }
}
