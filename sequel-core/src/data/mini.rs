//! `fmnist-mini`: a class-balanced Fashion-MNIST subset embedded in the crate, so that examples,
//! tests and CI need no download.
//!
//! 300 training and 100 test images per class (3000 + 1000), 1 × 28 × 28: the first ones of each
//! class in file order of the official files. See `data/fmnist-mini/README.md` (how it was made,
//! `scripts/make_fmnist_mini.py` regenerates it) and `data/fmnist-mini/LICENSE` (MIT, Zalando SE).

use std::path::Path;

use crate::data::idx::parse_idx_split;
use crate::data::Dataset;
use crate::error::Result;

/// Name of the embedded dataset.
pub const FMNIST_MINI: &str = "fmnist-mini";
/// Training images per class in `fmnist-mini`.
pub const FMNIST_MINI_TRAIN_PER_CLASS: usize = 300;
/// Test images per class in `fmnist-mini`.
pub const FMNIST_MINI_TEST_PER_CLASS: usize = 100;

const TRAIN_IMAGES: &[u8] = include_bytes!("../../data/fmnist-mini/train-images-idx3-ubyte.gz");
const TRAIN_LABELS: &[u8] = include_bytes!("../../data/fmnist-mini/train-labels-idx1-ubyte.gz");
const TEST_IMAGES: &[u8] = include_bytes!("../../data/fmnist-mini/t10k-images-idx3-ubyte.gz");
const TEST_LABELS: &[u8] = include_bytes!("../../data/fmnist-mini/t10k-labels-idx1-ubyte.gz");

/// Total size in bytes of the embedded (gzipped) files.
pub const FMNIST_MINI_EMBEDDED_BYTES: usize =
    TRAIN_IMAGES.len() + TRAIN_LABELS.len() + TEST_IMAGES.len() + TEST_LABELS.len();

// The embedded data must stay within its 2 MB budget: checked at compile time.
const _: () = assert!(
    FMNIST_MINI_EMBEDDED_BYTES <= 2_000_000,
    "fmnist-mini exceeds its 2 MB budget"
);

/// Loads the embedded `fmnist-mini` dataset (10 classes, 3000 train + 1000 test, `[1, 28, 28]`).
pub fn load_fmnist_mini() -> Result<Dataset> {
    let origin = |f: &'static str| Path::new("<embedded fmnist-mini>").join(f);
    let train = parse_idx_split(
        (TRAIN_IMAGES, &origin("train-images-idx3-ubyte.gz")),
        (TRAIN_LABELS, &origin("train-labels-idx1-ubyte.gz")),
        10,
    )?;
    let test_images = origin("t10k-images-idx3-ubyte.gz");
    let test = parse_idx_split(
        (TEST_IMAGES, &test_images),
        (TEST_LABELS, &origin("t10k-labels-idx1-ubyte.gz")),
        10,
    )?;
    crate::data::discovery::assemble(FMNIST_MINI, train, test, 10, &test_images)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_class(labels: &[u16]) -> Vec<usize> {
        let mut c = vec![0; 10];
        for &l in labels {
            c[l as usize] += 1;
        }
        c
    }

    #[test]
    fn embedded_set_is_balanced() {
        let ds = load_fmnist_mini().unwrap();
        assert_eq!(ds.name, "fmnist-mini");
        assert_eq!(ds.num_classes, 10);
        assert_eq!(ds.train.shape, [1, 28, 28]);
        assert_eq!(ds.test.shape, [1, 28, 28]);
        assert_eq!(ds.train.len(), 3000);
        assert_eq!(ds.test.len(), 1000);
        assert_eq!(ds.train.images.len(), 3000 * 784);
        assert_eq!(
            per_class(&ds.train.labels),
            vec![FMNIST_MINI_TRAIN_PER_CLASS; 10]
        );
        assert_eq!(
            per_class(&ds.test.labels),
            vec![FMNIST_MINI_TEST_PER_CLASS; 10]
        );
        // Fashion-MNIST's training mean and std are about 0.286 and 0.353.
        assert!((ds.mean[0] - 0.286).abs() < 0.02, "{:?}", ds.mean);
        assert!((ds.std[0] - 0.353).abs() < 0.02, "{:?}", ds.std);
    }
}
