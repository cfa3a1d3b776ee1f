//! Trainer-driven tests of `importance` (sequel-algos/src/importance.rs).

use candle_core::Device;
use sequel_algos::importance::*;
use sequel_core::algorithm::task_samples;

#[test]
fn statistics_are_detached_even_when_candle_gradients_are_not() {
    // A batch-norm scale's gradient is computed from tracked activations; the statistic must not
    // keep that graph, or a penalty on it would back-propagate into the old forward pass.
    let t = sequel_algos::testing::mini_trainer(
        Box::new(sequel_algos::naive::Naive),
        &[
            "model={kind: resnet18, width: 2}",
            "benchmark.train_subset=4",
        ],
    );
    let samples = task_samples(&t.stream, 0);
    let stat = mean_gradient_statistic(
        t.model.as_ref(),
        &t.stream,
        &Device::Cpu,
        &samples,
        1,
        Reduce::Square,
        |out, batch| {
            Ok(vec![(
                1.0,
                sequel_core::loss::task_loss(&out.logits, batch, &t.stream)?,
            )])
        },
    )
    .unwrap();
    assert!(stat.0.iter().all(|s| !s.track_op()));
    assert!(stat.sum().unwrap() > 0.0);
}
