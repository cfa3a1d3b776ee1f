//! Terminal output: progress bars on a terminal, plain lines otherwise, and the final report.

use std::fmt::Write as _;

use indicatif::{ProgressBar, ProgressStyle};
use sequel_core::outcome::TaskTimes;
use sequel_core::{Progress, RunOutcome};

pub struct ProgressView {
    interactive: bool,
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl ProgressView {
    pub fn new(interactive: bool, quiet: bool) -> Self {
        Self {
            interactive,
            quiet,
            bar: None,
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Progress for ProgressView {
    fn task_start(&mut self, task: usize, tasks: usize, steps: usize) {
        if self.quiet {
            return;
        }
        if self.interactive {
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "task {msg} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("{}/{}", task + 1, tasks));
            self.bar = Some(bar);
        } else {
            eprintln!("task {}/{}: training {} steps", task + 1, tasks, steps);
        }
    }

    fn step(&mut self, _step: usize, _loss: f32) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }

    fn task_end(&mut self, task: usize, row: &[f64], times: &TaskTimes) {
        self.finish();
        if self.quiet {
            return;
        }
        let seen: Vec<f64> = row[..=task].to_vec();
        let avg = seen.iter().sum::<f64>() / seen.len() as f64;
        eprintln!(
            "task {} done: avg acc on seen tasks {:.2}% (train {:.1}s, eval {:.1}s)",
            task + 1,
            avg * 100.0,
            times.train_s,
            times.eval_s
        );
    }
}

/// The accuracy matrix and final metrics as a text table.
pub fn report(outcome: &RunOutcome) -> String {
    let m = &outcome.matrix;
    let t = m.num_tasks();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\naccuracy matrix (%): row = after training task i, column = task j"
    );
    let _ = write!(s, "{:>8}", "");
    for j in 1..=t {
        let _ = write!(s, "{:>8}", format!("T{j}"));
    }
    s.push('\n');
    let mut row = |name: String, vals: &[f64]| {
        let _ = write!(s, "{name:>8}");
        for v in vals {
            let _ = write!(s, "{:>8.2}", v * 100.0);
        }
        s.push('\n');
    };
    row("init".into(), &m.init);
    for (i, r) in m.rows.iter().enumerate() {
        row(format!("{}", i + 1), r);
    }
    if !m.rows.is_empty() {
        let f = m.metrics_after(m.rows.len());
        let pct = |v: Option<f64>| {
            v.map(|x| format!("{:.2}", x * 100.0))
                .unwrap_or_else(|| "n/a".into())
        };
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "average accuracy   {:.2}  (pooled {:.2})",
            f.avg_acc * 100.0,
            f.avg_acc_pooled * 100.0
        );
        let _ = writeln!(s, "forgetting         {}", pct(f.forgetting));
        let _ = writeln!(s, "BWT                {}", pct(f.bwt));
        let _ = writeln!(s, "FWT                {}", pct(f.fwt));
        let _ = writeln!(s, "learning accuracy  {:.2}", f.learning_acc * 100.0);
        if let Some(raw) = outcome.raw.as_ref().filter(|r| !r.rows.is_empty()) {
            let r = raw.metrics_after(raw.rows.len());
            let _ = writeln!(
                s,
                "before consolidation (accuracy_matrix_raw.csv): average accuracy {:.2}, \
                 forgetting {}, learning accuracy {:.2}",
                r.avg_acc * 100.0,
                pct(r.forgetting),
                r.learning_acc * 100.0
            );
        }
        if !outcome.realtime.is_empty() {
            let r = &outcome.realtime;
            let trained: usize = r.iter().map(|t| t.trained).sum();
            let batches: usize = r.iter().map(|t| t.batches).sum();
            let _ = writeln!(
                s,
                "online accuracy    {}  (real-time: trained on {trained} of {batches} batches)",
                pct(outcome.online_acc(r.len()))
            );
        }
        let train: f64 = outcome.times.iter().map(|x| x.train_s).sum();
        let eval: f64 = outcome.init_eval_s + outcome.times.iter().map(|x| x.eval_s).sum::<f64>();
        let rss = outcome
            .times
            .last()
            .and_then(|x| x.peak_rss_mb)
            .map(|v| format!("{v:.0} MiB"))
            .unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            s,
            "time               train {train:.1}s, eval {eval:.1}s; peak RSS {rss}"
        );
    }
    s
}
