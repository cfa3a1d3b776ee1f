//! The quadratic penalty shared by EWC, online EWC, SI and MAS — one piece of code, not four:
//!
//! `R(θ) = Σₖ Σᵢ Ωₖ,ᵢ (θᵢ − θ*ₖ,ᵢ)²`
//!
//! over the trainable parameters only (batch-norm running statistics, `Role::NormStat`, are state,
//! not weights, and are never penalised). Each algorithm multiplies `R` by its own strength and
//! states its own ½ convention.
//!
//! **What is cached.** Importances and anchors are detached tensors computed once at a task
//! boundary. Several terms (separate-mode EWC keeps one per past task) are merged exactly into one
//! quadratic with the same value and gradient:
//!
//! `Σₖ Ωₖ(θ − θ*ₖ)² = A(θ − θ̄)² + K`,  `A = Σₖ Ωₖ`,  `θ̄ = Σₖ Ωₖθ*ₖ / A`,  `K = Σₖ Ωₖ(θ*ₖ − θ̄)²`
//!
//! (per element; where `A = 0` every term is 0 and `θ̄` is the newest anchor). A training step
//! therefore costs one pass over `|θ|` whatever the number of past tasks, and memory is `2|θ|`
//! instead of `2T|θ|`. The centred form keeps the f32 arithmetic free of the cancellation that
//! expanding `Aθ² − 2Bθ + C` would suffer. The gradient flows through candle's autograd via the
//! loss; [`QuadraticPenalty::gradient`] gives the same gradient analytically (SI subtracts it).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use sequel_core::model::ParamSet;
use sequel_core::state::{Persist, StateDict, StateIo};
use sequel_core::Result;

/// One detached tensor per trainable parameter of a model, in [`ParamSet`] order (norm
/// statistics skipped): importances, anchors, path integrals.
#[derive(Debug, Clone)]
pub struct PerParam(pub Vec<Tensor>);

