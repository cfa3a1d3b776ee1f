//! Typed errors of sequel-core. Each variant carries what a user needs to fix the problem.

use std::path::PathBuf;

/// Every fallible operation in sequel-core returns this error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file or override is invalid. `path` is the key path (e.g. `benchmark.tasks`).
    #[error("{file}: {path}: {message}")]
    Config {
        file: String,
        path: String,
        message: String,
    },

    /// A dataset could not be found in any search location.
    #[error(
        "dataset `{dataset}` not found: expected files {expected} in one of {searched}; {hint}"
    )]
    DatasetNotFound {
        dataset: String,
        expected: String,
        searched: String,
        hint: String,
    },

    /// A data file exists but is malformed (bad magic, truncated, label out of range).
    #[error("{}: {message}", path.display())]
    DataFormat { path: PathBuf, message: String },

    /// The benchmark cannot be built from the dataset as configured.
    #[error("{0}")]
    Benchmark(String),

    /// Training diverged: the loss stopped being finite.
    #[error("loss became {value} at {}, epoch {epoch}, step {step}; lower optimizer.lr or check the data", task_label(*task))]
    NonFiniteLoss {
        value: f32,
        task: usize,
        epoch: usize,
        step: usize,
    },

    /// Training diverged: the weights stopped being finite after a task's last step.
    #[error("weights became non-finite during {}; lower optimizer.lr or check the data", task_label(*task))]
    NonFiniteWeights { task: usize },

    /// Training stopped before the last task, on request (`--stop-after-task`, Ctrl-C); the run
    /// can be continued from its last checkpoint.
    #[error("{0}")]
    Stopped(String),

    /// An unknown name was given for a registered component.
    #[error("unknown {kind} `{name}`; valid: {valid}")]
    UnknownName {
        kind: &'static str,
        name: String,
        valid: String,
    },

    /// An I/O operation failed on a named path.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Errors from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Anything else, with a message that says what went wrong.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// Prefix an error that a config change fixes with the config file `origin` (constructors and
    /// stream checks report the key without knowing the file); other errors pass unchanged.
    pub fn in_file(self, origin: &str) -> Self {
        match self {
            Error::Config {
                file,
                path,
                message,
            } if file.is_empty() => Error::Config {
                file: origin.to_string(),
                path,
                message,
            },
            Error::UnknownName { .. } | Error::Benchmark(_) => {
                Error::Msg(format!("{origin}: {self}"))
            }
            Error::Msg(m) if m.starts_with("model.") || m.starts_with("algorithm.") => {
                Error::Msg(format!("{origin}: {m}"))
            }
            e => e,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Stream tasks are numbered from 1 in messages; 0 is the pre-training task of
/// `benchmark.base_classes`.
fn task_label(task: usize) -> String {
    if task == 0 {
        "pre-training (benchmark.base_classes)".to_string()
    } else {
        format!("task {task}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_messages_name_the_pre_training_task_by_name() {
        let pre = Error::NonFiniteWeights { task: 0 }.to_string();
        assert!(
            pre.contains("during pre-training (benchmark.base_classes)"),
            "{pre}"
        );
        let stream = Error::NonFiniteLoss {
            value: f32::NAN,
            task: 2,
            epoch: 1,
            step: 3,
        }
        .to_string();
        assert!(
            stream.starts_with("loss became NaN at task 2, epoch 1"),
            "{stream}"
        );
    }
}
