//! Readers for the binary versions of CIFAR-10 and CIFAR-100.
//!
//! CIFAR-10: `data_batch_1.bin` … `data_batch_5.bin` and `test_batch.bin`, each a sequence of
//! records of 1 label byte and 3072 pixel bytes (3 × 32 × 32, channel-major).
//! CIFAR-100: `train.bin` and `test.bin`, records of 1 coarse label byte, 1 fine label byte and
//! 3072 pixel bytes; the fine label (100 classes) is used.

use std::path::{Path, PathBuf};

use crate::data::{Dataset, ImageSet};
use crate::error::{Error, Result};

/// `[C, H, W]` of a CIFAR image.
pub const CIFAR_SHAPE: [usize; 3] = [3, 32, 32];
const PIXELS: usize = 3 * 32 * 32;

/// CIFAR-10 training files, in load order.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// CIFAR-10 test file.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";
/// CIFAR-100 training file.
pub const CIFAR100_TRAIN_FILE: &str = "train.bin";
/// CIFAR-100 test file.
pub const CIFAR100_TEST_FILE: &str = "test.bin";

/// Folder the CIFAR-10 binary archive extracts to.
pub const CIFAR10_ARCHIVE_DIR: &str = "cifar-10-batches-bin";
/// Folder the CIFAR-100 binary archive extracts to.
pub const CIFAR100_ARCHIVE_DIR: &str = "cifar-100-binary";

/// All files of the CIFAR-10 binary version.
pub fn cifar10_files() -> Vec<&'static str> {
    let mut f = CIFAR10_TRAIN_FILES.to_vec();
    f.push(CIFAR10_TEST_FILE);
    f
}

/// All files of the CIFAR-100 binary version.
pub fn cifar100_files() -> Vec<&'static str> {
    vec![CIFAR100_TRAIN_FILE, CIFAR100_TEST_FILE]
}

fn format_err(path: &Path, message: impl Into<String>) -> Error {
    Error::DataFormat {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Parses CIFAR records held in memory and appends them to `set`.
/// `label_bytes` is 1 (CIFAR-10) or 2 (CIFAR-100: coarse, fine); the last label byte is used and
/// must be `< num_classes`; a CIFAR-100 coarse label must be `< 20`.
pub fn parse_cifar_records(
    bytes: &[u8],
    origin: &Path,
    label_bytes: usize,
    num_classes: usize,
    set: &mut ImageSet,
) -> Result<()> {
    let record = label_bytes + PIXELS;
    if bytes.is_empty() {
        return Err(format_err(origin, "the file is empty"));
    }
    if bytes.len() % record != 0 {
        return Err(format_err(
            origin,
            format!(
                "length {} is not a multiple of the {record}-byte record size \
                 (truncated file, or not the binary version of this dataset?)",
                bytes.len()
            ),
        ));
    }
    set.images.reserve(bytes.len() / record * PIXELS);
    set.labels.reserve(bytes.len() / record);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        if label_bytes == 2 && rec[0] >= 20 {
            return Err(format_err(
                origin,
                format!(
                    "coarse label {} of record {i} is out of range: 20 superclasses",
                    rec[0]
                ),
            ));
        }
        let label = rec[label_bytes - 1];
        if label as usize >= num_classes {
            return Err(format_err(
                origin,
                format!(
                    "label {label} of record {i} is out of range: the dataset has {num_classes} classes"
                ),
            ));
        }
        set.labels.push(label as u16);
        set.images.extend_from_slice(&rec[label_bytes..]);
    }
    Ok(())
}

fn read_records(paths: &[PathBuf], label_bytes: usize, num_classes: usize) -> Result<ImageSet> {
    let mut set = ImageSet {
        images: Vec::new(),
        labels: Vec::new(),
        shape: CIFAR_SHAPE,
    };
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        parse_cifar_records(&bytes, path, label_bytes, num_classes, &mut set)?;
    }
    Ok(set)
}

/// Loads CIFAR-10 from exactly `folder` (no subfolder search).
pub fn load_cifar10_folder(folder: &Path) -> Result<Dataset> {
    let train: Vec<PathBuf> = CIFAR10_TRAIN_FILES.iter().map(|f| folder.join(f)).collect();
    let test = folder.join(CIFAR10_TEST_FILE);
    let train_set = read_records(&train, 1, 10)?;
    let test_set = read_records(std::slice::from_ref(&test), 1, 10)?;
    crate::data::discovery::assemble("cifar10", train_set, test_set, 10, &test)
}

