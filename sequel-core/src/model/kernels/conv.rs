//! 2-D convolution (any kernel size, stride, zero padding; no dilation or groups) as im2col +
//! `gemm`, sample by sample, with the bias fused into the product's initial value.
//!
//! Per sample `n`, with `cols_n` the `(C·kh·kw) × (Ho·Wo)` patch matrix of `x_n`:
//! `y_n = W · cols_n (+ b)`, `dcols_n = Wᵀ · dy_n` scattered back onto `dx_n` (col2im), and
//! `dW = Σ_n dy_n · cols_nᵀ`. A 1×1, stride-1, unpadded convolution uses `x_n` itself as `cols_n`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::{for_sample_chunks, matmul, par_map, slice, supported, threads, with_scratch};
use crate::error::Result;

/// Shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
}

impl Geo {
    fn new(x: &[usize], w: &[usize], s: usize, p: usize) -> candle_core::Result<Self> {
        let (&[n, c, h, wd], &[co, ci, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected x N×C×H×W and W Co×C×kh×kw, got {x:?} and {w:?}");
        };
        if ci != c || s == 0 || h + 2 * p < kh || wd + 2 * p < kw {
            candle_core::bail!("conv2d: x {x:?}, W {w:?}, stride {s}, padding {p} do not fit");
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            co,
            kh,
            kw,
            s,
            p,
            ho: (h + 2 * p - kh) / s + 1,
            wo: (wd + 2 * p - kw) / s + 1,
        })
    }

    fn hw_out(&self) -> usize {
        self.ho * self.wo
    }

    fn hw_in(&self) -> usize {
        self.h * self.w
    }

    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }

    /// Sample chunks (one per thread) and the threads each `gemm` may use inside a chunk: with
    /// fewer samples than threads, the product itself is split instead.
    fn plan(&self) -> (usize, usize) {
        let t = threads();
        if self.n >= t {
            (t, 1)
        } else {
            (1, t)
        }
    }
}

/// Output positions `o < out` whose input index `o·s + off − p` lies in `0..len`: a range.
fn valid(p: usize, off: usize, s: usize, len: usize, out: usize) -> (usize, usize) {
    let lo = if off >= p { 0 } else { (p - off).div_ceil(s) };
    let hi = if len + p > off {
        (len + p - off).div_ceil(s)
    } else {
        0
    };
    let hi = hi.min(out);
    (lo.min(hi), hi)
}

