//! CPU kernels for the convolutional backbones, as candle custom ops.
//!
//! candle 0.11.1 trains convolutions slowly on the CPU (docs/PERFORMANCE.md, candle-notes §5): the
//! input gradient of `conv2d` is a direct `conv_transpose2d` loop rather than a matrix product,
//! the data input of the first layer gets a gradient nobody reads, and bias, ReLU, pooling and
//! batch normalisation each cost several full-size passes and allocations in backward. These ops
//! do each layer's forward and backward in one or two passes around `gemm` (the matrix-multiply
//! crate candle itself uses), and skip the gradient of any input that autograd does not track.
//!
//! Every op here implements only `cpu_fwd`; the wrappers route other devices (and other dtypes) to
//! candle's own ops, so a CUDA kernel can later be added as the op's `cuda_fwd` without touching
//! the layers. Reductions run in a fixed order (over samples in fixed chunks whose number is the
//! thread count), so the same inputs give bit-identical outputs on one machine and thread count.

mod conv;
mod norm;
mod pool;

pub use conv::conv2d;
pub use norm::{batch_norm_train, BatchStats};
pub use pool::{add_relu, global_avg_pool, max_pool2x2_relu};

use candle_core::{CpuStorage, DType, Layout, Tensor};

/// Whether `t` can go through these kernels (CPU, f32); everything else uses candle's ops.
pub(crate) fn supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous f32 slice behind a storage and layout.
fn slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: operands must be contiguous");
    };
    Ok(&v[a..b])
}

/// Threads the kernels may use: candle's setting (`RAYON_NUM_THREADS`, else the core count).
fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// Split `n` items into at most `parts` contiguous, near-equal ranges (fixed for given `n`, `parts`).
fn chunks(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts)
        .map(|i| (i * n / parts)..((i + 1) * n / parts))
        .collect()
}

/// Run `f(range)` for each range of `chunks(n, threads)`, in parallel when there is more than
/// one, and return the results in range order.
fn par_map<R: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    let ranges = chunks(n, threads);
    if ranges.len() == 1 {
        return ranges.into_iter().map(f).collect();
    }
    use rayon::prelude::*;
    ranges.into_par_iter().map(&f).collect()
}

/// Run `f(sample range, that range's output)` over disjoint per-sample slices of `out`, one chunk
/// per thread.
fn for_sample_chunks(
    out: &mut [f32],
    per_sample: usize,
    n: usize,
    parts: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    let ranges = chunks(n, parts);
    let mut rest = out;
    let mut jobs = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (head, tail) = rest.split_at_mut(r.len() * per_sample);
        jobs.push((r, head));
        rest = tail;
    }
    if jobs.len() == 1 {
        let (r, o) = jobs.pop().expect("one job");
        f(r, o);
    } else {
        use rayon::prelude::*;
        jobs.into_par_iter().for_each(|(r, o)| f(r, o));
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on a per-thread scratch buffer of `len` floats (contents unspecified), kept between calls:
/// a fresh patch matrix per call would fault in new pages every step once the allocator has
/// returned the last one to the OS. A nested call gets a fresh buffer.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// `dst[rows × cols] (+)= a[rows × k] · b[k × cols]` with explicit (row, column) strides, no
/// threads of its own. `accumulate` adds to `dst` instead of overwriting it.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    accumulate: bool,
    parallel: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n);
    assert!(k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let parallelism = if parallel > 1 {
        gemm::Parallelism::Rayon(parallel)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every element gemm reads or writes inside the slices;
    // `dst` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor, Var};

    use crate::rng::{SeededRng, Stream};

    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = SeededRng::new(seed, Stream::Init);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn var(shape: &[usize], seed: u64) -> Var {
        Var::from_tensor(&randn(shape, seed)).unwrap()
    }

    pub fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Largest |a − b| relative to max(1, largest |b|).
    pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (flat(a), flat(b));
        let scale = b.iter().fold(1f32, |m, x| m.max(x.abs()));
        a.iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// Central finite difference of `f` (a scalar function of one input) at a few coordinates,
    /// checked against `grad`, in f64 arithmetic on the f32 values.
    pub fn check_fd(x: &Tensor, grad: &Tensor, f: impl Fn(&Tensor) -> f64, coords: &[usize]) {
        let base = flat(x);
        let g = flat(grad);
        let h = 1e-2f32;
        for &i in coords {
            let i = i % base.len();
            let at = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                f(&Tensor::from_vec(v, x.shape(), x.device()).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h as f64);
            let tol = 2e-2 * (1.0 + fd.abs());
            assert!(
                (fd - g[i] as f64).abs() < tol,
                "coordinate {i}: finite difference {fd}, gradient {}",
                g[i]
            );
        }
    }
}
