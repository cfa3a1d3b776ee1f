//! Continual-learning metrics over the accuracy matrix (definitions in docs/metrics.md).
//!
//! `R[i][j]` is the accuracy on task `j` after training on task `i` (both 1-based in the
//! formulas, 0-based in code); `b[j]` the accuracy of the untrained model. Metrics "after task i"
//! only look at rows `1..=i` and tasks `1..=i`, so the last row gives the usual final figures.

use serde::Serialize;

/// Accuracies in [0, 1] with the sample counts behind them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, serde::Deserialize)]
pub struct AccuracyMatrix {
    /// Accuracy of the untrained model on every task (`b`).
    pub init: Vec<f64>,
    /// `rows[i][j]` = accuracy on task j after training task i.
    pub rows: Vec<Vec<f64>>,
    /// Number of evaluation samples of each task (for pooled accuracy).
    pub counts: Vec<usize>,
}

/// Every metric after one task. Undefined values (e.g. forgetting after the first task) are `None`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskMetrics {
    /// 1-based task after which these are measured.
    pub task: usize,
    /// Mean over tasks seen so far of R[i][j] (Mammoth, GEM paper).
    pub avg_acc: f64,
    /// Correct / total over the samples of all seen tasks (Avalanche's stream accuracy).
    pub avg_acc_pooled: f64,
    /// Mean over k ≤ i of avg_acc after task k (iCaRL).
    pub avg_inc_acc: f64,
    /// Mean over j ≤ i of R[j][j] (accuracy right after learning each task).
    pub learning_acc: f64,
    /// Max-based forgetting over every earlier row, before task j was learned too (Mammoth).
    pub forgetting: Option<f64>,
    /// Chaudhry et al.'s (2018) forgetting: the max over the rows from the one that learned task
    /// j on. Differs from `forgetting` when a task scored higher before it was learned (task-IL,
    /// domain-IL).
    pub forgetting_chaudhry: Option<f64>,
    /// Backward transfer (Lopez-Paz & Ranzato, 2017).
    pub bwt: Option<f64>,
    /// Forward transfer (Lopez-Paz & Ranzato, 2017).
    pub fwt: Option<f64>,
}

impl AccuracyMatrix {
    pub fn num_tasks(&self) -> usize {
        self.init.len()
    }

    /// Metrics after task `i` (1-based). Panics if row `i` does not exist.
    pub fn metrics_after(&self, i: usize) -> TaskMetrics {
        assert!(i >= 1 && i <= self.rows.len(), "no row for task {i}");
        let r = |a: usize, b: usize| self.rows[a - 1][b - 1];
        let mean = |xs: &mut dyn Iterator<Item = f64>| {
            let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
            (n > 0).then(|| s / n as f64)
        };
        let avg_of_row = |k: usize| mean(&mut (1..=k).map(|j| r(k, j))).unwrap_or(0.0);
        let avg_acc = avg_of_row(i);
        let (correct, total) = (1..=i).fold((0.0, 0usize), |(c, n), j| {
            let cnt = self.counts.get(j - 1).copied().unwrap_or(0);
            (c + r(i, j) * cnt as f64, n + cnt)
        });
        let avg_acc_pooled = if total > 0 {
            correct / total as f64
        } else {
            avg_acc
        };
        let avg_inc_acc = mean(&mut (1..=i).map(avg_of_row)).unwrap_or(0.0);
        let learning_acc = mean(&mut (1..=i).map(|j| r(j, j))).unwrap_or(0.0);
        let forgetting = mean(&mut (1..i).map(|j| {
            let best = (1..i).map(|l| r(l, j)).fold(f64::NEG_INFINITY, f64::max);
            best - r(i, j)
        }));
        let forgetting_chaudhry = mean(&mut (1..i).map(|j| {
            let best = (j..i).map(|l| r(l, j)).fold(f64::NEG_INFINITY, f64::max);
            best - r(i, j)
        }));
        let bwt = mean(&mut (1..i).map(|j| r(i, j) - r(j, j)));
        let fwt = mean(&mut (2..=i).map(|j| r(j - 1, j) - self.init[j - 1]));
        TaskMetrics {
            task: i,
            avg_acc,
            avg_acc_pooled,
            avg_inc_acc,
            learning_acc,
            forgetting,
            forgetting_chaudhry,
            bwt,
            fwt,
        }
    }

