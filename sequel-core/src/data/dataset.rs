//! In-memory image datasets: one contiguous `u8` array plus labels, as design.md decides.

/// One split (train or test) of an image dataset, stored as `N × C × H × W` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// Pixel bytes, sample-major then channel-major (`N × C × H × W`).
    pub images: Vec<u8>,
    /// Class label of each sample, `0..num_classes`.
    pub labels: Vec<u16>,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per sample (`C·H·W`).
    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw bytes of sample `i`.
    pub fn sample(&self, i: usize) -> &[u8] {
        let d = self.sample_len();
        &self.images[i * d..(i + 1) * d]
    }

    /// A new set holding the given samples, in that order.
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let d = self.sample_len();
        let mut images = Vec::with_capacity(indices.len() * d);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.sample(i));
            labels.push(self.labels[i]);
        }
        ImageSet {
            images,
            labels,
            shape: self.shape,
        }
    }
}

/// A dataset with its train and test splits and the facts the trainer needs about it.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Canonical name (`fashion-mnist`, `mnist`, `fmnist-mini`, `cifar10`, `cifar100`).
    pub name: String,
    pub train: ImageSet,
    pub test: ImageSet,
    pub num_classes: usize,
    /// Per-channel mean and standard deviation of the training pixels in [0, 1], used when
    /// normalisation is enabled.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Dataset {
    /// A dataset from its two splits, for loaders registered by user crates
    /// (`Registry::add_dataset`). Computes the per-channel statistics from `train`.
    ///
    /// Errors if a split is empty, its byte count is not `N·C·H·W`, the splits' shapes differ, or a
    /// label is not below `num_classes`.
    pub fn new(
        name: &str,
        train: ImageSet,
        test: ImageSet,
        num_classes: usize,
    ) -> crate::error::Result<Self> {
        let bad = |m: String| Err(crate::error::Error::msg(format!("dataset `{name}`: {m}")));
        for (split, set) in [("train", &train), ("test", &test)] {
            if set.is_empty() || set.sample_len() == 0 {
                return bad(format!("the {split} split is empty"));
            }
            if set.images.len() != set.len() * set.sample_len() {
                return bad(format!(
                    "the {split} split has {} bytes for {} images of {:?}",
                    set.images.len(),
                    set.len(),
                    set.shape
                ));
            }
            if let Some(l) = set.labels.iter().find(|&&l| l as usize >= num_classes) {
                return bad(format!(
                    "the {split} split has label {l} but num_classes is {num_classes}"
                ));
            }
        }
        if train.shape != test.shape {
            return bad(format!(
                "test images are {:?} but training images are {:?}",
                test.shape, train.shape
            ));
        }
        let (mean, std) = crate::data::discovery::channel_stats(&train);
        Ok(Self {
            name: name.to_string(),
            train,
            test,
            num_classes,
            mean,
            std,
        })
    }
}
