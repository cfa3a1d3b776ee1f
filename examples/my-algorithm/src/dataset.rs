//! `blobs`: a user dataset registered beside the built-in ones (`Registry::add_dataset`).
//!
//! Four classes of 1 × 8 × 8 images: class `c` lights quadrant `c`, over uniform noise. The data
//! is generated in memory from a fixed stream (it plays the part of files on disk, so it does not
//! change with the experiment seed); the stream, class order and scenario come from the config.

use sequel_core::data::{Dataset, ImageSet};
use sequel_core::rng::SeededRng;

/// Images per class in the train and test splits.
const TRAIN_PER_CLASS: usize = 100;
const TEST_PER_CLASS: usize = 25;

fn split(per_class: usize, rng: &mut SeededRng) -> ImageSet {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for _ in 0..per_class {
        for class in 0..4u16 {
            let (qy, qx) = (class as usize / 2, class as usize % 2);
            for y in 0..8 {
                for x in 0..8 {
                    let lit = y / 4 == qy && x / 4 == qx;
                    let noise = (rng.uniform_f32() * 96.0) as u8;
                    images.push(if lit { 160 + noise } else { noise });
                }
            }
            labels.push(class);
        }
    }
    ImageSet {
        images,
        labels,
        shape: [1, 8, 8],
    }
}

/// The loader `Registry::add_dataset` takes; `_data_dir` is `benchmark.data_dir` (unused: the
/// data is generated).
pub fn load_blobs(_data_dir: Option<&std::path::Path>) -> sequel_core::Result<Dataset> {
    let mut rng = SeededRng::with_stream_id(0, 0xb10b5);
    let train = split(TRAIN_PER_CLASS, &mut rng);
    let test = split(TEST_PER_CLASS, &mut rng);
    Dataset::new("blobs", train, test, 4)
}
