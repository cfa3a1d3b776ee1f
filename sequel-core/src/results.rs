//! Reading finished run directories back and summarising them across seeds (`sequel compare`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One finished run, as read from its directory.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub dir: PathBuf,
    /// The resolved config (config.yaml).
    pub config: serde_yaml::Value,
    /// summary.json.
    pub summary: serde_json::Value,
}

impl RunRecord {
    pub fn completed(&self) -> bool {
        self.summary["status"].as_str() == Some("completed")
    }

    /// A final metric (`avg_acc`, `forgetting`, ...) as a fraction, if defined.
    pub fn final_metric(&self, key: &str) -> Option<f64> {
        self.summary["final"][key].as_f64()
    }

    /// A final metric of the trained weights before consolidation (runs with a consolidator).
    pub fn final_raw_metric(&self, key: &str) -> Option<f64> {
        self.summary["final_raw"][key].as_f64()
    }

    /// The value at a dotted key path of the config, as text (`algorithm.name` → `naive`).
    pub fn config_value(&self, path: &str) -> Option<String> {
        let mut v = &self.config;
        for part in path.split('.') {
            v = v.get(part)?;
        }
        Some(match v {
            serde_yaml::Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other).ok()?.trim().to_string(),
        })
    }

    /// The config without its seed: runs with equal keys differ only in the seed.
    pub fn seedless_key(&self) -> String {
        // Without the output folder, unset keys and other backbones' keys (see
        // `comparable_config`), so that runs written before those were left out still match.
        let mut c = crate::config::comparable_config(&self.config);
        if let Some(m) = c.as_mapping_mut() {
            m.remove("seed");
        }
        serde_yaml::to_string(&c).unwrap_or_default()
    }
}

/// Read an `accuracy_matrix.csv` (percent values, an `init` row, then one row per finished task)
/// back into fractions. Sample counts are not in the file, so `counts` is empty.
pub fn read_matrix(path: &Path) -> Result<crate::metrics::AccuracyMatrix> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::DataFormat {
        path: path.to_path_buf(),
        message: m,
    };
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| bad("empty file".into()))?;
    let tasks = header.split(',').count().saturating_sub(1);
    let mut m = crate::metrics::AccuracyMatrix::default();
    for (n, line) in lines.enumerate() {
        let mut cells = line.split(',');
        let label = cells.next().unwrap_or_default();
        let vals = cells
            .map(|c| c.trim().parse::<f64>().map(|v| v / 100.0))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("line {}: {e}", n + 2)))?;
        if vals.len() != tasks {
            return Err(bad(format!(
                "line {}: {} values for {tasks} tasks",
                n + 2,
                vals.len()
            )));
        }
        if label == "init" {
            m.init = vals;
        } else {
            m.rows.push(vals);
        }
    }
    if m.init.len() != tasks {
        return Err(bad("missing the `init` row".into()));
    }
    Ok(m)
}

/// Every run directory (a folder holding summary.json and config.yaml) at or below `paths`,
/// skipping staging folders. Sorted by path.
pub fn find_runs(paths: &[PathBuf]) -> Result<Vec<RunRecord>> {
    let mut dirs = Vec::new();
    for p in paths {
        if !p.exists() {
            return Err(Error::Msg(format!(
                "{}: no such run directory",
                p.display()
            )));
        }
        collect(p, &mut dirs)?;
    }
    dirs.sort();
    dirs.dedup();
    dirs.into_iter().map(|d| read_run(&d)).collect()
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if p.join("summary.json").is_file() && p.join("config.yaml").is_file() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    if p.is_dir() {
        for e in fs::read_dir(p).map_err(|e| Error::io(p, e))? {
            let e = e.map_err(|e| Error::io(p, e))?;
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if e.path().is_dir() {
                collect(&e.path(), out)?;
            }
        }
    }
    Ok(())
}

fn read_run(dir: &Path) -> Result<RunRecord> {
    let read = |f: &str| fs::read_to_string(dir.join(f)).map_err(|e| Error::io(dir.join(f), e));
    let config = serde_yaml::from_str(&read("config.yaml")?).map_err(|e| Error::DataFormat {
        path: dir.join("config.yaml"),
        message: e.to_string(),
    })?;
    let summary = serde_json::from_str(&read("summary.json")?).map_err(|e| Error::DataFormat {
        path: dir.join("summary.json"),
        message: e.to_string(),
    })?;
    Ok(RunRecord {
        dir: dir.to_path_buf(),
        config,
        summary,
    })
}

