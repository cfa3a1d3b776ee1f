//! Sweep expansion: configs × grid × seeds → run points (`sequel sweep`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepPoint {
    pub config: PathBuf,
    /// `key=value` overrides of this grid point (before the seed).
    pub overrides: Vec<String>,
    /// Run name: the config's name plus the grid assignment, safe as a folder name.
    pub name: String,
    pub seed: u64,
}

impl SweepPoint {
    /// Every override to pass to `sequel run`, including the name.
    pub fn all_overrides(&self) -> Vec<String> {
        let mut o = self.overrides.clone();
        o.push(format!("name={}", self.name));
        o
    }
}

/// Parse `0..5` (end exclusive), `0..=4`, `3` or `0,2,7`.
pub fn parse_seeds(spec: &str) -> Result<Vec<u64>> {
    let bad = || {
        Error::Msg(format!(
            "--seeds `{spec}`: expected a range like 0..5 or 0..=4, or a list like 0,2,7"
        ))
    };
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| bad());
    let seeds = if let Some((a, b)) = spec.split_once("..=") {
        (num(a)?..=num(b)?).collect()
    } else if let Some((a, b)) = spec.split_once("..") {
        (num(a)?..num(b)?).collect()
    } else {
        spec.split(',').map(num).collect::<Result<Vec<_>>>()?
    };
    if seeds.is_empty() {
        return Err(bad());
    }
    Ok(seeds)
}

/// Split `key=v1,v2,[1, 2]` into the key and its values; commas inside brackets or braces do not
/// separate values.
pub fn parse_grid(spec: &str) -> Result<(String, Vec<String>)> {
    let (key, values) = spec
        .split_once('=')
        .ok_or_else(|| Error::Msg(format!("--grid `{spec}`: expected key=v1,v2,...")))?;
    let mut out = Vec::new();
    let (mut depth, mut cur) = (0i32, String::new());
    for ch in values.chars() {
        match ch {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    out.push(cur.trim().to_string());
    if key.trim().is_empty() || out.iter().any(|v| v.is_empty()) {
        return Err(Error::Msg(format!("--grid `{spec}`: empty key or value")));
    }
    Ok((key.trim().to_string(), out))
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._=-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The cartesian product configs × grid values × seeds, in that nesting order (seeds innermost).
/// `names[i]` is the `name` of `configs[i]`.
pub fn expand(
    configs: &[(PathBuf, String)],
    grid: &[(String, Vec<String>)],
    seeds: &[u64],
) -> Vec<SweepPoint> {
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (key, values) in grid {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let mut points = Vec::new();
    for (path, base) in configs {
        for combo in &combos {
            let mut name = base.clone();
            for (k, v) in combo {
                name.push('-');
                name.push_str(&slug(&format!("{k}={v}")));
            }
            for &seed in seeds {
                points.push(SweepPoint {
                    config: path.clone(),
                    overrides: combo.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    name: name.clone(),
                    seed,
                });
            }
        }
    }
    points
}

/// Whether `<out>/<name>/seed-<seed>` holds a completed run.
pub fn is_finished(out: &Path, name: &str, seed: u64) -> bool {
    let p = out
        .join(name)
        .join(format!("seed-{seed}"))
        .join("summary.json");
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["status"].as_str() == Some("completed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_and_grid_parse() {
        assert_eq!(parse_seeds("0..3").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_seeds("1..=2").unwrap(), vec![1, 2]);
        assert_eq!(parse_seeds("4,1").unwrap(), vec![4, 1]);
        assert!(parse_seeds("a..b").is_err() && parse_seeds("3..3").is_err());
        let (k, v) = parse_grid("model.hidden=[100, 100],[256,256]").unwrap();
        assert_eq!(
            (k.as_str(), v),
            (
                "model.hidden",
                vec!["[100, 100]".to_string(), "[256,256]".to_string()]
            )
        );
        assert!(parse_grid("lr").is_err() && parse_grid("lr=0.1,").is_err());
    }

    #[test]
    fn expansion_is_the_exact_product() {
        let configs = vec![
            (PathBuf::from("a.yaml"), "a".to_string()),
            (PathBuf::from("b.yaml"), "b".to_string()),
        ];
        let grid = vec![
            (
                "optimizer.lr".to_string(),
                vec!["0.1".to_string(), "0.01".to_string()],
            ),
            (
                "model.hidden".to_string(),
                vec![
                    "[10]".to_string(),
                    "[20, 20]".to_string(),
                    "[5]".to_string(),
                ],
            ),
        ];
        let pts = expand(&configs, &grid, &[0, 1]);
        assert_eq!(pts.len(), 2 * 2 * 3 * 2);
        let mut keys: Vec<(String, u64)> = pts.iter().map(|p| (p.name.clone(), p.seed)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), pts.len(), "every point distinct");
        assert_eq!(pts[0].name, "a-optimizer.lr=0.1-model.hidden=_10_");
        assert_eq!(
            pts[0].overrides,
            vec!["optimizer.lr=0.1", "model.hidden=[10]"]
        );
        assert_eq!((pts[0].seed, pts[1].seed), (0, 1));
        assert_eq!(expand(&configs, &[], &[3]).len(), 2);
    }
}
