//! Finding and loading datasets by name.
//!
//! Search order for the files of a dataset: the config's `data_dir` (if given), every folder in
//! `$SEQUEL_DATA` (a path list, like `$PATH`), `./data`, then the dataset's system folders
//! (`/usr/share/datasets/fashion-mnist`, `/usr/share/datasets/mnist`). In each root the
//! subfolders named after the dataset are tried first (e.g. `fashion-mnist/`, or `cifar10/`,
//! `cifar-10-batches-bin/`), then the root itself. The first folder holding all the expected
//! files is loaded; if those files are malformed that is an error, the search does not go on.
//! `fmnist-mini` is embedded in the crate and needs no files.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::data::cifar::{self, CIFAR100_ARCHIVE_DIR, CIFAR10_ARCHIVE_DIR};
use crate::data::idx::{self, IDX_FILES};
use crate::data::mini::{self, FMNIST_MINI};
use crate::data::{Dataset, ImageSet};
use crate::error::{Error, Result};

/// Names accepted by [`load_dataset`].
pub const DATASETS: &[&str] = &[
    "fmnist-mini",
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
];

/// `[C, H, W]` of a built-in dataset's images (known without loading it), `None` for other names.
pub fn input_shape(name: &str) -> Option<[usize; 3]> {
    match name {
        "fmnist-mini" | "fashion-mnist" | "mnist" => Some([1, 28, 28]),
        "cifar10" | "cifar100" => Some([3, 32, 32]),
        _ => None,
    }
}

/// Environment variable naming extra dataset roots (a path list, like `$PATH`).
pub const DATA_ENV: &str = "SEQUEL_DATA";

/// Loads dataset `name` (one of [`DATASETS`]), searching `data_dir`, `$SEQUEL_DATA`, `./data`
/// and the system folders in that order (see the module docs).
pub fn load_dataset(name: &str, data_dir: Option<&Path>) -> Result<Dataset> {
    check_name(name)?;
    if name == FMNIST_MINI {
        return mini::load_fmnist_mini();
    }
    let env = std::env::var_os(DATA_ENV);
    let roots = search_roots(name, data_dir, env.as_deref());
    load_dataset_from_roots(name, &roots)
}

/// The roots [`load_dataset`] searches, in order, given the config's `data_dir` and the value
/// of `$SEQUEL_DATA`. Duplicates are removed.
pub fn search_roots(
    name: &str,
    data_dir: Option<&Path>,
    sequel_data: Option<&OsStr>,
) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    roots.extend(data_dir.map(Path::to_path_buf));
    if let Some(v) = sequel_data {
        roots.extend(std::env::split_paths(v).filter(|p| !p.as_os_str().is_empty()));
    }
    roots.push(PathBuf::from("./data"));
    roots.extend(system_folders(name).iter().map(PathBuf::from));
    let mut unique: Vec<PathBuf> = Vec::with_capacity(roots.len());
    for r in roots {
        if !unique.contains(&r) {
            unique.push(r);
        }
    }
    unique
}

/// Loads dataset `name` searching only the given roots (each root: its dataset subfolders, then
/// the root itself). `fmnist-mini` ignores the roots.
pub fn load_dataset_from_roots(name: &str, roots: &[PathBuf]) -> Result<Dataset> {
    check_name(name)?;
    if name == FMNIST_MINI {
        return mini::load_fmnist_mini();
    }
    load_from_folders(name, &search_folders(name, roots))
}

/// Every folder searched for dataset `name` under `roots`, in search order.
pub fn search_folders(name: &str, roots: &[PathBuf]) -> Vec<PathBuf> {
    let subs = subfolders(name);
    roots
        .iter()
        .flat_map(|r| {
            subs.iter()
                .map(move |s| r.join(s))
                .chain(std::iter::once(r.clone()))
        })
        .collect()
}