impl PerParam {
    /// Zeros shaped like the trainable parameters.
    pub fn zeros(params: &ParamSet) -> Result<Self> {
        Ok(Self(
            params
                .trainable()
                .map(|p| p.var.as_tensor().zeros_like())
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// Detached copies of the current trainable values (copies, not views: the optimizers update
    /// parameters in place).
    pub fn values(params: &ParamSet) -> Result<Self> {
        Ok(Self(
            params
                .trainable()
                .map(|p| p.var.as_tensor().copy().map(|t| t.detach()))
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// Element-wise `a·self + b·other`.
    pub fn axpby(&self, a: f64, other: &PerParam, b: f64) -> Result<Self> {
        Ok(Self(
            self.0
                .iter()
                .zip(&other.0)
                .map(|(x, y)| (x * a)? + (y * b)?)
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    /// Sum of every element (f64), for logs and tests.
    pub fn sum(&self) -> Result<f64> {
        let mut s = 0.0;
        for t in &self.0 {
            s += t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        Ok(s)
    }

    /// The largest element (for logs: with plain SGD a penalty `s·Σ Ω(θ − θ*)²` is stable only
    /// while `lr · 2s · max Ω < 2`).
    pub fn max(&self) -> Result<f64> {
        let mut m = f64::NEG_INFINITY;
        for t in &self.0 {
            m = m.max(
                t.flatten_all()?
                    .max(0)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?,
            );
        }
        Ok(m)
    }

    /// Every element, flattened in order (tests and checks).
    pub fn flat(&self) -> Result<Vec<f32>> {
        let mut v = Vec::new();
        for t in &self.0 {
            v.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(v)
    }
}

/// `A(θ − θ̄)² + K`, summed over the trainable parameters: the exact merge of any number of
/// `Ω(θ − θ*)²` terms (module docs).
#[derive(Debug, Clone, Default)]
pub struct QuadraticPenalty {
    weight: Vec<Tensor>,
    center: Vec<Tensor>,
    offset: f64,
}

/// Saved as the list of its tensors.
impl Persist for PerParam {
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
        self.0.save(key, out)
    }
    fn load(key: &str, from: &StateDict) -> Result<Self> {
        Vec::load(key, from).map(PerParam)
    }
    fn present(key: &str, from: &StateDict) -> bool {
        <Vec<Tensor> as Persist>::present(key, from)
    }
}

impl QuadraticPenalty {
    /// Every term, for checkpoints.
    pub fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.field("weight", &mut self.weight)?;
        io.field("center", &mut self.center)?;
        io.field("offset", &mut self.offset)
    }

    /// No term yet (before the first task boundary): the penalty is absent.
    pub fn is_empty(&self) -> bool {
        self.weight.is_empty()
    }

    /// Replace everything by the single term `Ω(θ − θ*)²` (online EWC, SI, MAS). Both are
    /// detached here, whatever the caller passed, so the penalty's gradient can only reach θ.
    pub fn replace(&mut self, importance: PerParam, anchor: PerParam) {
        self.weight = importance.0.iter().map(|t| t.detach()).collect();
        self.center = anchor.0.iter().map(|t| t.detach()).collect();
        self.offset = 0.0;
    }

    /// Add the term `Ω(θ − θ*)²` to the ones already held (separate-mode EWC).
    pub fn add(&mut self, importance: PerParam, anchor: PerParam) -> Result<()> {
        if self.is_empty() {
            self.replace(importance, anchor);
            return Ok(());
        }
        let mut offset = self.offset;
        for ((a, c), (f, t)) in self
            .weight
            .iter_mut()
            .zip(self.center.iter_mut())
            .zip(importance.0.iter().zip(&anchor.0))
        {
            let (f, t) = (&f.detach(), &t.detach());
            let a_new = (&*a + f)?;
            let merged = (((&*a * &*c)? + (f * t)?)? / &a_new)?;
            let c_new = a_new.gt(0.0)?.where_cond(&merged, t)?;
            // K grows by what the two old centres lose when moved to the new one.
            let k = ((&*a * (&*c - &c_new)?.sqr()?)? + (f * (t - &c_new)?.sqr()?)?)?;
            offset += k.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            *a = a_new;
            *c = c_new;
        }
        self.offset = offset;
        Ok(())
    }

    /// `Σᵢ Aᵢ(θᵢ − θ̄ᵢ)² + K` as a graph-connected scalar (its gradient reaches the parameters), or
    /// `None` before the first term.
    pub fn value(&self, params: &ParamSet) -> Result<Option<Tensor>> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut total: Option<Tensor> = None;
        for ((p, a), c) in params.trainable().zip(&self.weight).zip(&self.center) {
            let theta = p.var.as_tensor();
            let term = if fusable(&[theta, a, c]) {
                theta.apply_op3(a, c, WeightedSquaredDistance)?
            } else {
                (a * (theta - c)?.sqr()?)?.sum_all()?
            };
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        match total {
            Some(t) => Ok(Some(t.affine(1.0, self.offset)?)),
            None => Ok(None),
        }
    }

    /// `∂R/∂θ = 2A(θ − θ̄)` per trainable parameter, detached; `None` before the first term.
    pub fn gradient(&self, params: &ParamSet) -> Result<Option<Vec<Tensor>>> {
        if self.is_empty() {
            return Ok(None);
        }
        let g = params
            .trainable()
            .zip(&self.weight)
            .zip(&self.center)
            .map(|((p, a), c)| {
                let theta = p.var.as_tensor();
                if fusable(&[theta, a, c]) {
                    theta.apply_op3_no_bwd(a, c, &ScaledDistance { scale: 2.0 })
                } else {
                    (a * (theta.detach() - c)?)? * 2.0
                }
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Some(g))
    }

    /// The task loss's own gradient, `∇L_task = ∇(L_task + λR) − λ∇R`, per trainable parameter,
    /// detached (zeros where the backward left none): what path-integral importances (SI, RWalk)
    /// accumulate, since the trainer's gradient also holds the penalty's.
    pub fn task_gradient(
        &self,
        grads: &candle_core::backprop::GradStore,
        params: &ParamSet,
        lambda: f64,
    ) -> Result<Vec<Tensor>> {
        let penalty_grad = self.gradient(params)?;
        params
            .trainable()
            .enumerate()
            .map(|(i, p)| {
                let g = match grads.get(p.var.as_tensor()) {
                    Some(g) => g.detach(),
                    None => p.var.as_tensor().zeros_like()?,
                };
                Ok(match &penalty_grad {
                    Some(pg) => (g - (&pg[i] * lambda)?)?,
                    None => g,
                })
            })
            .collect()
    }

    /// The merged importance `A`.
    pub fn weight(&self) -> &[Tensor] {
        &self.weight
    }

    /// The merged anchor `θ̄`.
    pub fn center(&self) -> &[Tensor] {
        &self.center
    }
}

/// Whether the fused CPU kernels below apply (f32, contiguous, on the CPU).
fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// The f32 slices of three contiguous CPU operands of equal length.
fn slices<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> candle_core::Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) = (s1, s2, s3) else {
        candle_core::bail!("penalty kernel: only f32 is supported");
    };
    let (Some((a0, a1)), Some((b0, b1)), Some((c0, c1))) = (
        l1.contiguous_offsets(),
        l2.contiguous_offsets(),
        l3.contiguous_offsets(),
    ) else {
        candle_core::bail!("penalty kernel: operands must be contiguous");
    };
    if a1 - a0 != b1 - b0 || a1 - a0 != c1 - c0 {
        candle_core::bail!("penalty kernel: length mismatch");
    }
    Ok((&a[a0..a1], &b[b0..b1], &c[c0..c1]))
}

/// `Σ A(θ − c)²` in one pass over `(θ, A, c)` (accumulated in f64); its backward is `2A(θ − c)·ḡ`,
/// also one pass. The composed tensor ops take about ten passes and as many allocations, which at
/// batch 10 cost more than the training step itself.
struct WeightedSquaredDistance;

impl CustomOp3 for WeightedSquaredDistance {
    fn name(&self) -> &'static str {
        "weighted-squared-distance"
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
        let (theta, a, c) = slices((s1, l1), (s2, l2), (s3, l3))?;
        let mut sum = 0.0f64;
        for ((t, a), c) in theta.iter().zip(a).zip(c) {
            let d = t - c;
            sum += (a * d * d) as f64;
        }
        Ok((CpuStorage::F32(vec![sum as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        theta: &Tensor,
        a: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = 2.0 * grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let g = theta.apply_op3_no_bwd(a, c, &ScaledDistance { scale })?;
        Ok((Some(g), None, None))
    }
}

/// `scale·A(θ − c)`, element-wise, in one pass.
struct ScaledDistance {
    scale: f32,
}

impl CustomOp3 for ScaledDistance {
    fn name(&self) -> &'static str {
        "scaled-distance"
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
        let (theta, a, c) = slices((s1, l1), (s2, l2), (s3, l3))?;
        let k = self.scale;
        let out: Vec<f32> = theta
            .iter()
            .zip(a)
            .zip(c)
            .map(|((t, a), c)| k * a * (t - c))
            .collect();
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use sequel_core::model::Role;

    fn params(values: &[&[f32]]) -> ParamSet {
        let mut ps = ParamSet::new();
        for (i, v) in values.iter().enumerate() {
            let var = Var::from_tensor(&Tensor::new(*v, &Device::Cpu).unwrap()).unwrap();
            ps.push(format!("p{i}"), 1, Role::Body, var);
        }
        // A norm statistic that must be ignored.
        let stat = Var::from_tensor(&Tensor::new(&[100f32], &Device::Cpu).unwrap()).unwrap();
        ps.push("bn.running_mean", 1, Role::NormStat, stat);
        ps
    }

    fn per(values: &[&[f32]]) -> PerParam {
        PerParam(
            values
                .iter()
                .map(|v| Tensor::new(*v, &Device::Cpu).unwrap())
                .collect(),
        )
    }

    #[test]
    fn merged_terms_equal_the_sum_of_separate_terms_in_value_and_gradient() {
        let ps = params(&[&[0.5, -1.0, 2.0], &[0.25]]);
        let terms = [
            (
                per(&[&[1.0, 0.0, 3.0], &[2.0]]),
                per(&[&[0.0, 1.0, 1.5], &[1.0]]),
            ),
            (
                per(&[&[0.5, 0.0, 1.0], &[0.0]]),
                per(&[&[1.0, -2.0, 2.5], &[4.0]]),
            ),
            (
                per(&[&[2.0, 0.0, 0.1], &[1.0]]),
                per(&[&[0.3, 7.0, 2.0], &[-1.0]]),
            ),
        ];
        let mut pen = QuadraticPenalty::default();
        assert!(pen.value(&ps).unwrap().is_none());
        for (f, a) in &terms {
            pen.add(f.clone(), a.clone()).unwrap();
        }
        // Direct evaluation, by hand in f64.
        let theta = [[0.5, -1.0, 2.0].as_slice(), [0.25].as_slice()];
        let mut want = 0.0f64;
        let mut want_grad = [vec![0.0f64; 3], vec![0.0f64; 1]];
        for (f, a) in &terms {
            for (i, th) in theta.iter().enumerate() {
                let fv = f.0[i].to_vec1::<f32>().unwrap();
                let av = a.0[i].to_vec1::<f32>().unwrap();
                for j in 0..th.len() {
                    let d = th[j] - av[j] as f64;
                    want += fv[j] as f64 * d * d;
                    want_grad[i][j] += 2.0 * fv[j] as f64 * d;
                }
            }
        }
        let got = pen.value(&ps).unwrap().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
        let auto = pen.value(&ps).unwrap().unwrap().backward().unwrap();
        let analytic = pen.gradient(&ps).unwrap().unwrap();
        for (i, p) in ps.trainable().enumerate() {
            let g = auto
                .get(p.var.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let h = analytic[i].to_vec1::<f32>().unwrap();
            for j in 0..g.len() {
                assert!((g[j] as f64 - want_grad[i][j]).abs() < 1e-4, "{g:?}");
                assert!((h[j] as f64 - want_grad[i][j]).abs() < 1e-4, "{h:?}");
            }
        }
        // The zero-weight element (index 1 of p0) sits at the newest anchor and costs nothing.
        assert_eq!(pen.center()[0].to_vec1::<f32>().unwrap()[1], 7.0);
    }

    #[test]
    fn fused_kernel_and_composed_ops_agree_in_value_and_gradient() {
        // f32 contiguous operands take the fused kernel, f64 ones the composed tensor ops.
        let run = |dtype: DType| {
            let mut ps = ParamSet::new();
            let theta = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.2, -0.3]], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            ps.push("w", 1, Role::Body, Var::from_tensor(&theta).unwrap());
            let cast = |v: &[[f32; 3]; 2]| {
                PerParam(vec![Tensor::new(v, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()])
            };
            let mut pen = QuadraticPenalty::default();
            pen.replace(
                cast(&[[1.0, 2.0, 0.5], [3.0, 0.0, 1.0]]),
                cast(&[[0.0, 1.0, 1.5], [-1.0, 0.2, 0.7]]),
            );
            let v = pen.value(&ps).unwrap().unwrap();
            let g = v.backward().unwrap();
            let p = ps.trainable().next().unwrap();
            let grad: Vec<f64> = g
                .get(p.var.as_tensor())
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let analytic: Vec<f64> = pen.gradient(&ps).unwrap().unwrap()[0]
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let value = v.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            (value, grad, analytic)
        };
        let (v32, g32, a32) = run(DType::F32);
        let (v64, g64, a64) = run(DType::F64);
        assert!((v32 - v64).abs() < 1e-5, "{v32} vs {v64}");
        // 1·0.25 + 2·4 + 0.5·0.25 + 3·1.21 + 0 + 1·1 = 13.005
        assert!((v64 - 13.005).abs() < 1e-5, "{v64}");
        for i in 0..6 {
            assert!((g32[i] - g64[i]).abs() < 1e-5 && (a32[i] - g64[i]).abs() < 1e-5);
            assert!((a64[i] - g64[i]).abs() < 1e-9);
        }
    }

    #[test]
    fn penalty_is_zero_at_the_anchor_and_positive_away_from_it() {
        let ps = params(&[&[1.0, 2.0]]);
        let mut pen = QuadraticPenalty::default();
        pen.replace(per(&[&[1.0, 1.0]]), PerParam::values(&ps).unwrap());
        let v =
            |pen: &QuadraticPenalty| pen.value(&ps).unwrap().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(v(&pen), 0.0);
        let p = ps.trainable().next().unwrap();
        p.var
            .set(&Tensor::new(&[1.5f32, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        assert!((v(&pen) - 0.25).abs() < 1e-7);
    }
}