/// Mean, sample standard deviation and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(xs: &[f64]) -> Option<Stat> {
        if xs.is_empty() {
            return None;
        }
        let n = xs.len();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Stat { mean, std, n })
    }
}

/// One row of the comparison: a group of runs that differ only in the seed (or share the
/// `--by` value).
#[derive(Debug, Clone)]
pub struct GroupSummary {
    pub label: String,
    pub runs: usize,
    pub failed: usize,
    pub seeds: Vec<u64>,
    pub avg_acc: Option<Stat>,
    pub forgetting: Option<Stat>,
    pub bwt: Option<Stat>,
    pub fwt: Option<Stat>,
    pub train_s: Option<Stat>,
    /// Mean accuracy on each task right after learning it (plasticity).
    pub learning_acc: Option<Stat>,
    /// The same metrics of the trained weights before consolidation, when the runs had a
    /// consolidator.
    pub raw: Option<RawSummary>,
    /// With `training.realtime`: the online accuracy over the whole stream.
    pub online_acc: Option<Stat>,
}

/// Final metrics of the raw (unconsolidated) matrix.
#[derive(Debug, Clone)]
pub struct RawSummary {
    pub avg_acc: Option<Stat>,
    pub forgetting: Option<Stat>,
    pub learning_acc: Option<Stat>,
}

/// Every leaf of a config as `dotted.key → value`, without the keys that never make two runs
/// compute different things (`seed` is what groups average over; `name` and `output` only say
/// where a run went).
fn leaves(config: &serde_yaml::Value) -> BTreeMap<String, String> {
    fn walk(v: &serde_yaml::Value, path: String, out: &mut BTreeMap<String, String>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    let k = k
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{k:?}"));
                    let p = if path.is_empty() {
                        k
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(v, p, out);
                }
            }
            serde_yaml::Value::String(s) => {
                out.insert(path, s.clone());
            }
            other => {
                let text = serde_yaml::to_string(other).unwrap_or_default();
                out.insert(path, text.trim().to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &crate::config::comparable_config(config),
        String::new(),
        &mut out,
    );
    out.retain(|k, _| k != "seed" && k != "name" && k != "output" && !k.starts_with("output."));
    out
}

/// The config keys whose values differ between `runs` (besides the seed, name and output).
pub fn varying_keys(runs: &[&RunRecord]) -> Vec<String> {
    let all: Vec<BTreeMap<String, String>> = runs.iter().map(|r| leaves(&r.config)).collect();
    let mut keys: Vec<String> = all.iter().flat_map(|m| m.keys().cloned()).collect();
    keys.sort();
    keys.dedup();
    keys.retain(|k| all.iter().any(|m| m.get(k) != all[0].get(k)));
    keys
}

/// Runs grouped by their seedless config, labelled by run name; or, with `by` keys, by the
/// values of those config keys, labelled `key=value, ...`. Runs that share the `by` values but
/// differ in anything else besides the seed are never pooled: they form separate groups whose
/// labels add the keys that tell them apart. A `by` key that no run has is an error naming the
/// keys that do vary. Labels are made unique; groups in first-seen order.
pub fn groups<'a>(
    runs: &'a [RunRecord],
    by: &[String],
) -> Result<Vec<(String, Vec<&'a RunRecord>)>> {
    if by.is_empty() {
        return Ok(unique_labels(seedless_groups(runs)));
    }
    let all: Vec<&RunRecord> = runs.iter().collect();
    for key in by {
        if runs.iter().all(|r| r.config_value(key).is_none()) {
            let vary = varying_keys(&all);
            return Err(Error::Msg(if vary.is_empty() {
                format!(
                    "--by {key}: no run's config has this key, and these runs differ in no key \
                     but the seed: compare them without --by"
                )
            } else {
                format!(
                    "--by {key}: no run's config has this key; the keys that vary across these \
                     runs are: {} (several: --by a,b)",
                    vary.join(", ")
                )
            }));
        }
    }
    let by_values = |r: &RunRecord| -> Vec<String> {
        by.iter()
            .map(|k| r.config_value(k).unwrap_or_else(|| "(unset)".into()))
            .collect()
    };
    let same_config = |r: &RunRecord| {
        let mut m = leaves(&r.config);
        m.retain(|k, _| !by.iter().any(|b| k == b || k.starts_with(&format!("{b}."))));
        format!("{m:?}")
    };
    // (by values, rest of the config) → runs.
    type Key = (Vec<String>, String);
    let mut keyed: Vec<(Key, Vec<&RunRecord>)> = Vec::new();
    for r in runs {
        let key = (by_values(r), same_config(r));
        match keyed.iter_mut().find(|(k, _)| *k == key) {
            Some((_, rs)) => rs.push(r),
            None => keyed.push((key, vec![r])),
        }
    }
    let mut out = Vec::new();
    for ((values, _), rs) in &keyed {
        let mut label: Vec<String> = by
            .iter()
            .zip(values)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        // Groups sharing these values but not the rest: name what sets this one apart.
        let siblings: Vec<&RunRecord> = keyed
            .iter()
            .filter(|((v, _), _)| v == values)
            .flat_map(|(_, rs)| rs.iter().copied())
            .collect();
        if siblings.len() > rs.len() {
            for k in varying_keys(&siblings) {
                if !by
                    .iter()
                    .any(|b| k == *b || k.starts_with(&format!("{b}.")))
                {
                    let v = rs[0].config_value(&k).unwrap_or_else(|| "(unset)".into());
                    label.push(format!("{k}={v}"));
                }
            }
        }
        out.push((label.join(", "), rs.clone()));
    }
    Ok(unique_labels(out))
}

