//! Seeded training-time data augmentation: the CIFAR protocol of Mammoth's `seq-cifar10` (Buzzega
//! et al., NeurIPS 2020): `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, then
//! `Normalize(mean, std)`.
//!
//! Replay memories store sample references, i.e. the *non-augmented* inputs, and every training
//! gather — the incoming batch and every batch drawn from a memory — augments afresh, as Mammoth
//! does (augmentation at draw time). Evaluation is never augmented; the normalisation applies to
//! evaluation too.
//!
//! Random draws come from their own stream ([`Stream::Augment`]) derived from the experiment seed,
//! so turning augmentation on shifts no other draw (data order, buffer, initialisation). Per sample
//! and in this order: the crop's row offset, its column offset (each uniform in `0..=2·padding`),
//! then the flip (`u < p` with `u` uniform in [0, 1)); a disabled operation draws nothing.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::{RngState, SeededRng, Stream};

/// `augmentation:` in the experiment config. Everything is off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentationConfig {
    /// Zero-pad every side by `padding` pixels, then crop back to the input size at a uniformly
    /// drawn offset (torchvision `RandomCrop(size, padding)`; the padding is pixel value 0, before
    /// normalisation). Training only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_crop: Option<RandomCrop>,
    /// Probability of mirroring a sample left–right (torchvision `RandomHorizontalFlip(p)`);
    /// 0 = off. Training only.
    #[serde(skip_serializing_if = "is_zero")]
    pub horizontal_flip: f32,
    /// Per-channel `(x − mean) / std` on pixels scaled to [0, 1], at training *and* evaluation
    /// (torchvision `Normalize`). Replaces `benchmark.normalize`'s statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RandomCrop {
    pub padding: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

fn is_zero(p: &f32) -> bool {
    *p == 0.0
}

impl Default for AugmentationConfig {
    fn default() -> Self {
        Self {
            random_crop: None,
            horizontal_flip: 0.0,
            normalize: None,
        }
    }
}

