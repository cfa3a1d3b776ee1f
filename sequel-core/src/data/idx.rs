//! Reader for the IDX format of MNIST and Fashion-MNIST, raw or gzipped.
//!
//! An IDX file is a big-endian header followed by the data:
//! images: magic `0x00000803`, count, rows, cols, then `count × rows × cols` bytes;
//! labels: magic `0x00000801`, count, then `count` bytes.
//! Gzip is detected by its magic bytes (`1f 8b`), never by the file name.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::data::{Dataset, ImageSet};
use crate::error::{Error, Result};

/// Magic number of an IDX file of unsigned-byte images (3 dimensions).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned-byte labels (1 dimension).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The four standard file names of an IDX dataset, without `.gz`:
/// train images, train labels, test images, test labels.
pub const IDX_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

fn format_err(path: &Path, message: impl Into<String>) -> Error {
    Error::DataFormat {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Returns the bytes, decompressed when they start with the gzip magic. The flag tells whether
/// they were decompressed.
fn maybe_gunzip<'a>(bytes: &'a [u8], origin: &Path) -> Result<(Cow<'a, [u8]>, bool)> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok((Cow::Borrowed(bytes), false));
    }
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4));
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| format_err(origin, format!("invalid gzip data: {e}")))?;
    Ok((Cow::Owned(out), true))
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn kind_of_magic(magic: u32) -> &'static str {
    match magic {
        IDX_IMAGES_MAGIC => " (that of an IDX image file)",
        IDX_LABELS_MAGIC => " (that of an IDX label file)",
        m if m >> 16 == 0x1f8b => " (a gzip header that is not at the start?)",
        _ => "",
    }
}

/// Checks the header (length, magic) and that the total length is exactly header + payload.
/// Returns the `ndims` dimensions that follow the magic.
fn check_layout(
    bytes: &[u8],
    origin: &Path,
    gz: bool,
    magic: u32,
    ndims: usize,
) -> Result<Vec<usize>> {
    let header = 4 + 4 * ndims;
    let decompressed = if gz { " after gzip decompression" } else { "" };
    let truncated = |need: usize| {
        format_err(
            origin,
            format!(
                "truncated IDX header: expected at least {need} bytes, found {}{decompressed}",
                bytes.len()
            ),
        )
    };
    if bytes.len() < 4 {
        return Err(truncated(header));
    }
    let found_magic = be_u32(bytes, 0);
    if found_magic != magic {
        return Err(format_err(
            origin,
            format!(
                "bad IDX magic number: expected {magic:#010x}, found {found_magic:#010x}{}",
                kind_of_magic(found_magic)
            ),
        ));
    }
    if bytes.len() < header {
        return Err(truncated(header));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|d| be_u32(bytes, 4 + 4 * d) as usize)
        .collect();
    let payload = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|p| p.checked_add(header))
        .ok_or_else(|| format_err(origin, format!("IDX dimensions {dims:?} are too large")))?;
    if bytes.len() != payload {
        let what = if bytes.len() < payload {
            "truncated file"
        } else {
            "trailing data after the last item"
        };
        return Err(format_err(
            origin,
            format!(
                "{what}: expected {payload} bytes, found {}{decompressed} (header dimensions {dims:?})",
                bytes.len()
            ),
        ));
    }
    Ok(dims)
}

/// Parses an IDX image file held in memory (raw or gzipped). `origin` names it in errors.
/// Returns the pixels (`n × rows × cols` bytes), `n`, `rows` and `cols`.
pub fn parse_idx_images(bytes: &[u8], origin: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let (bytes, gz) = maybe_gunzip(bytes, origin)?;
    let dims = check_layout(&bytes, origin, gz, IDX_IMAGES_MAGIC, 3)?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(format_err(
            origin,
            format!("image size {rows}×{cols} in the IDX header is empty"),
        ));
    }
    let pixels = match bytes {
        Cow::Owned(mut v) => {
            v.drain(..16);
            v
        }
        Cow::Borrowed(b) => b[16..].to_vec(),
    };
    Ok((pixels, n, rows, cols))
}

/// Parses an IDX label file held in memory (raw or gzipped). Every label must be
/// `< num_classes`. `origin` names it in errors.
pub fn parse_idx_labels(bytes: &[u8], origin: &Path, num_classes: usize) -> Result<Vec<u16>> {
    let (bytes, gz) = maybe_gunzip(bytes, origin)?;
    check_layout(&bytes, origin, gz, IDX_LABELS_MAGIC, 1)?;
    let labels = &bytes[8..];
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= num_classes)
    {
        return Err(format_err(
            origin,
            format!("label {l} of item {i} is out of range: the dataset has {num_classes} classes"),
        ));
    }
    Ok(labels.iter().map(|&l| l as u16).collect())
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Reads an IDX image file, raw or gzipped. Returns the pixels, `n`, `rows` and `cols`.
pub fn read_idx_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    parse_idx_images(&read_file(path)?, path)
}

/// Reads an IDX label file, raw or gzipped; every label must be `< num_classes`.
pub fn read_idx_labels(path: &Path, num_classes: usize) -> Result<Vec<u16>> {
    parse_idx_labels(&read_file(path)?, path, num_classes)
}

/// Builds a raw IDX image file from `n × rows × cols` pixel bytes.
///
/// # Panics
/// If `images.len() != n * rows * cols` or a dimension does not fit in `u32`.
pub fn encode_idx_images(images: &[u8], n: usize, rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(
        images.len(),
        n * rows * cols,
        "pixel count must be n × rows × cols"
    );
    let dim = |d: usize| u32::try_from(d).expect("IDX dimension exceeds u32");
    let mut out = Vec::with_capacity(16 + images.len());
    out.extend_from_slice(&IDX_IMAGES_MAGIC.to_be_bytes());
    for d in [n, rows, cols] {
        out.extend_from_slice(&dim(d).to_be_bytes());
    }
    out.extend_from_slice(images);
    out
}