/// Loads CIFAR-100 (fine labels) from exactly `folder` (no subfolder search).
pub fn load_cifar100_folder(folder: &Path) -> Result<Dataset> {
    let train = folder.join(CIFAR100_TRAIN_FILE);
    let test = folder.join(CIFAR100_TEST_FILE);
    let train_set = read_records(std::slice::from_ref(&train), 2, 100)?;
    let test_set = read_records(std::slice::from_ref(&test), 2, 100)?;
    crate::data::discovery::assemble("cifar100", train_set, test_set, 100, &test)
}

/// Loads CIFAR-10 (binary version) from `dir` or its subfolder `cifar-10-batches-bin/`.
pub fn load_cifar10(dir: &Path) -> Result<Dataset> {
    let folders = [dir.to_path_buf(), dir.join(CIFAR10_ARCHIVE_DIR)];
    crate::data::discovery::load_from_folders("cifar10", &folders)
}

/// Loads CIFAR-100 (binary version, fine labels) from `dir` or its subfolder `cifar-100-binary/`.
pub fn load_cifar100(dir: &Path) -> Result<Dataset> {
    let folders = [dir.to_path_buf(), dir.join(CIFAR100_ARCHIVE_DIR)];
    crate::data::discovery::load_from_folders("cifar100", &folders)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(seed: u8) -> Vec<u8> {
        (0..PIXELS)
            .map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed))
            .collect()
    }

    fn cifar10_record(label: u8, seed: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend(image(seed));
        r
    }

    #[test]
    fn cifar10_round_trip_in_archive_subfolder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(CIFAR10_ARCHIVE_DIR);
        std::fs::create_dir(&dir).unwrap();
        for (b, f) in CIFAR10_TRAIN_FILES.iter().enumerate() {
            let mut bytes = cifar10_record(b as u8, b as u8);
            bytes.extend(cifar10_record(9, 100 + b as u8));
            std::fs::write(dir.join(f), bytes).unwrap();
        }
        std::fs::write(dir.join(CIFAR10_TEST_FILE), cifar10_record(7, 42)).unwrap();
        let ds = load_cifar10(tmp.path()).unwrap();
        assert_eq!(ds.name, "cifar10");
        assert_eq!(ds.num_classes, 10);
        assert_eq!(ds.train.len(), 10);
        assert_eq!(ds.train.labels, vec![0, 9, 1, 9, 2, 9, 3, 9, 4, 9]);
        assert_eq!(ds.train.shape, [3, 32, 32]);
        assert_eq!(ds.train.sample(3), &image(101)[..]);
        assert_eq!(ds.test.labels, vec![7]);
        assert_eq!(ds.test.sample(0), &image(42)[..]);
        assert_eq!(ds.mean.len(), 3);
        assert_eq!(ds.std.len(), 3);
    }

    #[test]
    fn cifar100_round_trip_uses_fine_labels() {
        let tmp = tempfile::tempdir().unwrap();
        let rec = |coarse: u8, fine: u8, seed: u8| {
            let mut r = vec![coarse, fine];
            r.extend(image(seed));
            r
        };
        let mut train = rec(3, 99, 1);
        train.extend(rec(19, 0, 2));
        std::fs::write(tmp.path().join(CIFAR100_TRAIN_FILE), train).unwrap();
        std::fs::write(tmp.path().join(CIFAR100_TEST_FILE), rec(0, 55, 3)).unwrap();
        let ds = load_cifar100(tmp.path()).unwrap();
        assert_eq!(ds.num_classes, 100);
        assert_eq!(ds.train.labels, vec![99, 0]);
        assert_eq!(ds.train.sample(1), &image(2)[..]);
        assert_eq!(ds.test.labels, vec![55]);
    }

    #[test]
    fn malformed_records_are_errors() {
        let p = Path::new("/x/data_batch_1.bin");
        let mut set = ImageSet {
            images: vec![],
            labels: vec![],
            shape: CIFAR_SHAPE,
        };
        let rec = cifar10_record(1, 0);
        let e = parse_cifar_records(&rec[..3000], p, 1, 10, &mut set)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/x/data_batch_1.bin") && e.contains("3073"),
            "{e}"
        );
        let e = parse_cifar_records(&cifar10_record(10, 0), p, 1, 10, &mut set)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 10"), "{e}");
        assert!(parse_cifar_records(&[], p, 1, 10, &mut set).is_err());
        let mut r100 = vec![25u8, 3];
        r100.extend(image(0));
        assert!(parse_cifar_records(&r100, p, 2, 100, &mut set).is_err());
    }

    #[test]
    fn malformed_file_is_not_reported_as_missing() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(CIFAR100_TRAIN_FILE), [0u8; 100]).unwrap();
        std::fs::write(tmp.path().join(CIFAR100_TEST_FILE), [0u8; 100]).unwrap();
        let e = load_cifar100(tmp.path()).unwrap_err();
        assert!(matches!(e, Error::DataFormat { .. }), "{e}");
    }
}
