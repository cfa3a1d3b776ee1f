//! Input curvature and input-gradient stability (docs/metrics.md) of a finished run's weights
//! after task T, on the evaluation split of every task of its stream:
//!
//! ```text
//! cargo run --release -p sequel-bench --example input_curvature -- RUN_DIR [T] [h]
//! ```
//!
//! RUN_DIR is a seed folder (it holds `config.yaml` and `checkpoints/task-<T>.safetensors`);
//! T defaults to the last task, h (the finite-difference step, in normalised input units) to
//! 0.01. Prints one CSV line: `run,task,samples,grad_norm,curvature,cosine,beta`, where `beta`
//! is the mean learned softplus β (`exp(log β)`) over layers, or empty.

use std::path::PathBuf;
use std::sync::Arc;

use sequel_core::config::{parse_config, InitHead};
use sequel_core::curvature::input_curvature;
use sequel_core::data::GatherBuf;
use sequel_core::experiment::build_stream;
use sequel_core::sources::{BackboneSpec, Sources};
use sequel_core::Error;

fn main() -> sequel_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        return Err(Error::msg("usage: input_curvature RUN_DIR [T] [h]"));
    };
    let origin = dir.join("config.yaml");
    let text = std::fs::read_to_string(&origin).map_err(|e| Error::io(&origin, e))?;
    let mut cfg = parse_config(&text, &origin.display().to_string(), &[])?;
    let tasks = cfg.benchmark.tasks;
    let t: usize = match args.get(1) {
        Some(a) => a
            .parse()
            .map_err(|_| Error::msg(format!("T: not a task number: {a}")))?,
        None => tasks,
    };
    let h: f64 = match args.get(2) {
        Some(a) => a
            .parse()
            .map_err(|_| Error::msg(format!("h: not a number: {a}")))?,
        None => 0.01,
    };
    cfg.model.init_from = Some(dir.join(format!("checkpoints/task-{t}.safetensors")));
    cfg.model.init_head = InitHead::Load;
    let sources = Sources::builtin();
    let origin = origin.display().to_string();
    let b = &cfg.benchmark;
    let dataset = sources.load_dataset(&b.dataset, b.data_dir.as_deref())?;
    let stream = build_stream(&cfg, &origin, Arc::new(dataset))?;
    let device = candle_core::Device::Cpu;
    let heads = stream.head_sizes();
    let spec = BackboneSpec {
        input: stream.input_shape(),
        heads: &heads,
        tasks: stream.len(),
        seed: cfg.seed,
        device: &device,
    };
    let model = sources.build_model(&cfg.model, &spec, &origin)?;
    let (mut n, mut g, mut c, mut cos) = (0usize, 0f64, 0f64, 0f64);
    let mut buf = GatherBuf::default();
    for task in 0..stream.tasks.len() {
        let (refs, split) = stream.eval_refs(task);
        for chunk in refs.chunks(500) {
            let batch = stream.gather(chunk, split, &mut buf, &device)?;
            let m = input_curvature(model.as_ref(), &batch.x, &batch.y, h)?;
            let k = m.samples as f64;
            (n, g, c, cos) = (
                n + m.samples,
                g + m.grad_norm * k,
                c + m.curvature * k,
                cos + m.cosine * k,
            );
        }
    }
    let betas: Vec<f64> = model
        .params()
        .iter()
        .filter(|p| p.name.ends_with(".log_beta"))
        .map(|p| p.var.to_vec1::<f32>().map(|v| (v[0] as f64).exp()))
        .collect::<std::result::Result<_, _>>()?;
    let beta = if betas.is_empty() {
        String::new()
    } else {
        format!("{:.4}", betas.iter().sum::<f64>() / betas.len() as f64)
    };
    let k = n.max(1) as f64;
    println!(
        "{},{t},{n},{:.6},{:.6},{:.6},{beta}",
        dir.display(),
        g / k,
        c / k,
        cos / k
    );
    Ok(())
}
