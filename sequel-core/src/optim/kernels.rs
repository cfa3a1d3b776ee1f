//! Fused in-place update kernels for the optimizers.
//!
//! candle's tensor ops allocate a fresh output for every operation; an SGD step written with them
//! allocates two tensors per parameter and then copies the result back with `Var::set`. On the
//! CPU these kernels update the storage in place instead. Other devices fall back to tensor ops.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, Var};

use crate::error::Result;

/// The element ranges of operands that must be contiguous and of equal length.
fn ranges<const N: usize>(
    op: &str,
    layouts: [&Layout; N],
) -> candle_core::Result<[std::ops::Range<usize>; N]> {
    let mut out: [std::ops::Range<usize>; N] = std::array::from_fn(|_| 0..0);
    for (r, l) in out.iter_mut().zip(layouts) {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{op}: operands must be contiguous");
        };
        *r = a..b;
    }
    if out.iter().any(|r| r.len() != out[0].len()) {
        let lens: Vec<usize> = out.iter().map(|r| r.len()).collect();
        candle_core::bail!("{op}: length mismatch {lens:?}");
    }
    Ok(out)
}

/// `dst ← a·dst + b·src`.
struct Axpby {
    a: f32,
    b: f32,
}

impl InplaceOp2 for Axpby {
    fn name(&self) -> &'static str {
        "axpby"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(dst), CpuStorage::F32(src)) = (s1, s2) else {
            candle_core::bail!("axpby: only f32 is supported");
        };
        let [dr, sr] = ranges("axpby", [l1, l2])?;
        let (a, b) = (self.a, self.b);
        let dst = &mut dst[dr];
        let src = &src[sr];
        if a == 1.0 {
            for (d, s) in dst.iter_mut().zip(src) {
                *d += b * s;
            }
        } else {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = a * *d + b * s;
            }
        }
        Ok(())
    }
}

fn fusable(dst: &Tensor) -> bool {
    dst.device().is_cpu() && dst.is_contiguous() && dst.dtype() == candle_core::DType::F32
}

/// A fresh state buffer holding a copy of `t`, updatable in place by these kernels.
pub fn state_buffer(t: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&t.copy()?.detach())?.as_tensor().clone())
}

/// `dst ← a·dst + b·src` in place. `dst` must be a parameter's or a [`state_buffer`]'s tensor.
pub fn axpby(dst: &Tensor, a: f32, b: f32, src: &Tensor) -> Result<()> {
    if fusable(dst) {
        let src = src.contiguous()?;
        dst.inplace_op2(&src, &Axpby { a, b })?;
        return Ok(());
    }
    let v = ((dst * a as f64)? + (src * b as f64)?)?;
    Var::from_tensor(dst)?.set(&v)?;
    Ok(())
}

/// Adam's moment update and step in one pass:
/// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, `θ ← θ − lr·(m/c₁)/(√(v/c₂)+ε)`.
struct AdamMoments {
    beta: f32,
    square: bool,
}

impl InplaceOp2 for AdamMoments {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(m), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adam: only f32 is supported");
        };
        let [mr, gr] = ranges("adam", [l1, l2])?;
        let (b, c) = (self.beta, 1.0 - self.beta);
        for (m, &g) in m[mr].iter_mut().zip(&g[gr]) {
            *m = b * *m + c * if self.square { g * g } else { g };
        }
        Ok(())
    }
}

struct AdamStep {
    decay: f32,
    lr: f32,
    c1: f32,
    c2: f32,
    eps: f32,
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(t), CpuStorage::F32(m), CpuStorage::F32(v)) = (s1, s2, s3) else {
            candle_core::bail!("adam: only f32 is supported");
        };
        let [tr, mr, vr] = ranges("adam", [l1, l2, l3])?;
        for ((t, &m), &v) in t[tr].iter_mut().zip(&m[mr]).zip(&v[vr]) {
            *t = *t * self.decay - self.lr * (m / self.c1) / ((v / self.c2).sqrt() + self.eps);
        }
        Ok(())
    }
}

/// One Adam update of `theta` with moments `m`, `v` (state buffers) and gradient `g`; `decay`
/// multiplies θ first (AdamW's decoupled weight decay, 1 − lr·wd; 1 for Adam).
#[allow(clippy::too_many_arguments)]
pub fn adam_update(
    theta: &Tensor,
    decay: f32,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    betas: [f32; 2],
    lr: f32,
    (c1, c2): (f32, f32),
    eps: f32,
) -> Result<()> {
    if fusable(theta) && fusable(m) && fusable(v) {
        let g = g.contiguous()?;
        m.inplace_op2(
            &g,
            &AdamMoments {
                beta: betas[0],
                square: false,
            },
        )?;
        v.inplace_op2(
            &g,
            &AdamMoments {
                beta: betas[1],
                square: true,
            },
        )?;
        theta.inplace_op3(
            m,
            v,
            &AdamStep {
                decay,
                lr,
                c1,
                c2,
                eps,
            },
        )?;
        return Ok(());
    }
    axpby(m, betas[0], 1.0 - betas[0], g)?;
    axpby(v, betas[1], 1.0 - betas[1], &g.sqr()?)?;
    let update = ((m / c1 as f64)? / ((v / c2 as f64)?.sqrt()? + eps as f64)?)?;
    let new = ((theta * decay as f64)? - (update * lr as f64)?)?;
    Var::from_tensor(theta)?.set(&new)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn axpby_matches_tensor_arithmetic_in_place() {
        let d = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let s = Tensor::new(&[10.0f32, 20.0, 30.0], &Device::Cpu).unwrap();
        let alias = d.clone();
        axpby(&d, 0.5, -0.1, &s).unwrap();
        assert_eq!(
            alias.to_vec1::<f32>().unwrap(),
            vec![0.5 - 1.0, 1.0 - 2.0, 1.5 - 3.0]
        );
        axpby(&d, 1.0, 1.0, &s).unwrap();
        assert_eq!(d.to_vec1::<f32>().unwrap(), vec![9.5, 19.0, 28.5]);
    }
}
