//! Learning-rate schedules within a task: constant, step (multi-step) and cosine.

use crate::config::Schedule;

#[derive(Debug, Clone)]
pub struct LrSchedule {
    base: f32,
    schedule: Schedule,
}

impl LrSchedule {
    pub fn new(base: f32, schedule: Schedule) -> Self {
        Self { base, schedule }
    }

    /// Learning rate at `step` of `total` steps of a task, during epoch `epoch` (0-based).
    pub fn lr(&self, epoch: usize, step: usize, total: usize) -> f32 {
        match &self.schedule {
            Schedule::Constant => self.base,
            Schedule::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| epoch >= m).count();
                self.base * gamma.powi(passed as i32)
            }
            Schedule::Cosine { min_lr } => {
                let frac = if total <= 1 {
                    0.0
                } else {
                    step as f32 / (total - 1) as f32
                };
                min_lr + 0.5 * (self.base - min_lr) * (1.0 + (std::f32::consts::PI * frac).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_and_cosine_shapes() {
        let s = LrSchedule::new(
            1.0,
            Schedule::Step {
                milestones: vec![2, 4],
                gamma: 0.1,
            },
        );
        assert_eq!(s.lr(0, 0, 10), 1.0);
        assert!((s.lr(2, 0, 10) - 0.1).abs() < 1e-7);
        assert!((s.lr(5, 0, 10) - 0.01).abs() < 1e-7);
        let c = LrSchedule::new(1.0, Schedule::Cosine { min_lr: 0.0 });
        assert_eq!(c.lr(0, 0, 11), 1.0);
        assert!((c.lr(0, 5, 11) - 0.5).abs() < 1e-6);
        assert!(c.lr(0, 10, 11).abs() < 1e-6);
    }
}