/// Patch matrix of one sample: `cols[(c, i, j), (oy, ox)] = x[c, oy·s + i − p, ox·s + j − p]`,
/// zero outside the image.
fn im2col(g: &Geo, x: &[f32], cols: &mut [f32]) {
    let hw = g.hw_out();
    for c in 0..g.c {
        let xc = &x[c * g.hw_in()..(c + 1) * g.hw_in()];
        for i in 0..g.kh {
            let (ylo, yhi) = valid(g.p, i, g.s, g.h, g.ho);
            for j in 0..g.kw {
                let (xlo, xhi) = valid(g.p, j, g.s, g.w, g.wo);
                let row = &mut cols[((c * g.kh + i) * g.kw + j) * hw..][..hw];
                row[..ylo * g.wo].fill(0.0);
                row[yhi * g.wo..].fill(0.0);
                for oy in ylo..yhi {
                    let src = &xc[(oy * g.s + i - g.p) * g.w..][..g.w];
                    let r = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    r[..xlo].fill(0.0);
                    r[xhi..].fill(0.0);
                    if g.s == 1 {
                        let ix = xlo + j - g.p;
                        r[xlo..xhi].copy_from_slice(&src[ix..ix + (xhi - xlo)]);
                    } else {
                        for (ox, v) in r.iter_mut().enumerate().take(xhi).skip(xlo) {
                            *v = src[ox * g.s + j - g.p];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: `dx[c, iy, ix] += Σ dcols` over the patches that read it. `dx` must
/// start zeroed.
fn col2im(g: &Geo, cols: &[f32], dx: &mut [f32]) {
    let hw = g.hw_out();
    for c in 0..g.c {
        let dxc = &mut dx[c * g.hw_in()..(c + 1) * g.hw_in()];
        for i in 0..g.kh {
            let (ylo, yhi) = valid(g.p, i, g.s, g.h, g.ho);
            for j in 0..g.kw {
                let (xlo, xhi) = valid(g.p, j, g.s, g.w, g.wo);
                let row = &cols[((c * g.kh + i) * g.kw + j) * hw..][..hw];
                for oy in ylo..yhi {
                    let dst = &mut dxc[(oy * g.s + i - g.p) * g.w..][..g.w];
                    let r = &row[oy * g.wo..(oy + 1) * g.wo];
                    if g.s == 1 {
                        let ix = xlo + j - g.p;
                        for (d, v) in dst[ix..ix + (xhi - xlo)].iter_mut().zip(&r[xlo..xhi]) {
                            *d += v;
                        }
                    } else {
                        for (ox, v) in r.iter().enumerate().take(xhi).skip(xlo) {
                            dst[ox * g.s + j - g.p] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Forward: `(x, W[, b]) → y`.
#[derive(Debug, Clone, Copy)]
struct Conv2dOp {
    stride: usize,
    padding: usize,
}

impl Conv2dOp {
    fn fwd(
        &self,
        (x, xl): (&[f32], &Layout),
        (w, wl): (&[f32], &Layout),
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geo::new(xl.dims(), wl.dims(), self.stride, self.padding)?;
        if bias.is_some_and(|b| b.len() != g.co) {
            candle_core::bail!("conv2d: bias must have {} entries", g.co);
        }
        let (hw, ckk) = (g.hw_out(), g.ckk());
        let mut y = vec![0f32; g.n * g.co * hw];
        let (parts, inner) = g.plan();
        for_sample_chunks(&mut y, g.co * hw, g.n, parts, |range, out| {
            with_scratch(if g.pointwise() { 0 } else { ckk * hw }, |cols| {
                for (k, yn) in range.zip(out.chunks_exact_mut(g.co * hw)) {
                    let xn = &x[k * g.c * g.hw_in()..(k + 1) * g.c * g.hw_in()];
                    let src = if g.pointwise() {
                        xn
                    } else {
                        im2col(&g, xn, cols);
                        &*cols
                    };
                    if let Some(b) = bias {
                        for (row, &bv) in yn.chunks_exact_mut(hw).zip(b) {
                            row.fill(bv);
                        }
                    }
                    matmul(
                        (g.co, hw, ckk),
                        yn,
                        (w, ckk, 1),
                        (src, hw, 1),
                        bias.is_some(),
                        inner,
                    );
                }
            })
        });
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.co, g.ho, g.wo))))
    }

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 2]> {
        let dy = dy.contiguous()?;
        // The data input of the first layer is not tracked: its gradient is never computed.
        let dx = if x.track_op() {
            let op = GradInput {
                conv: *self,
                x_dims: x.dims4()?,
            };
            Some(dy.apply_op2_no_bwd(w, &op)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(
                &dy,
                &GradWeight {
                    conv: *self,
                    w_dims: w.dims4()?,
                },
            )?)
        } else {
            None
        };
        Ok([dx, dw])
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sequel-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice("conv2d", s1, l1)?;
        let w = slice("conv2d", s2, l2)?;
        self.fwd((x, l1), (w, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw] = self.grads(x, w, dy)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "sequel-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice("conv2d", s1, l1)?;
        let w = slice("conv2d", s2, l2)?;
        let b = slice("conv2d", s3, l3)?;
        self.fwd((x, l1), (w, l2), Some(b))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw] = self.grads(x, w, dy)?;
        let db = if b.track_op() {
            Some(dy.contiguous()?.apply_op1_no_bwd(&GradBias)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `(dy, W) → dx`.
struct GradInput {
    conv: Conv2dOp,
    x_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "sequel-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = slice("conv2d grad", s1, l1)?;
        let w = slice("conv2d grad", s2, l2)?;
        let (n, c, h, wd) = self.x_dims;
        let g = Geo::new(
            &[n, c, h, wd],
            l2.dims(),
            self.conv.stride,
            self.conv.padding,
        )?;
        if l1.dims() != [g.n, g.co, g.ho, g.wo] {
            candle_core::bail!("conv2d grad: dy {:?} does not fit {:?}", l1.dims(), g);
        }
        let (hw, ckk) = (g.hw_out(), g.ckk());
        let mut dx = vec![0f32; g.n * g.c * g.hw_in()];
        let (parts, inner) = g.plan();
        for_sample_chunks(&mut dx, g.c * g.hw_in(), g.n, parts, |range, out| {
            let mut cols = if g.pointwise() {
                Vec::new()
            } else {
                vec![0f32; ckk * hw]
            };
            for (k, dxn) in range.zip(out.chunks_exact_mut(g.c * g.hw_in())) {
                let dyn_ = &dy[k * g.co * hw..(k + 1) * g.co * hw];
                let dst = if g.pointwise() {
                    &mut *dxn
                } else {
                    &mut cols[..]
                };
                matmul(
                    (ckk, hw, g.co),
                    dst,
                    (w, 1, ckk),
                    (dyn_, hw, 1),
                    false,
                    inner,
                );
                if !g.pointwise() {
                    col2im(&g, &cols, dxn);
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from(self.x_dims)))
    }
}

/// `(x, dy) → dW`.
struct GradWeight {
    conv: Conv2dOp,
    w_dims: (usize, usize, usize, usize),
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "sequel-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice("conv2d grad", s1, l1)?;
        let dy = slice("conv2d grad", s2, l2)?;
        let (co, c, kh, kw) = self.w_dims;
        let g = Geo::new(
            l1.dims(),
            &[co, c, kh, kw],
            self.conv.stride,
            self.conv.padding,
        )?;
        if l2.dims() != [g.n, g.co, g.ho, g.wo] {
            candle_core::bail!("conv2d grad: dy {:?} does not fit {:?}", l2.dims(), g);
        }
        let (hw, ckk) = (g.hw_out(), g.ckk());
        let (parts, inner) = g.plan();
        // One partial sum per chunk of samples, added in chunk order: deterministic for a given
        // thread count.
        let partials = par_map(g.n, parts, |range| {
            let mut dw = vec![0f32; g.co * ckk];
            with_scratch(if g.pointwise() { 0 } else { ckk * hw }, |cols| {
                for (i, k) in range.enumerate() {
                    let xn = &x[k * g.c * g.hw_in()..(k + 1) * g.c * g.hw_in()];
                    let src = if g.pointwise() {
                        xn
                    } else {
                        im2col(&g, xn, cols);
                        &*cols
                    };
                    let dyn_ = &dy[k * g.co * hw..(k + 1) * g.co * hw];
                    matmul(
                        (g.co, ckk, hw),
                        &mut dw,
                        (dyn_, hw, 1),
                        (src, 1, hw),
                        i > 0,
                        inner,
                    );
                }
            });
            dw
        });
        let mut it = partials.into_iter();
        let mut dw = it.next().unwrap_or_else(|| vec![0f32; g.co * ckk]);
        for p in it {
            for (a, b) in dw.iter_mut().zip(&p) {
                *a += b;
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from(self.w_dims)))
    }
}

/// `dy (N×Co×Ho×Wo) → db (Co)`: sums in sample-major order.
struct GradBias;

impl CustomOp1 for GradBias {
    fn name(&self) -> &'static str {
        "sequel-conv2d-grad-bias"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dy = slice("conv2d grad", s, l)?;
        let (n, co, ho, wo) = l.shape().dims4()?;
        let hw = ho * wo;
        // Channels split between threads; each channel sums its planes in sample order.
        let db: Vec<f32> = par_map(co, threads(), |channels| {
            channels
                .map(|c| {
                    (0..n)
                        .map(|k| dy[(k * co + c) * hw..][..hw].iter().sum::<f32>())
                        .fold(0f32, |a, b| a + b)
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect();
        Ok((CpuStorage::F32(db), Shape::from(co)))
    }
}

/// 2-D convolution of `x: N × C × H × W` with `w: Co × C × kh × kw`, zero padding `padding` on
/// every side, stride `stride` (no dilation, no groups), plus `b: Co` if given; returns
/// `N × Co × Ho × Wo` with `Ho = (H + 2·padding − kh) / stride + 1` (likewise `Wo`).
///
/// Differentiable in all three inputs; gradients are computed only for inputs autograd tracks.
/// f32 on the CPU uses the kernels of this module, anything else candle's `conv2d`.
///
/// # Errors
/// Shape mismatches (channels of `x` and `w`, a kernel larger than the padded input, stride 0,
/// a bias of the wrong length) and candle errors.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if !(supported(x) && supported(w) && b.is_none_or(supported)) {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
            None => y,
        });
    }
    let op = Conv2dOp { stride, padding };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op)?,
        None => x.apply_op2(&w, op)?,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Tensor, Var};

    use super::super::testing::{check_fd, flat, randn, rel_err, var};
    use super::*;

    /// N, C, H, W, Co, k, stride, padding.
    const SHAPES: &[[usize; 8]] = &[
        [1, 3, 7, 5, 4, 3, 2, 1],
        [3, 2, 6, 6, 5, 3, 1, 1],
        [2, 3, 5, 7, 2, 3, 1, 0],
        [2, 4, 5, 5, 3, 1, 1, 0],
        [2, 4, 7, 7, 3, 1, 2, 0],
        [5, 1, 9, 9, 6, 3, 2, 1],
        [1, 2, 4, 4, 3, 5, 1, 2],
    ];

    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>, s: usize, p: usize) -> Tensor {
        let y = x.conv2d(w, p, s, 1, 1).unwrap();
        match b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap(),
            None => y,
        }
    }

    /// Forward and all three gradients agree with candle's conv2d, on odd sizes, stride 2,
    /// padding, 1×1 kernels and batch 1, with and without bias. (candle's own backward fails with
    /// a shape mismatch when a stride-2 window does not reach the last row or column, e.g. 9×8
    /// input, 3×3, padding 1: those shapes are checked by finite differences below.)
    #[test]
    fn matches_candle_forward_and_backward() {
        for (t, &[n, c, h, wd, co, k, s, p]) in SHAPES.iter().enumerate() {
            for bias in [false, true] {
                let seed = 10 * t as u64;
                let x = var(&[n, c, h, wd], seed);
                let w = var(&[co, c, k, k], seed + 1);
                let b = var(&[co], seed + 2);
                let bt = bias.then(|| b.as_tensor());
                let ours = conv2d(x.as_tensor(), w.as_tensor(), bt, s, p).unwrap();
                let theirs = reference(x.as_tensor(), w.as_tensor(), bt, s, p);
                assert!(rel_err(&ours, &theirs) < 1e-5, "forward {t} {bias}");
                // A random cotangent, so every gradient entry matters.
                let r = randn(ours.dims(), seed + 3);
                let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (&theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let mut vars = vec![&x, &w];
                if bias {
                    vars.push(&b);
                }
                for v in vars {
                    let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                    assert!(rel_err(a, e) < 1e-5, "gradient {t} {bias} {:?}", v.dims());
                }
            }
        }
    }

    /// 5×6 input, 3×3, stride 2, padding 1: the last input column is read by no window.
    #[test]
    fn gradients_match_finite_differences() {
        let (x, w, b) = (var(&[2, 2, 5, 6], 1), var(&[3, 2, 3, 3], 2), var(&[3], 3));
        let r = randn(&[2, 3, 3, 3], 4);
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| {
            let y = conv2d(x, w, Some(b), 2, 1).unwrap();
            // Squared, so the loss is not linear in any input.
            (y.sqr().unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let y = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 2, 1).unwrap();
        let g = (y.sqr().unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let coords = [0, 7, 13, 29, 41, 58, 66, 119];
        check_fd(
            x.as_tensor(),
            g.get(&x).unwrap(),
            |t| loss(t, w.as_tensor(), b.as_tensor()),
            &coords,
        );
        check_fd(
            w.as_tensor(),
            g.get(&w).unwrap(),
            |t| loss(x.as_tensor(), t, b.as_tensor()),
            &coords,
        );
        check_fd(
            b.as_tensor(),
            g.get(&b).unwrap(),
            |t| loss(x.as_tensor(), w.as_tensor(), t),
            &[0, 1, 2],
        );
    }

    /// The data input (a plain tensor) receives no gradient; the weights still do.
    #[test]
    fn untracked_input_gets_no_gradient() {
        let x = randn(&[2, 3, 6, 6], 5);
        let w = var(&[4, 3, 3, 3], 6);
        let y = conv2d(&x, w.as_tensor(), None, 1, 1).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(&w).is_some());
    }

    #[test]
    fn same_inputs_give_bit_identical_results() {
        let run = || {
            let x = Var::from_tensor(&randn(&[4, 3, 9, 9], 7)).unwrap();
            let w = Var::from_tensor(&randn(&[5, 3, 3, 3], 8)).unwrap();
            let b = Var::from_tensor(&randn(&[5], 9)).unwrap();
            let y = conv2d(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), 2, 1).unwrap();
            let g = (y.sqr().unwrap()).sum_all().unwrap().backward().unwrap();
            [
                flat(&y),
                flat(g.get(&x).unwrap()),
                flat(g.get(&w).unwrap()),
                flat(g.get(&b).unwrap()),
            ]
        };
        let a = run();
        for _ in 0..3 {
            assert_eq!(run(), a);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let x = randn(&[1, 3, 4, 4], 0);
        assert!(conv2d(&x, &randn(&[2, 2, 3, 3], 1), None, 1, 1).is_err());
        assert!(conv2d(&x, &randn(&[2, 3, 7, 7], 1), None, 1, 1).is_err());
        assert!(conv2d(&x, &randn(&[2, 3, 3, 3], 1), Some(&randn(&[3], 2)), 1, 1).is_err());
    }
}