fn check_name(name: &str) -> Result<()> {
    if DATASETS.contains(&name) {
        Ok(())
    } else {
        Err(Error::UnknownName {
            kind: "dataset",
            name: name.to_string(),
            valid: DATASETS.join(", "),
        })
    }
}

fn system_folders(name: &str) -> &'static [&'static str] {
    match name {
        "fashion-mnist" => &["/usr/share/datasets/fashion-mnist"],
        "mnist" => &["/usr/share/datasets/mnist"],
        _ => &[],
    }
}

fn subfolders(name: &str) -> &'static [&'static str] {
    match name {
        "fashion-mnist" => &["fashion-mnist", "FashionMNIST/raw"],
        "mnist" => &["mnist", "MNIST/raw"],
        "cifar10" => &[
            "cifar10",
            CIFAR10_ARCHIVE_DIR,
            "cifar10/cifar-10-batches-bin",
        ],
        "cifar100" => &[
            "cifar100",
            CIFAR100_ARCHIVE_DIR,
            "cifar100/cifar-100-binary",
        ],
        _ => &[],
    }
}

fn is_idx(name: &str) -> bool {
    matches!(name, "fashion-mnist" | "mnist")
}

/// The files dataset `name` needs (for IDX datasets, each may also be `X.gz`).
fn expected_files(name: &str) -> Vec<&'static str> {
    match name {
        "cifar10" => cifar::cifar10_files(),
        "cifar100" => cifar::cifar100_files(),
        _ => IDX_FILES.to_vec(),
    }
}

/// The expected files missing from `folder`.
fn missing_files(name: &str, folder: &Path) -> Vec<&'static str> {
    expected_files(name)
        .into_iter()
        .filter(|f| {
            if is_idx(name) {
                idx::idx_file_in(folder, f).is_none()
            } else {
                !folder.join(f).is_file()
            }
        })
        .collect()
}

/// Loads dataset `name` from the first of `folders` that holds all its files.
pub(crate) fn load_from_folders(name: &str, folders: &[PathBuf]) -> Result<Dataset> {
    let expected = expected_files(name);
    let mut partial: Vec<String> = Vec::new();
    for folder in folders {
        let missing = missing_files(name, folder);
        if missing.is_empty() {
            tracing::info!(dataset = name, folder = %folder.display(), "loading dataset");
            return match name {
                "cifar10" => cifar::load_cifar10_folder(folder),
                "cifar100" => cifar::load_cifar100_folder(folder),
                _ => idx::load_idx_dir(name, folder, 10),
            };
        }
        if missing.len() < expected.len() {
            partial.push(format!(
                "{} has some of the files but lacks {}",
                folder.display(),
                missing.join(", ")
            ));
        }
    }
    let list = |v: &[String]| v.join(", ");
    let searched: Vec<String> = folders.iter().map(|f| f.display().to_string()).collect();
    let mut expected_s = expected.join(", ");
    if is_idx(name) {
        expected_s.push_str(" (each raw or .gz)");
    }
    let mut hint = match name {
        "fashion-mnist" => "install it with `apt-get install dataset-fashion-mnist` (Debian) \
                            or put the four files in one of these folders"
            .to_string(),
        "mnist" => "download the four IDX files from the MNIST site and put them in one of \
                    these folders"
            .to_string(),
        "cifar10" => "download the binary version (cifar-10-binary.tar.gz) and extract it \
                      into one of these folders"
            .to_string(),
        _ => "download the binary version (cifar-100-binary.tar.gz) and extract it \
              into one of these folders"
            .to_string(),
    };
    hint.push_str(&format!(
        " (or point the config's data_dir or ${DATA_ENV} at the folder that holds them)"
    ));
    if !partial.is_empty() {
        hint.push_str(&format!("; note: {}", partial.join("; ")));
    }
    Err(Error::DatasetNotFound {
        dataset: name.to_string(),
        expected: expected_s,
        searched: list(&searched),
        hint,
    })
}