    /// `accuracy_matrix.csv`: a header `after_task,task_1,...`, an `init` row, then one row per
    /// trained task; accuracies in percent with 4 decimals (fixed format keeps files byte-stable).
    pub fn to_csv(&self) -> String {
        let t = self.num_tasks();
        let mut s = String::from("after_task");
        for j in 1..=t {
            s.push_str(&format!(",task_{j}"));
        }
        s.push('\n');
        let mut row = |name: String, vals: &[f64]| {
            s.push_str(&name);
            for v in vals {
                s.push_str(&format!(",{:.4}", v * 100.0));
            }
            s.push('\n');
        };
        row("init".into(), &self.init);
        for (i, vals) in self.rows.iter().enumerate() {
            row((i + 1).to_string(), vals);
        }
        s
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made 3-task matrix with every metric worked out on paper.
    fn m() -> AccuracyMatrix {
        AccuracyMatrix {
            init: vec![0.1, 0.2, 0.3],
            rows: vec![
                vec![0.9, 0.25, 0.1],
                vec![0.6, 0.8, 0.35],
                vec![0.5, 0.7, 0.95],
            ],
            counts: vec![100, 100, 200],
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn final_metrics_match_hand_computation() {
        let f = m().metrics_after(3);
        assert!(close(f.avg_acc, (0.5 + 0.7 + 0.95) / 3.0));
        assert!(close(f.avg_acc_pooled, (50.0 + 70.0 + 190.0) / 400.0));
        // forgetting: task1 max(0.9, 0.6) − 0.5 = 0.4; task2 max(0.25, 0.8) − 0.7 = 0.1
        assert!(close(f.forgetting.unwrap(), 0.25));
        // Chaudhry: rows from the one that learned the task. Task 2 scored 0.25 before it was
        // learned (row 1), which only the first definition counts: task1 max(0.9, 0.6) − 0.5 =
        // 0.4; task2 max(0.8) − 0.7 = 0.1. Here equal; the next matrix tells them apart.
        assert!(close(f.forgetting_chaudhry.unwrap(), 0.25));
        // bwt: (0.5 − 0.9 + 0.7 − 0.8) / 2
        assert!(close(f.bwt.unwrap(), -0.25));
        // fwt: (R[1][2] − b2 + R[2][3] − b3) / 2 = (0.05 + 0.05) / 2
        assert!(close(f.fwt.unwrap(), 0.05));
        assert!(close(f.learning_acc, (0.9 + 0.8 + 0.95) / 3.0));
        let a1 = 0.9;
        let a2 = (0.6 + 0.8) / 2.0;
        let a3 = (0.5 + 0.7 + 0.95) / 3.0;
        assert!(close(f.avg_inc_acc, (a1 + a2 + a3) / 3.0));
    }

    #[test]
    fn chaudhry_forgetting_ignores_rows_before_the_task_was_learned() {
        // Task 2 (shared units, domain-IL-like) scores 0.9 before it is learned and 0.6 after.
        let m = AccuracyMatrix {
            init: vec![0.5, 0.5, 0.5],
            rows: vec![
                vec![0.8, 0.9, 0.5],
                vec![0.7, 0.6, 0.5],
                vec![0.7, 0.5, 0.9],
            ],
            counts: vec![],
        };
        let f = m.metrics_after(3);
        // max over rows 1–2: task1 0.8 − 0.7, task2 0.9 − 0.5.
        assert!(close(f.forgetting.unwrap(), (0.1 + 0.4) / 2.0));
        // from the learning row on: task1 max(0.8, 0.7) − 0.7, task2 0.6 − 0.5.
        assert!(close(f.forgetting_chaudhry.unwrap(), (0.1 + 0.1) / 2.0));
    }

    #[test]
    fn first_task_has_no_forgetting_bwt_or_fwt() {
        let f = m().metrics_after(1);
        assert_eq!((f.forgetting, f.bwt, f.fwt), (None, None, None));
        assert_eq!(f.forgetting_chaudhry, None);
        assert!(close(f.avg_acc, 0.9));
    }

    #[test]
    fn csv_has_init_row_and_fixed_format() {
        let csv = m().to_csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "after_task,task_1,task_2,task_3");
        assert_eq!(lines[1], "init,10.0000,20.0000,30.0000");
        assert_eq!(lines[3], "2,60.0000,80.0000,35.0000");
    }
}