fn seedless_groups(runs: &[RunRecord]) -> Vec<(String, Vec<&RunRecord>)> {
    let mut keyed: BTreeMap<String, usize> = BTreeMap::new();
    let mut out: Vec<(String, Vec<&RunRecord>)> = Vec::new();
    for r in runs {
        let key = r.seedless_key();
        let label = r.config_value("name").unwrap_or_else(|| "?".into());
        match keyed.get(&key) {
            Some(&i) => out[i].1.push(r),
            None => {
                keyed.insert(key, out.len());
                out.push((label, vec![r]));
            }
        }
    }
    out
}

fn unique_labels<T>(mut out: Vec<(String, T)>) -> Vec<(String, T)> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (label, _) in &mut out {
        let c = seen.entry(label.clone()).or_insert(0);
        *c += 1;
        if *c > 1 {
            *label = format!("{label} ({c})");
        }
    }
    out
}

/// Group runs (see [`groups`]) and summarise each group over its completed runs. Sorted by mean
/// average accuracy, best first.
pub fn compare(runs: &[RunRecord], by: &[String]) -> Result<Vec<GroupSummary>> {
    let mut rows: Vec<GroupSummary> = groups(runs, by)?
        .into_iter()
        .map(|(label, rs)| {
            let ok: Vec<&&RunRecord> = rs.iter().filter(|r| r.completed()).collect();
            let stat = |k: &str| {
                Stat::of(
                    &ok.iter()
                        .filter_map(|r| r.final_metric(k))
                        .collect::<Vec<_>>(),
                )
            };
            let raw_stat = |k: &str| {
                Stat::of(
                    &ok.iter()
                        .filter_map(|r| r.final_raw_metric(k))
                        .collect::<Vec<_>>(),
                )
            };
            let raw = ok
                .iter()
                .any(|r| r.summary.get("final_raw").is_some())
                .then(|| RawSummary {
                    avg_acc: raw_stat("avg_acc"),
                    forgetting: raw_stat("forgetting"),
                    learning_acc: raw_stat("learning_acc"),
                });
            let mut seeds: Vec<u64> = ok
                .iter()
                .filter_map(|r| r.summary["seed"].as_u64())
                .collect();
            seeds.sort_unstable();
            GroupSummary {
                label,
                runs: rs.len(),
                failed: rs.len() - ok.len(),
                seeds,
                avg_acc: stat("avg_acc"),
                forgetting: stat("forgetting"),
                bwt: stat("bwt"),
                fwt: stat("fwt"),
                learning_acc: stat("learning_acc"),
                raw,
                online_acc: Stat::of(
                    &ok.iter()
                        .filter_map(|r| r.summary["realtime"]["online_acc"].as_f64())
                        .collect::<Vec<_>>(),
                ),
                train_s: Stat::of(
                    &ok.iter()
                        .filter_map(|r| r.summary["train_s"].as_f64())
                        .collect::<Vec<_>>(),
                ),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        let m = |g: &GroupSummary| g.avg_acc.map(|s| s.mean).unwrap_or(f64::NEG_INFINITY);
        m(b).total_cmp(&m(a)).then_with(|| a.label.cmp(&b.label))
    });
    Ok(rows)
}

/// The comparison as a Markdown (`md`) or CSV table; accuracies in percent. When any group ran
/// with a consolidator, the table gains the learning accuracy and the raw (before consolidation)
/// average accuracy, forgetting and learning accuracy.
pub fn format_table(rows: &[GroupSummary], csv: bool) -> String {
    let pct = |s: &Option<Stat>| match s {
        Some(s) if csv => format!("{:.4},{:.4}", s.mean * 100.0, s.std * 100.0),
        Some(s) => format!("{:.2} ± {:.2}", s.mean * 100.0, s.std * 100.0),
        None if csv => ",".into(),
        None => "n/a".into(),
    };
    let secs = |s: &Option<Stat>| match s {
        Some(s) if csv => format!("{:.3}", s.mean),
        Some(s) => format!("{:.1}", s.mean),
        None => String::new(),
    };
    let with_raw = rows.iter().any(|r| r.raw.is_some());
    let raw_cells = |r: &GroupSummary| -> Vec<String> {
        let none = RawSummary {
            avg_acc: None,
            forgetting: None,
            learning_acc: None,
        };
        let raw = r.raw.as_ref().unwrap_or(&none);
        vec![
            pct(&r.learning_acc),
            pct(&raw.avg_acc),
            pct(&raw.forgetting),
            pct(&raw.learning_acc),
        ]
    };
    let with_online = rows.iter().any(|r| r.online_acc.is_some());
    let sep = if csv { "," } else { " | " };
    let mut out = String::new();
    if csv {
        out.push_str("run,n,failed,avg_acc,avg_acc_std,forgetting,forgetting_std,bwt,bwt_std,fwt,fwt_std,train_s");
        if with_raw {
            out.push_str(",learning_acc,learning_acc_std,avg_acc_raw,avg_acc_raw_std,forgetting_raw,forgetting_raw_std,learning_acc_raw,learning_acc_raw_std");
        }
        if with_online {
            out.push_str(",online_acc,online_acc_std");
        }
        out.push('\n');
        for r in rows {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{}",
                r.label.replace(',', ";"),
                r.seeds.len(),
                r.failed,
                pct(&r.avg_acc),
                pct(&r.forgetting),
                pct(&r.bwt),
                pct(&r.fwt),
                secs(&r.train_s)
            ));
            if with_raw {
                out.push_str(sep);
                out.push_str(&raw_cells(r).join(sep));
            }
            if with_online {
                out.push_str(sep);
                out.push_str(&pct(&r.online_acc));
            }
            out.push('\n');
        }
    } else {
        out.push_str("| run | n | avg acc (%) | forgetting (%) | BWT (%) | FWT (%) | train s |");
        let mut rule = String::from("|---|---|---|---|---|---|---|");
        if with_raw {
            out.push_str(
                " learning acc (%) | raw avg acc (%) | raw forgetting (%) | raw learning acc (%) |",
            );
            rule.push_str("---|---|---|---|");
        }
        if with_online {
            out.push_str(" online acc (%) |");
            rule.push_str("---|");
        }
        out.push('\n');
        out.push_str(&rule);
        out.push('\n');
        for r in rows {
            let n = if r.failed > 0 {
                format!("{} ({} failed)", r.seeds.len(), r.failed)
            } else {
                r.seeds.len().to_string()
            };
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.label,
                n,
                pct(&r.avg_acc),
                pct(&r.forgetting),
                pct(&r.bwt),
                pct(&r.fwt),
                secs(&r.train_s)
            ));
            if with_raw {
                out.push(' ');
                out.push_str(&raw_cells(r).join(sep));
                out.push_str(" |");
            }
            if with_online {
                out.push_str(&format!(" {} |", pct(&r.online_acc)));
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(root: &Path, name: &str, seed: u64, lr: f64, acc: f64, status: &str) {
        let d = root.join(name).join(format!("seed-{seed}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("config.yaml"),
            format!(
                "name: {name}\nseed: {seed}\noptimizer:\n  lr: {lr}\nalgorithm:\n  name: {name}\n"
            ),
        )
        .unwrap();
        let s = serde_json::json!({"status": status, "seed": seed, "train_s": 2.0,
            "final": {"avg_acc": acc, "forgetting": 0.1, "bwt": -0.1, "fwt": null}});
        fs::write(d.join("summary.json"), s.to_string()).unwrap();
    }

    #[test]
    fn groups_by_seedless_config_with_mean_and_sample_std() {
        let tmp = tempfile::tempdir().unwrap();
        fake(tmp.path(), "a", 0, 0.1, 0.5, "completed");
        fake(tmp.path(), "a", 1, 0.1, 0.7, "completed");
        fake(tmp.path(), "a", 2, 0.1, 0.9, "failed: loss became NaN");
        fake(tmp.path(), "b", 0, 0.1, 0.8, "completed");
        // A staging folder is ignored.
        fs::create_dir_all(tmp.path().join("b/.seed-1.partial")).unwrap();
        let runs = find_runs(&[tmp.path().to_path_buf()]).unwrap();
        assert_eq!(runs.len(), 4);
        let rows = compare(&runs, &[]).unwrap();
        assert_eq!(rows[0].label, "b");
        let a = &rows[1];
        assert_eq!((a.runs, a.failed, a.seeds.clone()), (3, 1, vec![0, 1]));
        let s = a.avg_acc.unwrap();
        assert!(
            (s.mean - 0.6).abs() < 1e-12 && (s.std - 0.02f64.sqrt()).abs() < 1e-12,
            "{s:?}"
        );
        assert!(a.fwt.is_none());
        let md = format_table(&rows, false);
        assert!(md.contains("| a | 2 (1 failed) | 60.00 ± 14.14 |"), "{md}");
        let csv = format_table(&rows, true);
        assert!(
            csv.lines()
                .nth(2)
                .unwrap()
                .starts_with("a,2,1,60.0000,14.1421,"),
            "{csv}"
        );
    }

    #[test]
    fn matrix_csv_round_trips() {
        let m = crate::metrics::AccuracyMatrix {
            init: vec![0.1, 0.2],
            rows: vec![vec![0.9, 0.05], vec![0.4, 0.8]],
            counts: vec![],
        };
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("m.csv");
        fs::write(&p, m.to_csv()).unwrap();
        let back = read_matrix(&p).unwrap();
        assert_eq!(back.rows.len(), 2);
        for (a, b) in back.rows.iter().flatten().zip(m.rows.iter().flatten()) {
            assert!((a - b).abs() < 1e-9);
        }
        fs::write(&p, "after_task,task_1\n1,50.0\n").unwrap();
        assert!(read_matrix(&p).unwrap_err().to_string().contains("init"));
    }

    #[test]
    fn realtime_runs_add_an_online_accuracy_column() {
        let tmp = tempfile::tempdir().unwrap();
        fake(tmp.path(), "plain", 0, 0.1, 0.5, "completed");
        for (seed, online) in [(0, 0.8), (1, 0.9)] {
            fake(tmp.path(), "rt", seed, 0.1, 0.6, "completed");
            let d = tmp.path().join(format!("rt/seed-{seed}/summary.json"));
            let mut s: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&d).unwrap()).unwrap();
            s["realtime"] = serde_json::json!({ "online_acc": online });
            fs::write(&d, s.to_string()).unwrap();
        }
        let rows = compare(&find_runs(&[tmp.path().to_path_buf()]).unwrap(), &[]).unwrap();
        let md = format_table(&rows, false);
        assert!(
            md.lines().next().unwrap().ends_with(" online acc (%) |"),
            "{md}"
        );
        // Mean and sample std of 80 % and 90 %.
        assert!(md.contains("| 85.00 ± 7.07 |"), "{md}");
        assert!(
            md.contains("| plain | 1 | 50.00 ± 0.00 |") && md.contains("n/a |"),
            "{md}"
        );
        let csv = format_table(&rows, true);
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .ends_with(",online_acc,online_acc_std"),
            "{csv}"
        );
    }

    #[test]
    fn runs_with_a_consolidator_add_raw_columns() {
        let tmp = tempfile::tempdir().unwrap();
        fake(tmp.path(), "plain", 0, 0.1, 0.5, "completed");
        fake(tmp.path(), "cons", 0, 0.1, 0.6, "completed");
        let d = tmp.path().join("cons/seed-0/summary.json");
        let mut s: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&d).unwrap()).unwrap();
        s["final"]["learning_acc"] = serde_json::json!(0.9);
        s["final_raw"] =
            serde_json::json!({"avg_acc": 0.4, "forgetting": 0.3, "learning_acc": 0.95});
        fs::write(&d, s.to_string()).unwrap();
        let rows = compare(&find_runs(&[tmp.path().to_path_buf()]).unwrap(), &[]).unwrap();
        let md = format_table(&rows, false);
        assert!(md.contains("raw forgetting (%)"), "{md}");
        assert!(
            md.contains("| cons | 1 | 60.00 ± 0.00 | 10.00 ± 0.00 | -10.00 ± 0.00 | n/a | 2.0 | 90.00 ± 0.00 | 40.00 ± 0.00 | 30.00 ± 0.00 | 95.00 ± 0.00 |"),
            "{md}"
        );
        assert!(md.contains("| plain | 1 | 50.00 ± 0.00 |"), "{md}");
        let csv = format_table(&rows, true);
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .ends_with(",learning_acc_raw_std"),
            "{csv}"
        );
        assert!(
            csv.lines().nth(1).unwrap().ends_with(",95.0000,0.0000"),
            "{csv}"
        );
        // Without any consolidator the table is unchanged.
        let plain: Vec<GroupSummary> = rows.into_iter().filter(|r| r.raw.is_none()).collect();
        assert!(!format_table(&plain, false).contains("raw"));
    }

    #[test]
    fn by_keys_group_and_never_pool_runs_that_differ_in_more() {
        let tmp = tempfile::tempdir().unwrap();
        // `fake` sets algorithm.name to the run name: a and b differ in it, b and b2 do not.
        fake(tmp.path(), "a", 0, 0.1, 0.5, "completed");
        fake(tmp.path(), "b", 0, 0.1, 0.7, "completed");
        fake(tmp.path(), "b", 1, 0.1, 0.9, "completed");
        fake(tmp.path(), "c", 0, 0.2, 0.9, "completed");
        let runs = find_runs(&[tmp.path().to_path_buf()]).unwrap();
        let labels = |by: &[&str]| -> Vec<(String, usize)> {
            let by: Vec<String> = by.iter().map(|s| s.to_string()).collect();
            let mut v: Vec<(String, usize)> = compare(&runs, &by)
                .unwrap()
                .into_iter()
                .map(|r| (r.label, r.runs))
                .collect();
            v.sort();
            v
        };
        // lr 0.1 holds runs of two algorithms: two rows, each naming its algorithm.
        assert_eq!(
            labels(&["optimizer.lr"]),
            vec![
                ("optimizer.lr=0.1, algorithm.name=a".into(), 1),
                ("optimizer.lr=0.1, algorithm.name=b".into(), 2),
                ("optimizer.lr=0.2".into(), 1),
            ]
        );
        // Several keys.
        assert_eq!(
            labels(&["algorithm.name", "optimizer.lr"]),
            vec![
                ("algorithm.name=a, optimizer.lr=0.1".into(), 1),
                ("algorithm.name=b, optimizer.lr=0.1".into(), 2),
                ("algorithm.name=c, optimizer.lr=0.2".into(), 1),
            ]
        );
        // A key no run has (misspelt, or two keys joined into one) names the keys that vary.
        let e = compare(&runs, &["algorithm.nam".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("algorithm.name, optimizer.lr"), "{e}");
    }
}