/// Builds a raw IDX label file.
///
/// # Panics
/// If there are more than `u32::MAX` labels.
pub fn encode_idx_labels(labels: &[u8]) -> Vec<u8> {
    let n = u32::try_from(labels.len()).expect("IDX dimension exceeds u32");
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&IDX_LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(labels);
    out
}

/// The path of IDX file `name` in `dir`: `name` if it exists, else `name.gz` if it exists.
pub fn idx_file_in(dir: &Path, name: &str) -> Option<PathBuf> {
    [name.to_string(), format!("{name}.gz")]
        .into_iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// Builds one split from an images and a labels file, held in memory (raw or gzipped).
pub fn parse_idx_split(
    images: (&[u8], &Path),
    labels: (&[u8], &Path),
    num_classes: usize,
) -> Result<ImageSet> {
    let (pixels, n, rows, cols) = parse_idx_images(images.0, images.1)?;
    let labels_v = parse_idx_labels(labels.0, labels.1, num_classes)?;
    if labels_v.len() != n {
        return Err(format_err(
            labels.1,
            format!(
                "{} labels but {} has {n} images",
                labels_v.len(),
                images.1.display()
            ),
        ));
    }
    if n == 0 {
        return Err(format_err(images.1, "the file holds no images"));
    }
    Ok(ImageSet {
        images: pixels,
        labels: labels_v,
        shape: [1, rows, cols],
    })
}

/// Loads an IDX dataset (the four standard files, each raw or `.gz`) from exactly `dir`.
pub fn load_idx_dir(name: &str, dir: &Path, num_classes: usize) -> Result<Dataset> {
    let mut paths = Vec::with_capacity(4);
    for file in IDX_FILES {
        let path = idx_file_in(dir, file).ok_or_else(|| Error::DatasetNotFound {
            dataset: name.to_string(),
            expected: format!("{file} or {file}.gz"),
            searched: dir.display().to_string(),
            hint: "put the four IDX files in that folder".to_string(),
        })?;
        paths.push(path);
    }
    let split = |img: &Path, lbl: &Path| -> Result<ImageSet> {
        parse_idx_split(
            (&read_file(img)?, img),
            (&read_file(lbl)?, lbl),
            num_classes,
        )
    };
    let train = split(&paths[0], &paths[1])?;
    let test = split(&paths[2], &paths[3])?;
    crate::data::discovery::assemble(name, train, test, num_classes, &paths[2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn pixels(n: usize) -> Vec<u8> {
        (0..n * 6).map(|i| (i * 7 % 256) as u8).collect()
    }

    #[test]
    fn raw_and_gzip_parse_identically() {
        let raw = encode_idx_images(&pixels(5), 5, 2, 3);
        let p = Path::new("x");
        let a = parse_idx_images(&raw, p).unwrap();
        let b = parse_idx_images(&gzip(&raw), p).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, (pixels(5), 5, 2, 3));
        let lraw = encode_idx_labels(&[0, 1, 2, 9]);
        assert_eq!(parse_idx_labels(&lraw, p, 10).unwrap(), vec![0, 1, 2, 9]);
        assert_eq!(
            parse_idx_labels(&gzip(&lraw), p, 10).unwrap(),
            vec![0, 1, 2, 9]
        );
    }

    #[test]
    fn truncated_and_trailing_are_errors() {
        let raw = encode_idx_images(&pixels(5), 5, 2, 3); // 16 + 30 bytes
        let p = Path::new("/some/imgs");
        let e = parse_idx_images(&raw[..40], p).unwrap_err().to_string();
        assert!(
            e.contains("/some/imgs") && e.contains("expected 46 bytes, found 40"),
            "{e}"
        );
        let mut long = raw.clone();
        long.push(0);
        let e = parse_idx_images(&long, p).unwrap_err().to_string();
        assert!(e.contains("trailing") && e.contains("found 47"), "{e}");
        let e = parse_idx_images(&gzip(&raw[..40]), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("after gzip decompression"), "{e}");
        let e = parse_idx_images(&raw[..10], p).unwrap_err().to_string();
        assert!(e.contains("header"), "{e}");
        // A cut gzip stream is reported, not a panic.
        let gz = gzip(&raw);
        assert!(parse_idx_images(&gz[..gz.len() / 2], p).is_err());
    }

    #[test]
    fn wrong_magic_and_bad_labels() {
        let p = Path::new("f");
        let labels = encode_idx_labels(&[1, 2]);
        let e = parse_idx_images(&labels, p).unwrap_err().to_string();
        assert!(e.contains("magic") && e.contains("label file"), "{e}");
        let imgs = encode_idx_images(&pixels(1), 1, 2, 3);
        assert!(parse_idx_labels(&imgs, p, 10).is_err());
        let e = parse_idx_labels(&encode_idx_labels(&[1, 10]), p, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("label 10 of item 1"), "{e}");
        assert!(parse_idx_images(&encode_idx_images(&[], 3, 0, 5), p).is_err());
    }

    #[test]
    fn huge_header_dimensions_do_not_allocate_or_overflow() {
        let mut raw = encode_idx_images(&pixels(1), 1, 2, 3);
        raw[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        raw[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        raw[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_idx_images(&raw, Path::new("f")).is_err());
    }
}