impl AugmentationConfig {
    /// Nothing configured: inputs are exactly those of a config without the section.
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }

    /// Whether any random operation (crop, flip) is on.
    pub fn is_random(&self) -> bool {
        self.random_crop.is_some() || self.horizontal_flip > 0.0
    }

    /// Check the values; with the input shape `[C, H, W]` also check them against it. Errors are
    /// `(key under augmentation., message)`.
    pub fn check(&self, shape: Option<[usize; 3]>) -> std::result::Result<(), (String, String)> {
        let err = |k: &str, m: String| Err((format!("augmentation.{k}"), m));
        if let Some(RandomCrop { padding }) = self.random_crop {
            if padding == 0 {
                return err(
                    "random_crop.padding",
                    "must be at least 1 (leave random_crop out for no crop)".into(),
                );
            }
            if let Some([_, h, w]) = shape {
                if padding > h.min(w) {
                    return err(
                        "random_crop.padding",
                        format!("{padding} is larger than the {h}×{w} image"),
                    );
                }
            }
        }
        let p = self.horizontal_flip;
        if !(0.0..=1.0).contains(&p) {
            return err(
                "horizontal_flip",
                format!("is a probability and must be in [0, 1], found {p}"),
            );
        }
        if let Some(n) = &self.normalize {
            if n.mean.len() != n.std.len() {
                return err(
                    "normalize",
                    format!(
                        "mean has {} values and std {}; give one of each per channel",
                        n.mean.len(),
                        n.std.len()
                    ),
                );
            }
            if let Some(&m) = n.mean.iter().find(|m| !m.is_finite()) {
                return err("normalize.mean", format!("must be finite, found {m}"));
            }
            if let Some(&s) = n.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return err(
                    "normalize.std",
                    format!("every value must be > 0, found {s}"),
                );
            }
            if let Some([c, _, _]) = shape {
                if n.mean.len() != c {
                    return err(
                        "normalize.mean",
                        format!(
                            "has {} values for {c}-channel inputs; give one mean and one std per channel",
                            n.mean.len()
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

/// The random part of the augmentation (crop, flip) with its seeded stream. The stream sits behind
/// a mutex because batches are gathered through a shared `&TaskStream`; its position is saved in
/// checkpoints ([`Augmenter::state`]).
#[derive(Debug)]
pub struct Augmenter {
    padding: usize,
    flip: f32,
    rng: Mutex<SeededRng>,
}

/// A clone continues from the same position on a generator of its own (a cloned stream draws
/// independently of the original; only the trainer's stream is checkpointed).
impl Clone for Augmenter {
    fn clone(&self) -> Self {
        Self {
            padding: self.padding,
            flip: self.flip,
            rng: Mutex::new(SeededRng::from(self.state())),
        }
    }
}

impl Augmenter {
    /// `None` when `cfg` draws nothing (no crop, no flip).
    pub fn new(cfg: &AugmentationConfig, seed: u64) -> Option<Self> {
        cfg.is_random().then(|| Self {
            padding: cfg.random_crop.map_or(0, |c| c.padding),
            flip: cfg.horizontal_flip,
            rng: Mutex::new(SeededRng::new(seed, Stream::Augment)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeededRng> {
        // A panic while holding the lock leaves the generator valid: recover it.
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream's position.
    pub fn state(&self) -> RngState {
        self.lock().state()
    }

    pub fn set_state(&self, s: RngState) {
        *self.lock() = SeededRng::from(s);
    }

    /// Augment `rows` (consecutive `C × H × W` samples, already normalised) in place. `fill[c]` is
    /// the value of a zero pixel of channel `c` after normalisation; `scratch` is reused storage.
    pub fn apply(&self, rows: &mut [f32], shape: [usize; 3], fill: &[f32], scratch: &mut Vec<f32>) {
        let [c, h, w] = shape;
        let d = c * h * w;
        if d == 0 {
            return;
        }
        let mut rng = self.lock();
        for row in rows.chunks_exact_mut(d) {
            let (dy, dx) = if self.padding > 0 {
                let span = 2 * self.padding as u64 + 1;
                let p = self.padding as isize;
                let dy = rng.below(span) as isize - p;
                let dx = rng.below(span) as isize - p;
                (dy, dx)
            } else {
                (0, 0)
            };
            let flip = self.flip > 0.0 && rng.uniform_f32() < self.flip;
            if dy == 0 && dx == 0 && !flip {
                continue;
            }
            transform(row, [c, h, w], dy, dx, flip, fill, scratch);
        }
    }
}

/// `out[i][j] = in[i + dy][j' + dx]` with `j' = w − 1 − j` when flipped, and `fill` outside the
/// image: a crop of the zero-padded image at offset `(dy + p, dx + p)`, then a mirror.
fn transform(
    row: &mut [f32],
    [c, h, w]: [usize; 3],
    dy: isize,
    dx: isize,
    flip: bool,
    fill: &[f32],
    scratch: &mut Vec<f32>,
) {
    scratch.clear();
    scratch.extend_from_slice(row);
    let (h, w) = (h as isize, w as isize);
    for (ch, &f) in fill.iter().enumerate().take(c) {
        let plane = (ch as isize * h * w) as usize;
        for i in 0..h {
            let si = i + dy;
            let out = &mut row[plane + (i * w) as usize..plane + ((i + 1) * w) as usize];
            if !(0..h).contains(&si) {
                out.fill(f);
                continue;
            }
            let src = &scratch[plane + (si * w) as usize..plane + ((si + 1) * w) as usize];
            // Output columns whose source column lies inside the image: j + dx ∈ [0, w) without a
            // flip, w − 1 − j + dx ∈ [0, w) with one.
            let (lo, hi) = if flip {
                (dx.max(0), (w + dx).min(w))
            } else {
                ((-dx).max(0), (w - dx).min(w))
            };
            let lo = lo.min(w);
            let (lo, hi) = (lo as usize, hi.max(lo) as usize);
            out[..lo].fill(f);
            out[hi..].fill(f);
            if hi == lo {
                continue;
            }
            if flip {
                let (a, b) = ((w + dx) as usize - hi, (w + dx) as usize - lo);
                for (o, &v) in out[lo..hi].iter_mut().zip(src[a..b].iter().rev()) {
                    *o = v;
                }
            } else {
                let a = (lo as isize + dx) as usize;
                out[lo..hi].copy_from_slice(&src[a..a + (hi - lo)]);
            }
        }
    }
}

/// Check `cfg` against the input shape of a built stream, as a config error naming the key.
pub fn check_against(cfg: &AugmentationConfig, shape: [usize; 3]) -> Result<()> {
    cfg.check(Some(shape))
        .map_err(|(path, message)| Error::Config {
            file: String::new(),
            path,
            message,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aug(padding: usize, flip: f32, seed: u64) -> Augmenter {
        let cfg = AugmentationConfig {
            random_crop: (padding > 0).then_some(RandomCrop { padding }),
            horizontal_flip: flip,
            normalize: None,
        };
        Augmenter::new(&cfg, seed).unwrap()
    }

    /// 1×h×w image with pixel (i, j) = 1 + i·w + j (never 0, so the fill is recognisable).
    fn ramp(h: usize, w: usize) -> Vec<f32> {
        (0..h * w).map(|k| 1.0 + k as f32).collect()
    }

    #[test]
    fn transform_crops_with_fill_and_mirrors() {
        let mut s = Vec::new();
        // Shift down-right by one (dy = dx = −1): first row and column are padding.
        let mut x = ramp(3, 3);
        transform(&mut x, [1, 3, 3], -1, -1, false, &[0.0], &mut s);
        assert_eq!(x, vec![0., 0., 0., 0., 1., 2., 0., 4., 5.]);
        // A pure flip mirrors every row.
        let mut x = ramp(2, 3);
        transform(&mut x, [1, 2, 3], 0, 0, true, &[-9.0], &mut s);
        assert_eq!(x, vec![3., 2., 1., 6., 5., 4.]);
        // Crop then flip: crop at dx = +1 gives rows [2 3 f], mirrored [f 3 2].
        let mut x = ramp(2, 3);
        transform(&mut x, [1, 2, 3], 0, 1, true, &[-9.0], &mut s);
        assert_eq!(x, vec![-9., 3., 2., -9., 6., 5.]);
    }

    #[test]
    fn transform_matches_the_definition_for_every_offset() {
        let (c, h, w) = (2, 5, 4);
        let img: Vec<f32> = (0..c * h * w).map(|k| 1.0 + k as f32).collect();
        let fill = [-1.0, -2.0];
        let mut s = Vec::new();
        for dy in -5..=5isize {
            for dx in -5..=5isize {
                for flip in [false, true] {
                    let mut x = img.clone();
                    transform(&mut x, [c, h, w], dy, dx, flip, &fill, &mut s);
                    for ch in 0..c {
                        for i in 0..h as isize {
                            for j in 0..w as isize {
                                let (si, sj) =
                                    (i + dy, if flip { w as isize - 1 - j } else { j } + dx);
                                let inside =
                                    (0..h as isize).contains(&si) && (0..w as isize).contains(&sj);
                                let want = if inside {
                                    img[ch * h * w + (si * w as isize + sj) as usize]
                                } else {
                                    fill[ch]
                                };
                                let k = ch * h * w + (i * w as isize + j) as usize;
                                assert_eq!(
                                    x[k], want,
                                    "dy {dy} dx {dx} flip {flip} at {ch},{i},{j}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn crop_offsets_are_uniform_over_the_padded_positions() {
        // A single bright pixel in the middle of an 9×9 image; where it lands gives the offset.
        let p = 2;
        let a = aug(p, 0.0, 3);
        let (h, w) = (9, 9);
        let mut counts = vec![0u32; (2 * p + 1) * (2 * p + 1)];
        let mut s = Vec::new();
        let n = 25_000;
        for _ in 0..n {
            let mut x = vec![0.0f32; h * w];
            x[4 * w + 4] = 1.0;
            a.apply(&mut x, [1, h, w], &[0.0], &mut s);
            let k = x.iter().position(|&v| v == 1.0).unwrap();
            assert_eq!(x.iter().filter(|&&v| v != 0.0).count(), 1);
            // The pixel moves to (4 − dy, 4 − dx), dy, dx ∈ −p..=p.
            let (i, j) = (k / w, k % w);
            let (oy, ox) = (4 + p - i, 4 + p - j);
            counts[oy * (2 * p + 1) + ox] += 1;
        }
        let expect = n as f64 / counts.len() as f64;
        for c in &counts {
            assert!((*c as f64 - expect).abs() < 0.1 * expect, "{counts:?}");
        }
    }

    #[test]
    fn padding_fill_is_the_normalised_zero_and_covers_exactly_the_shift() {
        let a = aug(4, 0.0, 1);
        let (h, w) = (8, 8);
        let mut s = Vec::new();
        let mut seen_full_shift = false;
        for _ in 0..500 {
            let mut x = vec![5.0f32; 2 * h * w];
            a.apply(&mut x, [2, h, w], &[-1.0, -2.0], &mut s);
            for (ch, f) in [-1.0f32, -2.0].into_iter().enumerate() {
                let plane = &x[ch * h * w..(ch + 1) * h * w];
                assert!(plane.iter().all(|&v| v == 5.0 || v == f));
                // Filled pixels form full rows and columns: count = rows·w + cols·h − rows·cols.
                let rows = (0..h)
                    .filter(|&i| plane[i * w..(i + 1) * w].iter().all(|&v| v == f))
                    .count();
                let cols = (0..w)
                    .filter(|&j| (0..h).all(|i| plane[i * w + j] == f))
                    .count();
                let filled = plane.iter().filter(|&&v| v == f).count();
                assert_eq!(filled, rows * w + cols * h - rows * cols);
                assert!(rows <= 4 && cols <= 4);
                seen_full_shift |= rows == 4 && cols == 4;
            }
        }
        assert!(seen_full_shift, "the largest offset never occurred");
    }

    #[test]
    fn flips_with_probability_p_and_really_mirror() {
        for p in [0.5f32, 0.2] {
            let a = aug(0, p, 9);
            let mut s = Vec::new();
            let n = 20_000;
            let mut flipped = 0;
            for _ in 0..n {
                let mut x = ramp(2, 4);
                a.apply(&mut x, [1, 2, 4], &[0.0], &mut s);
                if x == ramp(2, 4) {
                    continue;
                }
                assert_eq!(x, vec![4., 3., 2., 1., 8., 7., 6., 5.]);
                flipped += 1;
            }
            let rate = flipped as f64 / n as f64;
            assert!((rate - p as f64).abs() < 0.015, "p {p}: rate {rate}");
        }
        // p = 1 always flips, p = 0 never builds an augmenter.
        let a = aug(0, 1.0, 0);
        let mut x = ramp(1, 3);
        a.apply(&mut x, [1, 1, 3], &[0.0], &mut Vec::new());
        assert_eq!(x, vec![3., 2., 1.]);
        assert!(Augmenter::new(&AugmentationConfig::default(), 0).is_none());
    }

    #[test]
    fn deterministic_per_seed_and_different_across_seeds_and_resumable() {
        let run = |a: &Augmenter| {
            let mut x: Vec<f32> = (0..10).flat_map(|_| ramp(6, 6)).collect();
            a.apply(&mut x, [1, 6, 6], &[0.0], &mut Vec::new());
            x
        };
        let (a, b, c) = (aug(2, 0.5, 7), aug(2, 0.5, 7), aug(2, 0.5, 8));
        let first = run(&a);
        assert_eq!(first, run(&b));
        assert_ne!(first, run(&c));
        // Restoring a saved position continues the same sequence.
        let saved = a.state();
        let next = run(&a);
        let d = aug(2, 0.5, 7);
        d.set_state(saved);
        assert_eq!(run(&d), next);
        assert_eq!(run(&a.clone()), run(&a));
    }

    #[test]
    fn check_names_the_key() {
        let key = |c: AugmentationConfig, shape| c.check(shape).unwrap_err().0;
        let crop = |padding| AugmentationConfig {
            random_crop: Some(RandomCrop { padding }),
            ..Default::default()
        };
        assert_eq!(
            key(crop(33), Some([3, 32, 32])),
            "augmentation.random_crop.padding"
        );
        assert!(crop(32).check(Some([3, 32, 32])).is_ok());
        let flip = AugmentationConfig {
            horizontal_flip: 1.5,
            ..Default::default()
        };
        assert_eq!(key(flip, None), "augmentation.horizontal_flip");
        let norm = |mean: Vec<f32>, std: Vec<f32>| AugmentationConfig {
            normalize: Some(Normalize { mean, std }),
            ..Default::default()
        };
        assert_eq!(
            key(norm(vec![0.5; 3], vec![0.2, 0.0, 0.2]), None),
            "augmentation.normalize.std"
        );
        assert_eq!(
            key(norm(vec![0.5; 3], vec![0.2; 2]), None),
            "augmentation.normalize"
        );
        assert_eq!(
            key(norm(vec![0.5; 3], vec![0.2; 3]), Some([1, 28, 28])),
            "augmentation.normalize.mean"
        );
    }
}