/// Per-channel mean and standard deviation of a set's pixels scaled to [0, 1]. A channel
/// with zero spread gets std 1 (so normalising never divides by zero); an empty set gets
/// mean 0 and std 1.
pub fn channel_stats(set: &ImageSet) -> (Vec<f32>, Vec<f32>) {
    let [c, h, w] = set.shape;
    let plane = h * w;
    let n = set.len();
    // Integer sums are exact: 255² × (a few ×10⁹ pixels) fits a u64 with room to spare.
    let mut sum = vec![0u64; c];
    let mut sq = vec![0u64; c];
    if plane > 0 {
        for (i, chunk) in set.images.chunks_exact(plane).enumerate() {
            let ch = i % c;
            let (mut s, mut q) = (0u64, 0u64);
            for &p in chunk {
                let p = p as u64;
                s += p;
                q += p * p;
            }
            sum[ch] += s;
            sq[ch] += q;
        }
    }
    let count = (n * plane) as u128;
    let mut mean = Vec::with_capacity(c);
    let mut std = Vec::with_capacity(c);
    for ch in 0..c {
        if count == 0 {
            mean.push(0.0);
            std.push(1.0);
            continue;
        }
        let (s, q) = (sum[ch] as u128, sq[ch] as u128);
        // count² · 255² · variance, computed exactly (a constant channel gives exactly 0).
        let scaled_var = count * q - s * s;
        let denom = (count * 255) as f64;
        let m = s as f64 / denom;
        let sd = (scaled_var as f64).sqrt() / denom;
        mean.push(m as f32);
        std.push(if sd > 0.0 { sd as f32 } else { 1.0 });
    }
    (mean, std)
}

