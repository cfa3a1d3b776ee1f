//! Pooling and the residual join, each one pass forward and one pass backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::{for_sample_chunks, slice, supported, threads};
use crate::error::Result;

/// `relu(max-pool 2×2, stride 2)`, floor mode. Pooling after the ReLU equals the ReLU after the
/// pooling, so one op does both and the full-size ReLU output is never materialised.
struct MaxPoolRelu;

impl CustomOp1 for MaxPoolRelu {
    fn name(&self) -> &'static str {
        "sequel-max-pool2x2-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice("max_pool2x2_relu", s, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (h2, w2) = (h / 2, w / 2);
        let mut y = vec![0f32; n * c * h2 * w2];
        if h2 * w2 == 0 {
            return Ok((CpuStorage::F32(y), Shape::from((n, c, h2, w2))));
        }
        for_sample_chunks(&mut y, c * h2 * w2, n, threads(), |samples, out| {
            let first = samples.start * c;
            for (p, op) in out.chunks_exact_mut(h2 * w2).enumerate() {
                let xp = &x[(first + p) * h * w..][..h * w];
                for oy in 0..h2 {
                    let (r0, r1) = (&xp[2 * oy * w..][..w], &xp[(2 * oy + 1) * w..][..w]);
                    for (ox, o) in op[oy * w2..(oy + 1) * w2].iter_mut().enumerate() {
                        let m = r0[2 * ox]
                            .max(r0[2 * ox + 1])
                            .max(r1[2 * ox].max(r1[2 * ox + 1]));
                        *o = m.max(0.0);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((n, c, h2, w2))))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(x.apply_op3_no_bwd(
            y,
            &dy.contiguous()?,
            &MaxPoolReluGrad,
        )?))
    }
}

/// `(x, y, dy) → dx`: each window's gradient goes to its first maximum (row-major), and nowhere
/// when the output was clipped to 0 (ReLU' = 0 there).
struct MaxPoolReluGrad;

impl candle_core::CustomOp3 for MaxPoolReluGrad {
    fn name(&self) -> &'static str {
        "sequel-max-pool2x2-relu-grad"
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
        let x = slice("max_pool2x2_relu grad", s1, l1)?;
        let y = slice("max_pool2x2_relu grad", s2, l2)?;
        let dy = slice("max_pool2x2_relu grad", s3, l3)?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let (h2, w2) = (h / 2, w / 2);
        let mut dx = vec![0f32; n * c * h * w];
        if h2 * w2 > 0 {
            for_sample_chunks(&mut dx, c * h * w, n, threads(), |samples, out| {
                let first = samples.start * c;
                for (p, dxp) in out.chunks_exact_mut(h * w).enumerate() {
                    let plane = first + p;
                    let xp = &x[plane * h * w..][..h * w];
                    let (yp, dyp) = (&y[plane * h2 * w2..], &dy[plane * h2 * w2..]);
                    for oy in 0..h2 {
                        for ox in 0..w2 {
                            let (m, g) = (yp[oy * w2 + ox], dyp[oy * w2 + ox]);
                            if m <= 0.0 {
                                continue;
                            }
                            let a = 2 * oy * w + 2 * ox;
                            let at = if xp[a] == m {
                                a
                            } else if xp[a + 1] == m {
                                a + 1
                            } else if xp[a + w] == m {
                                a + w
                            } else {
                                a + w + 1
                            };
                            dxp[at] = g;
                        }
                    }
                }
            });
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `relu(max_pool2x2(x))` for `x: N × C × H × W` → `N × C × ⌊H/2⌋ × ⌊W/2⌋` (an odd last row or
/// column is dropped). The gradient goes to the first maximum of each window in row-major order
/// (candle's `max` gives each tied maximum the full gradient) and is 0 where the output is 0.
///
/// # Errors
/// `x` not 4-D; candle errors.
pub fn max_pool2x2_relu(x: &Tensor) -> Result<Tensor> {
    if !supported(x) {
        return super::super::layers::max_pool2x2(&x.relu()?);
    }
    Ok(x.contiguous()?.apply_op1(MaxPoolRelu)?)
}

/// Mean over the spatial dimensions: `N × C × H × W` → `N × C`.
struct GlobalAvgPool;

impl CustomOp1 for GlobalAvgPool {
    fn name(&self) -> &'static str {
        "sequel-global-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice("global_avg_pool", s, l)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let hw = h * w;
        let inv = 1.0 / hw as f32;
        let y: Vec<f32> = (0..n * c)
            .map(|p| x[p * hw..][..hw].iter().sum::<f32>() * inv)
            .collect();
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let (n, c, h, w) = x.dims4()?;
        let g = (dy.reshape((n, c, 1, 1))? * (1.0 / (h * w) as f64))?;
        Ok(Some(g.broadcast_as((n, c, h, w))?.contiguous()?))
    }
}

/// Global average pooling `N × C × H × W` → `N × C` (the mean of each map).
///
/// # Errors
/// `x` not 4-D; candle errors.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    if !supported(x) {
        return Ok(x.mean(3)?.mean(2)?);
    }
    Ok(x.contiguous()?.apply_op1(GlobalAvgPool)?)
}

/// `relu(a + b)`, the residual join.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "sequel-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice("add_relu", s1, l1)?;
        let b = slice("add_relu", s2, l2)?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "add_relu: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            );
        }
        let y: Vec<f32> = a.iter().zip(b).map(|(a, b)| (a + b).max(0.0)).collect();
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = y.apply_op2_no_bwd(&dy.contiguous()?, &ReluMask)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// `(y, dy) → dy · [y > 0]`.
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "sequel-relu-mask"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice("relu mask", s1, l1)?;
        let dy = slice("relu mask", s2, l2)?;
        let g: Vec<f32> = y
            .iter()
            .zip(dy)
            .map(|(&y, &d)| if y > 0.0 { d } else { 0.0 })
            .collect();
        Ok((CpuStorage::F32(g), l1.shape().clone()))
    }
}

