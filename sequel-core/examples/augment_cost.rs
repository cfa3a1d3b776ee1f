//! What the CIFAR augmentation (random crop with padding 4, horizontal flip, normalisation) costs
//! per training batch, next to the plain gather it extends (docs/PERFORMANCE.md).
//!
//! `cargo run --release -p sequel-core --example augment_cost [BATCH] [REPEATS]`
//!
//! Synthetic 3×32×32 images (seeded random pixels, 2 000 of them), no dataset files needed.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use sequel_core::config::BenchmarkConfig;
use sequel_core::data::{
    AugmentationConfig, Dataset, GatherBuf, ImageSet, SampleRef, Split, TaskStream,
};
use sequel_core::rng::{SeededRng, Stream};

fn main() -> sequel_core::Result<()> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let batch = args.next().and_then(|a| a.ok()).unwrap_or(32);
    let repeats = args.next().and_then(|a| a.ok()).unwrap_or(20_000);
    let n = 2_000;
    let mut rng = SeededRng::new(0, Stream::Subset);
    let set = ImageSet {
        images: (0..n * 3 * 32 * 32).map(|_| rng.below(256) as u8).collect(),
        labels: (0..n).map(|i| (i % 10) as u16).collect(),
        shape: [3, 32, 32],
    };
    let dataset = Arc::new(Dataset {
        name: "synthetic".into(),
        train: set.clone(),
        test: set,
        num_classes: 10,
        mean: vec![0.5; 3],
        std: vec![0.25; 3],
    });
    let bench: BenchmarkConfig =
        serde_yaml::from_str("{ dataset: synthetic, kind: split, tasks: 5, scenario: class-il }")
            .map_err(|e| sequel_core::Error::msg(e.to_string()))?;
    let aug: AugmentationConfig = serde_yaml::from_str(
        "{ random_crop: { padding: 4 }, horizontal_flip: 0.5, \
           normalize: { mean: [0.4914, 0.4822, 0.4465], std: [0.2470, 0.2435, 0.2615] } }",
    )
    .map_err(|e| sequel_core::Error::msg(e.to_string()))?;
    let stream = TaskStream::build(dataset, &bench, 0)?.with_augmentation(&aug, 0)?;
    let train = &stream.tasks[0].train;
    let batches: Vec<Vec<SampleRef>> = (0..64)
        .map(|_| {
            (0..batch)
                .map(|_| SampleRef {
                    task: 0,
                    index: train[rng.below(train.len() as u64) as usize],
                })
                .collect()
        })
        .collect();
    let mut buf = GatherBuf::default();
    let dev = Device::Cpu;
    let mut time = |augment: bool| -> sequel_core::Result<f64> {
        let start = Instant::now();
        for i in 0..repeats {
            let refs = &batches[i % batches.len()];
            let b = if augment {
                stream.gather_train(refs, &mut buf, &dev)?
            } else {
                stream.gather(refs, Split::Train, &mut buf, &dev)?
            };
            std::hint::black_box(b);
        }
        Ok(start.elapsed().as_secs_f64() * 1e6 / repeats as f64)
    };
    time(true)?; // warm-up
    let plain = time(false)?;
    let augmented = time(true)?;
    println!(
        "batch {batch} of 3x32x32, {repeats} repeats: gather {plain:.1} µs/batch, \
         gather + crop + flip {augmented:.1} µs/batch (augmentation {:.1} µs/batch)",
        augmented - plain
    );
    Ok(())
}