/// Builds a [`Dataset`] from its splits: checks that both have the same shape and computes the
/// training mean and std. `test_origin` names the test files in errors.
pub(crate) fn assemble(
    name: &str,
    train: ImageSet,
    test: ImageSet,
    num_classes: usize,
    test_origin: &Path,
) -> Result<Dataset> {
    if train.shape != test.shape {
        return Err(Error::DataFormat {
            path: test_origin.to_path_buf(),
            message: format!(
                "test images are {:?} but training images are {:?}",
                test.shape, train.shape
            ),
        });
    }
    let (mean, std) = channel_stats(&train);
    Ok(Dataset {
        name: name.to_string(),
        train,
        test,
        num_classes,
        mean,
        std,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::{encode_idx_images, encode_idx_labels};
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    /// Writes a tiny 2×2 IDX dataset (train: n_train images, test: 2) into `dir`; the files
    /// listed in `gz` are gzipped and named `.gz`.
    fn write_idx(dir: &Path, n_train: usize, gz: &[usize]) {
        std::fs::create_dir_all(dir).unwrap();
        let img = |n: usize| {
            (0..n * 4)
                .map(|i| (i * 13 % 256) as u8)
                .collect::<Vec<u8>>()
        };
        let lbl = |n: usize| (0..n).map(|i| (i % 10) as u8).collect::<Vec<u8>>();
        let contents = [
            encode_idx_images(&img(n_train), n_train, 2, 2),
            encode_idx_labels(&lbl(n_train)),
            encode_idx_images(&img(2), 2, 2, 2),
            encode_idx_labels(&lbl(2)),
        ];
        for (i, (name, bytes)) in IDX_FILES.iter().zip(contents).enumerate() {
            if gz.contains(&i) {
                std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    #[test]
    fn raw_and_gz_files_both_load() {
        let tmp = tempfile::tempdir().unwrap();
        write_idx(&tmp.path().join("a"), 12, &[0, 3]);
        write_idx(&tmp.path().join("b"), 12, &[]);
        let roots = |d: &str| vec![tmp.path().join(d)];
        let a = load_dataset_from_roots("fashion-mnist", &roots("a")).unwrap();
        let b = load_dataset_from_roots("fashion-mnist", &roots("b")).unwrap();
        assert_eq!(a.train, b.train);
        assert_eq!(a.test, b.test);
        assert_eq!(a.train.len(), 12);
        assert_eq!(a.train.shape, [1, 2, 2]);
        assert_eq!(a.train.labels[11], 1);
        assert_eq!(a.name, "fashion-mnist");
        assert_eq!(a.num_classes, 10);
    }

    #[test]
    fn dataset_subfolder_is_preferred_to_root() {
        let tmp = tempfile::tempdir().unwrap();
        write_idx(tmp.path(), 3, &[]);
        write_idx(&tmp.path().join("mnist"), 5, &[1]);
        let ds = load_dataset_from_roots("mnist", &[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(ds.train.len(), 5);
        // Roots are tried in order: the first root wins even if a later one has the data too.
        let other = tempfile::tempdir().unwrap();
        write_idx(&other.path().join("fashion-mnist"), 7, &[]);
        let roots = [other.path().to_path_buf(), tmp.path().to_path_buf()];
        let ds = load_dataset_from_roots("fashion-mnist", &roots).unwrap();
        assert_eq!(ds.train.len(), 7);
    }

    #[test]
    fn truncated_file_is_a_format_error_with_path_and_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        write_idx(tmp.path(), 4, &[]);
        let path = tmp.path().join(IDX_FILES[0]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        // A later root holds a valid copy: a malformed file must not fall through to it.
        let good = tempfile::tempdir().unwrap();
        write_idx(good.path(), 4, &[]);
        let roots = [tmp.path().to_path_buf(), good.path().to_path_buf()];
        let e = load_dataset_from_roots("fashion-mnist", &roots).unwrap_err();
        assert!(matches!(e, Error::DataFormat { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("expected 32 bytes, found 29"), "{msg}");
    }

    #[test]
    fn wrong_magic_and_label_out_of_range_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        write_idx(tmp.path(), 4, &[]);
        let lbl = tmp.path().join(IDX_FILES[1]);
        std::fs::write(&lbl, encode_idx_labels(&[0, 1, 12, 3])).unwrap();
        let e = load_dataset_from_roots("mnist", &[tmp.path().to_path_buf()]).unwrap_err();
        assert!(e.to_string().contains("label 12 of item 2"), "{e}");
        // Image file where the labels should be.
        std::fs::write(&lbl, encode_idx_images(&[0; 16], 4, 2, 2)).unwrap();
        let e = load_dataset_from_roots("mnist", &[tmp.path().to_path_buf()]).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        // Labels count differs from images count.
        std::fs::write(&lbl, encode_idx_labels(&[0, 1, 2])).unwrap();
        let e = load_dataset_from_roots("mnist", &[tmp.path().to_path_buf()]).unwrap_err();
        assert!(matches!(e, Error::DataFormat { .. }), "{e}");
    }

    #[test]
    fn missing_dataset_lists_files_folders_and_remedy() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = [tmp.path().join("r1"), tmp.path().join("r2")];
        for name in ["fashion-mnist", "mnist", "cifar10", "cifar100"] {
            let e = load_dataset_from_roots(name, &roots).unwrap_err();
            assert!(matches!(e, Error::DatasetNotFound { .. }), "{e}");
            let msg = e.to_string();
            for f in expected_files(name) {
                assert!(msg.contains(f), "{name}: {f} missing from {msg}");
            }
            for folder in search_folders(name, &roots) {
                let shown = folder.display().to_string();
                assert!(msg.contains(&shown), "{name}: {shown} missing from {msg}");
            }
            let remedy = match name {
                "fashion-mnist" => "apt-get install dataset-fashion-mnist",
                "mnist" => "MNIST site",
                "cifar10" => "cifar-10-binary.tar.gz",
                _ => "cifar-100-binary.tar.gz",
            };
            assert!(msg.contains(remedy), "{msg}");
        }
        assert!(search_folders("cifar10", &roots).contains(&roots[1].join("cifar-10-batches-bin")));
    }

    #[test]
    fn partial_folder_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        write_idx(tmp.path(), 2, &[]);
        std::fs::remove_file(tmp.path().join(IDX_FILES[3])).unwrap();
        let e = load_dataset_from_roots("mnist", &[tmp.path().to_path_buf()]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("lacks t10k-labels-idx1-ubyte"), "{msg}");
    }

    #[test]
    fn cifar_found_through_roots() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cifar100").join(CIFAR100_ARCHIVE_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let mut rec = vec![1u8, 42];
        rec.extend(std::iter::repeat_n(128u8, 3072));
        std::fs::write(dir.join("train.bin"), &rec).unwrap();
        std::fs::write(dir.join("test.bin"), &rec).unwrap();
        let ds = load_dataset_from_roots("cifar100", &[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(ds.train.labels, vec![42]);
        assert_eq!(ds.train.shape, [3, 32, 32]);
        assert!((ds.mean[0] - 128.0 / 255.0).abs() < 1e-6);
        assert_eq!(ds.std, vec![1.0; 3]);
    }

    #[test]
    fn unknown_name_lists_valid_names() {
        let e = load_dataset("cifar-10", None).unwrap_err();
        match &e {
            Error::UnknownName { kind, name, valid } => {
                assert_eq!(*kind, "dataset");
                assert_eq!(name, "cifar-10");
                for d in DATASETS {
                    assert!(valid.contains(d));
                }
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn embedded_mini_needs_no_search() {
        let ds = load_dataset("fmnist-mini", None).unwrap();
        assert_eq!(ds.train.len(), 3000);
    }

    #[test]
    fn roots_order_and_dedup() {
        let joined = std::env::join_paths(["/e1", "/e2"]).unwrap();
        let roots = search_roots("mnist", Some(Path::new("/cfg")), Some(&joined));
        let want: Vec<PathBuf> = ["/cfg", "/e1", "/e2", "./data", "/usr/share/datasets/mnist"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(roots, want);
        let roots = search_roots("cifar10", Some(Path::new("./data")), None);
        assert_eq!(roots, vec![PathBuf::from("./data")]);
    }

    #[test]
    fn channel_stats_are_exact() {
        // 2 samples, 2 channels, 1×2 pixels. Channel 0: 0, 255, 0, 255; channel 1: all 51.
        let set = ImageSet {
            images: vec![0, 255, 51, 51, 255, 0, 51, 51],
            labels: vec![0, 1],
            shape: [2, 1, 2],
        };
        let (m, s) = channel_stats(&set);
        assert!(
            (m[0] - 0.5).abs() < 1e-6 && (s[0] - 0.5).abs() < 1e-6,
            "{m:?} {s:?}"
        );
        assert!((m[1] - 0.2).abs() < 1e-6 && s[1] == 1.0, "{m:?} {s:?}");
    }

    #[test]
    fn full_fashion_mnist_when_installed() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        if !dir.is_dir() {
            eprintln!("skipping: {} is absent", dir.display());
            return;
        }
        let ds = load_dataset_from_roots("fashion-mnist", &[dir.to_path_buf()]).unwrap();
        assert_eq!(ds.train.len(), 60000);
        assert_eq!(ds.test.len(), 10000);
        assert_eq!(ds.train.shape, [1, 28, 28]);
        assert!((ds.mean[0] - 0.2860).abs() < 1e-3, "{:?}", ds.mean);
        assert!((ds.std[0] - 0.3530).abs() < 1e-3, "{:?}", ds.std);
        // The embedded subset is the first 300 (100) images per class, in file order.
        let mini = mini::load_fmnist_mini().unwrap();
        for (full, sub, per) in [(&ds.train, &mini.train, 300), (&ds.test, &mini.test, 100)] {
            let mut counts = [0usize; 10];
            let picked: Vec<usize> = (0..full.len())
                .filter(|&i| {
                    let c = &mut counts[full.labels[i] as usize];
                    *c += 1;
                    *c <= per
                })
                .collect();
            assert_eq!(&full.select(&picked), sub);
        }
    }
}
