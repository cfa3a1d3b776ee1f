//! Per-step cost of each regularizer against naive, and the cost of the importance estimates
//! (docs/PERFORMANCE.md):
//!
//! ```text
//! cargo run --release -p sequel-algos --example step_overhead [-- STEPS]
//! ```
//!
//! Setup: the split-FMNIST protocol's MLP 784-100-100-10 on fmnist-mini, plain SGD, one thread.
//! Each method first finishes task 1 (so its penalty, path integral or teacher is active), then
//! the trainer's full step of task 2 ([`sequel_core::Trainer::step`]: the loss with its forward
//! passes, backward, edit_gradients, optimizer step, after_step, memory insertion) is timed on
//! pre-gathered batches (data loading excluded).

use std::time::Instant;

use candle_core::Device;
use sequel_algos::Registry;
use sequel_core::algorithm::task_samples;
use sequel_core::config::parse_config;
use sequel_core::data::{Batch, GatherBuf, Split};
use sequel_core::rng::{SeededRng, Stream};
use sequel_core::TaskCtx;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const METHODS: &[&str] = &[
    "naive",
    "{name: ewc}",
    "{name: ewc-online}",
    "{name: si}",
    "{name: mas}",
    "{name: lwf}",
];

/// Replay methods with buffer 200, drawing as many samples per step as the stream batch holds
/// (`BS`; the DER paper's protocol), plus A-GEM and GEM at their defaults (A-GEM's reference batch
/// 256; GEM one gradient per past task over all its stored samples). GDumb trains no step on the
/// stream; its cost is the re-fit (docs/PERFORMANCE.md).
const REPLAY: &[&str] = &[
    "naive",
    "{name: er, replay_batch_size: BS}",
    "{name: er-ace, replay_batch_size: BS}",
    "{name: der, replay_batch_size: BS}",
    "{name: derpp, replay_batch_size: BS}",
    "{name: agem, replay_batch_size: BS}",
    "{name: agem}",
    "{name: gem}",
    "{name: icarl}",
];

fn main() -> anyhow::Result<()> {
    use std::io::Write;
    let out = std::io::stdout();
    let mut out = out.lock();
    macro_rules! println {
        ($($t:tt)*) => {
            // A closed pipe (`| head`) ends the report quietly.
            if writeln!(out, $($t)*).is_err() {
                return Ok(());
            }
        };
    }
    // SAFETY: called on the main thread before any other thread has been started.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 2000,
    };
    println!("| batch | method | steps/s | µs/step | overhead vs naive |");
    println!("|---|---|---|---|---|");
    for bs in [10usize, 128] {
        let mut naive_us = None;
        for m in METHODS {
            let us = time_steps(m, bs, steps, 1)?;
            let base = *naive_us.get_or_insert(us);
            println!(
                "| {bs} | {} | {:.0} | {:.1} | {:+.0} % |",
                m.trim_start_matches("{name: ").trim_end_matches('}'),
                1e6 / us,
                us,
                (us / base - 1.0) * 100.0
            );
        }
    }
    println!();
    println!("Replay methods, timed on task 5 (four past tasks in memory), buffer 200:");
    println!();
    println!("| batch | method | steps/s | µs/step | cost vs naive |");
    println!("|---|---|---|---|---|");
    for bs in [10usize, 128] {
        let mut naive_us = None;
        for m in REPLAY {
            let m = m.replace("BS", &bs.to_string());
            let us = time_steps(&m, bs, steps, 4)?;
            let base = *naive_us.get_or_insert(us);
            println!(
                "| {bs} | `{m}` | {:.0} | {:.1} | {:.2}× |",
                1e6 / us,
                us,
                us / base
            );
        }
    }
    println!();
    println!("| importance estimate | samples | seconds | samples/s |");
    println!("|---|---|---|---|");
    for m in [
        "{name: ewc}",
        "{name: ewc, fisher: {kind: true}}",
        "{name: ewc, fisher: {mode: minibatch}}",
        "{name: ewc, fisher: {kind: true, mode: minibatch}}",
        "{name: mas}",
        "{name: mas, importance: {mode: minibatch}}",
    ] {
        let (n, s) = time_importance(m)?;
        println!("| `{m}` | {n} | {s:.3} | {:.0} |", n as f64 / s);
    }
    Ok(())
}

fn setup(algo: &str, batch_size: usize) -> anyhow::Result<sequel_core::Trainer> {
    let text = format!(
        "name: overhead\nbenchmark: {{ dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il }}\n\
         model: {{ kind: mlp, hidden: [100, 100] }}\noptimizer: {{ kind: sgd, lr: 0.03 }}\n\
         training: {{ batch_size: {batch_size} }}\nalgorithm: {algo}\n"
    );
    let mut cfg = parse_config(&text, "overhead", &[])?;
    cfg.resolve_defaults();
    let (algorithm, _) = Registry::builtin().build_algorithm(&cfg.algorithm, "overhead")?;
    Ok(sequel_core::experiment::build_trainer(
        &cfg, "overhead", algorithm, None,
    )?)
}

/// Microseconds per training step of task `timed + 1`, median of 3 repetitions.
fn time_steps(algo: &str, batch_size: usize, steps: usize, timed: usize) -> anyhow::Result<f64> {
    let mut t = setup(algo, batch_size)?;
    let dev = Device::Cpu;
    let mut buf = GatherBuf::default();
    let mut batches = |t: &sequel_core::Trainer, task: usize| -> anyhow::Result<Vec<Batch>> {
        let refs = task_samples(&t.stream, task);
        refs.chunks(batch_size)
            .filter(|c| c.len() == batch_size)
            .map(|c| Ok(t.stream.gather(c, Split::Train, &mut buf, &dev)?))
            .collect()
    };
    // Tasks before the timed one, with their boundaries, so penalties, teachers and buffers are
    // in the state they have when `timed` trains.
    for task in 0..timed {
        t.begin_task(task)?;
        for (i, b) in batches(&t, task)?.iter().enumerate() {
            t.step(task, 0, i, b)?;
        }
        t.end_task(task)?;
    }
    t.begin_task(timed)?;
    let second = batches(&t, timed)?;
    for (i, b) in second.iter().take(20).enumerate() {
        t.step(timed, 0, i, b)?; // warm-up
    }
    let mut reps = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        for i in 0..steps {
            t.step(timed, 0, i, &second[i % second.len()])?;
        }
        reps.push(start.elapsed().as_secs_f64() * 1e6 / steps as f64);
    }
    reps.sort_by(f64::total_cmp);
    Ok(reps[1])
}

/// Seconds to estimate one task's importance on fmnist-mini's 600 training samples of task 1.
fn time_importance(algo: &str) -> anyhow::Result<(usize, f64)> {
    let mut t = setup(algo, 10)?;
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(0, Stream::Algorithm);
    let n = t.stream.tasks[0].train.len();
    let mut ctx = TaskCtx {
        task: 0,
        stream: &t.stream,
        model: t.model.as_ref(),
        device: &dev,
        rng: &mut rng,
        interrupt: None,
    };
    let start = Instant::now();
    t.algorithm.after_task(&mut ctx)?;
    Ok((n, start.elapsed().as_secs_f64()))
}
