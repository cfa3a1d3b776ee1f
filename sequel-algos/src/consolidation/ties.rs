//! TIES merging (Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When
//! Merging Models", NeurIPS 2023):
//!
//! ```text
//! trim:   τ̂_s = τ_s where |τ_s| ≥ the k-th largest magnitude (top k %), else 0
//! elect:  γ = sign(Σ_s τ̂_s)        (zero signs take the sign of Σ_j γ_j, the majority)
//! merge:  τ_M[j] = Σ_{s: sign τ̂_s[j] = γ[j]} τ̂_s[j] / |{s: sign τ̂_s[j] = γ[j]}|   (disjoint mean)
//! θ̄ = anchor + λ·τ_M
//! ```
//!
//! Trimming is over the whole flattened model by default (`trim_scope: global`, as the TIES and
//! LiNeS code), or per tensor (`per-tensor`, as mergekit). Defaults k = 20 %, λ = 0.5 (FusionBench's
//! continual TIES; the TIES paper tunes λ, the LiNeS code over 0.1..1.5). With `anchor: previous`
//! only the current update is merged, so TIES reduces to keeping its top k % entries, times λ.

use sequel_core::consolidation::{ConsolidationCtx, TaskVector};
use sequel_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{bad, check_lambda, LinesConfig, Merge, Scaled};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrimScope {
    /// One threshold over all entries of a task vector (TIES/LiNeS code).
    #[default]
    Global,
    /// One threshold per tensor (mergekit).
    PerTensor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregate {
    /// Disjoint mean: divide by the number of agreeing non-zero entries.
    #[default]
    Mean,
    /// Disjoint sum.
    Sum,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiesConfig {
    /// Percentage of entries kept per task vector (top-k by magnitude), in (0, 100]. Default 20.
    #[serde(default = "default_k")]
    pub k: f32,
    /// Scaling of the merged vector. Default 0.5.
    #[serde(default = "default_lambda")]
    pub lambda: f32,
    /// `global` (default) or `per-tensor`.
    #[serde(default)]
    pub trim_scope: TrimScope,
    /// `mean` (default, disjoint mean) or `sum`.
    #[serde(default)]
    pub aggregate: Aggregate,
    /// LiNeS applied to λ·τ_M (absent by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<LinesConfig>,
}

fn default_k() -> f32 {
    20.0
}
fn default_lambda() -> f32 {
    0.5
}

/// Validated TIES parameters (without λ).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TiesParams {
    pub k: f32,
    pub trim_scope: TrimScope,
    pub aggregate: Aggregate,
}

/// Check `k` in (0, 100].
pub fn check_k(path: &str, k: f32) -> Result<()> {
    if k > 0.0 && k <= 100.0 {
        Ok(())
    } else {
        Err(bad(
            path,
            format!("must be a percentage in (0, 100], found {k}"),
        ))
    }
}

/// Zero every entry of `values` below the magnitude of its ⌈n·k/100⌉-th largest entry.
fn trim_slice(values: &mut [f32], k: f32) {
    let mut mags: Vec<f32> = values.iter().map(|x| x.abs()).collect();
    if mags.is_empty() {
        return;
    }
    let keep = ((mags.len() as f64 * k as f64 / 100.0).ceil() as usize).clamp(1, mags.len());
    let idx = mags.len() - keep;
    let (_, threshold, _) = mags.select_nth_unstable_by(idx, f32::total_cmp);
    let threshold = *threshold;
    for x in values.iter_mut() {
        if x.abs() < threshold {
            *x = 0.0;
        }
    }
}

/// Keep the top `k` % entries of `v` by magnitude (entries tied at the threshold are kept).
pub fn trim(v: &TaskVector, k: f32, scope: TrimScope) -> TaskVector {
    let mut out = v.clone();
    match scope {
        TrimScope::PerTensor => {
            for t in out.values.iter_mut().flatten() {
                trim_slice(t, k);
            }
        }
        TrimScope::Global => {
            let mut all: Vec<f32> = out.values.iter().flatten().flatten().copied().collect();
            trim_slice(&mut all, k);
            let mut it = all.into_iter();
            for x in out.values.iter_mut().flatten().flatten() {
                *x = it.next().unwrap_or(0.0);
            }
        }
    }
    out
}

/// Elect a sign per entry and merge the agreeing entries of already trimmed vectors.
pub fn elect_and_merge(trimmed: &[TaskVector], aggregate: Aggregate) -> Option<TaskVector> {
    let sum = TaskVector::sum(trimmed)?;
    // Zero signs resolve to the majority sign: the sign of the sum of all elected signs.
    let majority: f32 = sum
        .values
        .iter()
        .flatten()
        .flatten()
        .map(|x| sign(*x))
        .sum::<f32>();
    let majority = if majority >= 0.0 { 1.0 } else { -1.0 };
    let mut out = sum.zeros_like();
    for (i, slot) in out.values.iter_mut().enumerate() {
        let (Some(slot), Some(total)) = (slot.as_mut(), sum.values[i].as_ref()) else {
            continue;
        };
        for (j, o) in slot.iter_mut().enumerate() {
            let elected = match sign(total[j]) {
                0.0 => majority,
                s => s,
            };
            let (mut acc, mut n) = (0.0f32, 0usize);
            for v in trimmed {
                if let Some(x) = v.values[i].as_ref().map(|t| t[j]) {
                    if x != 0.0 && sign(x) == elected {
                        acc += x;
                        n += 1;
                    }
                }
            }
            *o = match aggregate {
                Aggregate::Sum => acc,
                Aggregate::Mean => acc / n.max(1) as f32,
            };
        }
    }
    Some(out)
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The full TIES merge, times λ.
pub fn ties(vectors: &[TaskVector], p: TiesParams, lambda: f32) -> Option<TaskVector> {
    let trimmed: Vec<TaskVector> = vectors.iter().map(|v| trim(v, p.k, p.trim_scope)).collect();
    let mut m = elect_and_merge(&trimmed, p.aggregate)?;
    m.scale(lambda);
    Some(m)
}

pub struct Ties {
    pub params: TiesParams,
    pub lambda: f32,
}

impl Merge for Ties {
    fn name(&self) -> &str {
        "ties"
    }
    fn keeps_task_vectors(&self) -> bool {
        true
    }
    fn merge(&mut self, ctx: &mut ConsolidationCtx) -> Result<TaskVector> {
        ties(ctx.task_vectors, self.params, self.lambda)
            .ok_or_else(|| Error::msg("no task vectors to merge"))
    }
}

pub fn strategy(c: TiesConfig) -> Result<Scaled<Ties>> {
    check_k("consolidation.k", c.k)?;
    check_lambda("lambda", c.lambda)?;
    Scaled::new(
        Ties {
            params: TiesParams {
                k: c.k,
                trim_scope: c.trim_scope,
                aggregate: c.aggregate,
            },
            lambda: c.lambda,
        },
        c.lines,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consolidation::fixture::vector;

    fn params(k: f32) -> TiesParams {
        TiesParams {
            k,
            trim_scope: TrimScope::Global,
            aggregate: Aggregate::Mean,
        }
    }

    #[test]
    fn k_100_with_agreeing_signs_is_lambda_times_the_mean() {
        let vs = [
            vector(&[[1.0, -2.0], [0.5, 3.0], [-1.0, 4.0]]),
            vector(&[[3.0, -1.0], [1.5, 1.0], [-2.0, 2.0]]),
            vector(&[[2.0, -3.0], [1.0, 2.0], [-3.0, 3.0]]),
        ];
        let got = ties(&vs, params(100.0), 0.8).unwrap();
        let mut want = TaskVector::sum(&vs).unwrap();
        want.scale(0.8 / 3.0);
        for (g, w) in got
            .values
            .iter()
            .flatten()
            .flatten()
            .zip(want.values.iter().flatten().flatten())
        {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn trims_to_top_k_elects_the_mass_sign_and_averages_agreeing_entries() {
        // Global top 50 % of 6 entries keeps the 3 largest magnitudes.
        let t = trim(
            &vector(&[[0.1, -5.0], [3.0, 0.2], [-0.3, 4.0]]),
            50.0,
            TrimScope::Global,
        );
        assert_eq!(t, vector(&[[0.0, -5.0], [3.0, 0.0], [0.0, 4.0]]));
        let t = trim(
            &vector(&[[0.1, -5.0], [3.0, 0.2], [-0.3, 4.0]]),
            50.0,
            TrimScope::PerTensor,
        );
        assert_eq!(t, vector(&[[0.0, -5.0], [3.0, 0.0], [0.0, 4.0]]));
        // Entry 0: +3, −1, −1 → mass sign +, mean of agreeing = 3. Entry 1: −2, +1, +0.5 → −.
        let vs = [
            vector(&[[3.0, -2.0]]),
            vector(&[[-1.0, 1.0]]),
            vector(&[[-1.0, 0.5]]),
        ];
        let m = elect_and_merge(&vs, Aggregate::Mean).unwrap();
        assert_eq!(m, vector(&[[3.0, -2.0]]));
        // Agreeing entries are averaged over the agreeing non-zero ones only.
        let vs = [
            vector(&[[2.0, 0.0]]),
            vector(&[[4.0, 0.0]]),
            vector(&[[0.0, 0.0]]),
        ];
        assert_eq!(
            elect_and_merge(&vs, Aggregate::Mean).unwrap(),
            vector(&[[3.0, 0.0]])
        );
        assert_eq!(
            elect_and_merge(&vs, Aggregate::Sum).unwrap(),
            vector(&[[6.0, 0.0]])
        );
    }

    #[test]
    fn k_must_be_a_percentage() {
        let c = |k| TiesConfig {
            k,
            lambda: 0.5,
            trim_scope: TrimScope::Global,
            aggregate: Aggregate::Mean,
            lines: None,
        };
        assert!(strategy(c(0.0)).is_err());
        assert!(strategy(c(101.0)).is_err());
        assert!(strategy(c(f32::NAN)).is_err());
        assert!(strategy(c(100.0)).is_ok());
    }
}