/// `relu(a + b)` for tensors of equal shape; the gradient is `dy · [a + b > 0]` for both.
///
/// # Errors
/// Shape mismatch; candle errors.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(supported(a) && supported(b)) {
        return Ok((a + b)?.relu()?);
    }
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::super::testing::{check_fd, flat, randn, rel_err, var};
    use super::*;
    use crate::model::layers::max_pool2x2;

    #[test]
    fn max_pool_relu_matches_candle_ops_on_odd_sizes_and_batch_1() {
        for (t, dims) in [[1, 1, 5, 5], [2, 3, 6, 7], [3, 2, 4, 4], [1, 2, 3, 3]]
            .into_iter()
            .enumerate()
        {
            let x = var(&dims, 30 + t as u64);
            let ours = max_pool2x2_relu(x.as_tensor()).unwrap();
            let theirs = max_pool2x2(&x.as_tensor().relu().unwrap()).unwrap();
            assert_eq!(flat(&ours), flat(&theirs), "{dims:?}");
            let r = randn(ours.dims(), 40 + t as u64);
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // Random normal inputs: no ties, no exact zeros, so the gradients agree exactly.
            assert_eq!(flat(g1.get(&x).unwrap()), flat(g2.get(&x).unwrap()));
        }
    }

    #[test]
    fn max_pool_relu_gradient_matches_finite_differences() {
        let x = var(&[2, 2, 5, 4], 3);
        let r = randn(&[2, 2, 2, 2], 4);
        let loss = |x: &Tensor| {
            (max_pool2x2_relu(x).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let y = max_pool2x2_relu(x.as_tensor()).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        check_fd(
            x.as_tensor(),
            g.get(&x).unwrap(),
            loss,
            &(0..80).step_by(3).collect::<Vec<_>>(),
        );
    }

    #[test]
    fn max_pool_relu_of_a_single_row_is_empty() {
        let y = max_pool2x2_relu(&randn(&[1, 2, 1, 3], 0)).unwrap();
        assert_eq!(y.dims(), &[1, 2, 0, 1]);
    }

    /// Ties get the whole gradient once, at the first maximum; an all-negative window none.
    #[test]
    fn max_pool_relu_ties_and_clipped_windows() {
        let v = vec![2.0f32, 2.0, -1.0, -3.0, 2.0, 1.0, -2.0, -0.5];
        let x = candle_core::Var::from_vec(v, (1, 1, 2, 4), &candle_core::Device::Cpu).unwrap();
        let y = max_pool2x2_relu(x.as_tensor()).unwrap();
        assert_eq!(flat(&y), vec![2.0, 0.0]);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            flat(g.get(&x).unwrap()),
            vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn global_avg_pool_matches_mean_and_its_gradient() {
        let x = var(&[3, 4, 5, 3], 11);
        let ours = global_avg_pool(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().mean(3).unwrap().mean(2).unwrap();
        assert!(rel_err(&ours, &theirs) < 1e-6);
        let r = randn(&[3, 4], 12);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(rel_err(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-6);
    }

    #[test]
    fn add_relu_matches_candle_ops() {
        let (a, b) = (var(&[2, 3, 4, 5], 21), var(&[2, 3, 4, 5], 22));
        let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert_eq!(flat(&ours), flat(&theirs));
        let r = randn(ours.dims(), 23);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&a, &b] {
            assert_eq!(flat(g1.get(v).unwrap()), flat(g2.get(v).unwrap()));
        }
    }
}
