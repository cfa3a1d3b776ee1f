//! The datasets and backbones a config can name (`benchmark.dataset`, `model.kind`).
//!
//! [`Sources::builtin`] holds the library's own; a user crate adds its datasets and backbones to
//! the same lists (through `sequel_algos::Registry`, next to its algorithms), so `run`, `validate`,
//! `sweep` and `bench` know them without a fork. A dataset is a loader returning the in-memory
//! [`Dataset`] (both splits, the class count, channel statistics); the task stream is built from it
//! by the benchmark config like any other. A backbone is a config type ([`BackboneConfig`]) whose
//! fields are its YAML keys under `model.options`, and which builds a [`Model`].

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use serde::{de::DeserializeOwned, Serialize};
use serde_yaml::{Mapping, Value};

use crate::config::{closest, from_value, ExperimentConfig, ModelConfig};
use crate::data::{discovery, Dataset};
use crate::error::{Error, Result};
use crate::model::{build_model_for, Model};
use crate::rng::{SeededRng, Stream};

/// What a backbone is built for.
#[derive(Debug, Clone, Copy)]
pub struct BackboneSpec<'a> {
    /// Input shape `[C, H, W]`.
    pub input: [usize; 3],
    /// Output units of each head: one entry for a shared head, one per task for multi-head
    /// task-IL ([`crate::data::TaskStream::head_sizes`]).
    pub heads: &'a [usize],
    /// The stream's tasks (with a pre-training task, it counts too): `model.lora` gives each
    /// hidden layer one adapter per task.
    pub tasks: usize,
    /// The experiment seed: draw anything random at forward time (dropout) from a stream of it.
    pub seed: u64,
    pub device: &'a Device,
}

/// A backbone a config names in `model.kind`: its fields are the keys of `model.options`
/// (`serde(deny_unknown_fields, default)` and one `impl Default`, as for algorithms).
pub trait BackboneConfig: Serialize + DeserializeOwned + Default + 'static {
    /// `model.kind`.
    const NAME: &'static str;
    /// One line for `sequel list`.
    const SUMMARY: &'static str;
    /// Build the model, drawing every initial weight from `init` (the experiment seed's `Init`
    /// stream), so that the same seed gives the same network.
    fn build(self, spec: &BackboneSpec, init: &mut SeededRng) -> Result<Box<dyn Model>>;
}

type LoadFn = dyn Fn(Option<&Path>) -> Result<Dataset> + Send + Sync;
type BuildFn = dyn Fn(&ModelConfig, &BackboneSpec, &mut SeededRng, &str) -> Result<Box<dyn Model>>
    + Send
    + Sync;
/// Parse `model.options` and return them with every default filled in.
type ResolveFn = dyn Fn(&Mapping, &str) -> Result<Mapping> + Send + Sync;

struct Entry<F: ?Sized> {
    name: String,
    summary: String,
    make: Arc<F>,
    /// Backbones only: how their options resolve (none for the built-in ones).
    resolve: Option<Arc<ResolveFn>>,
}

impl<F: ?Sized> Clone for Entry<F> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            summary: self.summary.clone(),
            make: self.make.clone(),
            resolve: self.resolve.clone(),
        }
    }
}

/// The datasets and backbones known to a run. Cheap to clone.
#[derive(Clone)]
pub struct Sources {
    datasets: Vec<Entry<LoadFn>>,
    backbones: Vec<Entry<BuildFn>>,
}

const BUILTIN_DATASETS: &[(&str, &str)] = &[
    (
        "fmnist-mini",
        "embedded Fashion-MNIST subset, 300 train + 100 test per class",
    ),
    (
        "fashion-mnist",
        "Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
    ),
    ("mnist", "MNIST IDX files"),
    ("cifar10", "CIFAR-10 binary version"),
    ("cifar100", "CIFAR-100 binary version"),
];

const BUILTIN_BACKBONES: &[(&str, &str)] = &[
    (
        "mlp",
        "multi-layer perceptron (model.hidden, model.activation, model.dropout)",
    ),
    (
        "cnn",
        "conv3x3-relu-maxpool blocks + linear head (model.channels)",
    ),
    (
        "resnet18",
        "reduced ResNet-18 without stem pooling (model.width)",
    ),
];

impl Sources {
    /// No dataset, no backbone.
    pub fn empty() -> Self {
        Self {
            datasets: Vec::new(),
            backbones: Vec::new(),
        }
    }

    /// The library's datasets (found on disk as [`discovery`] describes) and backbones.
    pub fn builtin() -> Self {
        let mut s = Self::empty();
        for &(name, summary) in BUILTIN_DATASETS {
            s.add_dataset(name, summary, move |dir| discovery::load_dataset(name, dir));
        }
        for &(name, summary) in BUILTIN_BACKBONES {
            s.backbones.push(Entry {
                name: name.into(),
                summary: summary.into(),
                make: Arc::new(|cfg, spec, _init, _origin| {
                    build_model_for(
                        cfg,
                        spec.input,
                        spec.heads,
                        spec.tasks,
                        spec.seed,
                        spec.device,
                    )
                }),
                resolve: None,
            });
        }
        s
    }

    /// Register dataset `name`; `load` gets the config's `benchmark.data_dir` (if given). A
    /// second registration under the same name replaces the first.
    pub fn add_dataset(
        &mut self,
        name: &str,
        summary: &str,
        load: impl Fn(Option<&Path>) -> Result<Dataset> + Send + Sync + 'static,
    ) {
        self.datasets.retain(|e| e.name != name);
        self.datasets.push(Entry {
            name: name.into(),
            summary: summary.into(),
            make: Arc::new(load),
            resolve: None,
        });
    }

    /// Register the backbone `C` describes (name, summary and keys come from `C`). Give it a name
    /// of its own: `mlp`, `cnn` and `resnet18` keep their built-in keys, so a backbone registered
    /// under one of them could not be given options.
    pub fn add_backbone<C: BackboneConfig>(&mut self) {
        self.backbones.retain(|e| e.name != C::NAME);
        self.backbones.push(Entry {
            name: C::NAME.into(),
            summary: C::SUMMARY.into(),
            make: Arc::new(|cfg, spec, init, origin| {
                let c: C =
                    from_value(Value::Mapping(cfg.options.clone()), origin, "model.options")?;
                c.build(spec, init)
            }),
            resolve: Some(Arc::new(|options, origin| {
                let c: C = from_value(Value::Mapping(options.clone()), origin, "model.options")?;
                match serde_yaml::to_value(c) {
                    Ok(Value::Mapping(m)) => Ok(m),
                    Ok(_) => Ok(Mapping::new()),
                    Err(e) => Err(Error::msg(e.to_string())),
                }
            })),
        });
    }

    /// `(name, summary)` of every dataset, in registration order.
    pub fn datasets(&self) -> Vec<(&str, &str)> {
        self.datasets
            .iter()
            .map(|e| (e.name.as_str(), e.summary.as_str()))
            .collect()
    }

    /// `(name, summary)` of every backbone, in registration order.
    pub fn backbones(&self) -> Vec<(&str, &str)> {
        self.backbones
            .iter()
            .map(|e| (e.name.as_str(), e.summary.as_str()))
            .collect()
    }

    /// Check that the config names a known dataset and backbone, and fill a registered
    /// backbone's `model.options` with its defaults (a key it does not know is an error) —
    /// without loading data or building the model.
    pub fn resolve(&self, cfg: &mut ExperimentConfig, origin: &str) -> Result<()> {
        let d = &cfg.benchmark.dataset;
        find(&self.datasets, d, "dataset", origin, "benchmark.dataset")?;
        let backbone = find(
            &self.backbones,
            cfg.model.kind.name(),
            "backbone",
            origin,
            "model.kind",
        )?;
        if let crate::config::ModelKind::Other(name) = &cfg.model.kind {
            // The built-in backbones' keys mean nothing to a registered one: refuse a set one
            // rather than drop it without a word.
            let (m, d) = (&cfg.model, ModelConfig::default());
            let set = [
                ("hidden", m.hidden != d.hidden),
                ("activation", m.activation != d.activation),
                ("dropout", m.dropout != d.dropout),
                ("channels", m.channels != d.channels),
                ("width", m.width != d.width),
            ];
            if let Some((key, _)) = set.iter().find(|(_, s)| *s) {
                return Err(Error::Config {
                    file: origin.to_string(),
                    path: format!("model.{key}"),
                    message: format!(
                        "the backbone `{name}` does not read it; its own keys go under model.options"
                    ),
                });
            }
        }
        if let Some(resolve) = &backbone.resolve {
            cfg.model.options = resolve(&cfg.model.options, origin)?;
        }
        Ok(())
    }

    /// Load the dataset `benchmark.dataset` names.
    pub fn load_dataset(&self, name: &str, data_dir: Option<&Path>) -> Result<Dataset> {
        let e = self
            .datasets
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::UnknownName {
                kind: "dataset",
                name: name.to_string(),
                valid: names(&self.datasets),
            })?;
        (e.make)(data_dir)
    }

    /// Build the backbone `cfg` describes, with its weights drawn from `seed`'s `Init` stream,
    /// then loaded from `model.init_from` and frozen by `model.freeze` where the config says so
    /// (any backbone, registered ones included).
    pub fn build_model(
        &self,
        cfg: &ModelConfig,
        spec: &BackboneSpec,
        origin: &str,
    ) -> Result<Box<dyn Model>> {
        let e = find(
            &self.backbones,
            cfg.kind.name(),
            "backbone",
            origin,
            "model.kind",
        )?;
        let mut init = SeededRng::new(spec.seed, Stream::Init);
        let model = (e.make)(cfg, spec, &mut init, origin)?;
        crate::model::redraw(model.params(), cfg.init, &mut init)?;
        crate::model::pretrained::apply(model.as_ref(), cfg).map_err(|e| e.in_file(origin))?;
        Ok(model)
    }
}

impl Default for Sources {
    fn default() -> Self {
        Self::builtin()
    }
}

fn names<F: ?Sized>(entries: &[Entry<F>]) -> String {
    entries
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn find<'a, F: ?Sized>(
    entries: &'a [Entry<F>],
    name: &str,
    kind: &str,
    origin: &str,
    path: &str,
) -> Result<&'a Entry<F>> {
    entries.iter().find(|e| e.name == name).ok_or_else(|| {
        let all: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
        let hint = closest(name, &all)
            .map(|c| format!("did you mean `{c}`? "))
            .unwrap_or_default();
        Error::Config {
            file: origin.to_string(),
            path: path.to_string(),
            message: format!("unknown {kind} `{name}`; {hint}valid: {}", all.join(", ")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use serde::Deserialize;

    const CFG: &str =
        "name: t\nbenchmark: { dataset: fmnist-mini, kind: split, tasks: 5, scenario: class-il }\n";

    fn cfg(overrides: &[&str]) -> ExperimentConfig {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        parse_config(CFG, "t.yaml", &o).unwrap()
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Tiny {
        width: usize,
        gain: f64,
    }

    impl Default for Tiny {
        fn default() -> Self {
            Self {
                width: 3,
                gain: 0.5,
            }
        }
    }

    impl BackboneConfig for Tiny {
        const NAME: &'static str = "tiny";
        const SUMMARY: &'static str = "test backbone";
        fn build(self, spec: &BackboneSpec, _init: &mut SeededRng) -> Result<Box<dyn Model>> {
            let c = ModelConfig {
                hidden: vec![self.width],
                ..ModelConfig::default()
            };
            crate::model::build_model(&c, spec.input, spec.heads, spec.seed, spec.device)
        }
    }

    #[test]
    fn builtin_datasets_are_the_ones_discovery_loads() {
        let s = Sources::builtin();
        let names: Vec<&str> = s.datasets().iter().map(|d| d.0).collect();
        assert_eq!(names, discovery::DATASETS);
    }

    #[test]
    fn unknown_names_are_config_errors_with_a_suggestion() {
        let s = Sources::builtin();
        let e = s
            .resolve(&mut cfg(&["benchmark.dataset=fashion-mnst"]), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.yaml") && e.contains("benchmark.dataset"),
            "{e}"
        );
        assert!(e.contains("did you mean `fashion-mnist`"), "{e}");
        let e = s
            .resolve(&mut cfg(&["model.kind=resnet"]), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.kind") && e.contains("resnet18"), "{e}");
    }

    #[test]
    fn a_registered_backbone_resolves_its_options_and_builds() {
        let mut s = Sources::builtin();
        s.add_backbone::<Tiny>();
        let mut c = cfg(&["model.kind=tiny", "model.options={width: 7}"]);
        c.validate("t.yaml").unwrap();
        s.resolve(&mut c, "t.yaml").unwrap();
        assert_eq!(c.model.options.get("width"), Some(&Value::from(7)));
        assert_eq!(c.model.options.get("gain"), Some(&Value::from(0.5)));
        let dev = Device::Cpu;
        let spec = BackboneSpec {
            input: [1, 2, 2],
            heads: &[3],
            tasks: 1,
            seed: 0,
            device: &dev,
        };
        let m = s.build_model(&c.model, &spec, "t.yaml").unwrap();
        assert_eq!(m.params().iter().next().unwrap().var.dims(), &[7, 4]);

        let mut bad = cfg(&["model.kind=tiny", "model.options={widht: 7}"]);
        let e = s.resolve(&mut bad, "t.yaml").unwrap_err().to_string();
        assert!(e.contains("model.options") && e.contains("widht"), "{e}");
        // Built-in backbones take their keys from `model:` itself.
        let e = cfg(&["model.options={width: 7}"])
            .validate("t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.options"), "{e}");
    }

    #[test]
    fn xavier_draws_glorot_uniform_weights_zero_biases_and_keeps_batch_norm() {
        let dev = Device::Cpu;
        let build = |overrides: &[&str], input: [usize; 3], seed: u64| {
            let c = cfg(overrides);
            let spec = BackboneSpec {
                input,
                heads: &[10],
                tasks: 1,
                seed,
                device: &dev,
            };
            Sources::builtin()
                .build_model(&c.model, &spec, "t.yaml")
                .unwrap()
        };
        let values = |m: &dyn Model| -> Vec<(String, Vec<usize>, Vec<f32>)> {
            m.params()
                .iter()
                .map(|p| {
                    let v = p.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    (p.name.clone(), p.var.dims().to_vec(), v)
                })
                .collect()
        };
        let xavier = values(build(&["model.init=xavier"], [1, 28, 28], 0).as_ref());
        let pytorch = values(build(&[], [1, 28, 28], 0).as_ref());
        assert_eq!(
            xavier,
            values(build(&["model.init=xavier"], [1, 28, 28], 0).as_ref()),
            "seeded"
        );
        for ((name, dims, v), (_, _, d)) in xavier.iter().zip(&pytorch) {
            if dims.len() == 2 {
                let bound = (6.0 / (dims[0] + dims[1]) as f64).sqrt();
                assert!(v.iter().all(|&w| (w as f64).abs() <= bound), "{name}");
                // U(±b) has variance b²/3; thousands of draws put the sample within 10 %.
                let var = v.iter().map(|&w| (w as f64).powi(2)).sum::<f64>() / v.len() as f64;
                assert!(
                    (var / (bound * bound / 3.0) - 1.0).abs() < 0.1,
                    "{name}: {var}"
                );
                assert_ne!(v, d, "{name} is redrawn");
            } else {
                assert!(v.iter().all(|&b| b == 0.0), "{name}");
            }
        }
        // A ResNet: convolutions redrawn, batch norms as built (scale 1, shift 0, statistics).
        let o = ["model.init=xavier", "model.kind=resnet18", "model.width=4"];
        let (x, d) = (
            values(build(&o, [3, 8, 8], 1).as_ref()),
            values(build(&o[1..], [3, 8, 8], 1).as_ref()),
        );
        let mut convs = 0;
        for ((name, dims, v), (_, _, dv)) in x.iter().zip(&d) {
            if dims.len() == 4 {
                let field = dims[2] * dims[3];
                let bound = (6.0 / ((dims[0] + dims[1]) * field) as f64).sqrt();
                assert!(v.iter().all(|&w| (w as f64).abs() <= bound), "{name}");
                // The bound alone would pass for PyTorch's draw too (its bound is smaller
                // here): the variance tells the two apart, and the values must be new.
                if v.len() >= 1000 {
                    let var = v.iter().map(|&w| (w as f64).powi(2)).sum::<f64>() / v.len() as f64;
                    assert!(
                        (var / (bound * bound / 3.0) - 1.0).abs() < 0.1,
                        "{name}: {var}"
                    );
                }
                assert_ne!(v, dv, "{name} is redrawn");
                convs += 1;
            } else if dims.len() == 1 && !name.starts_with("head") {
                assert_eq!(v, dv, "{name}: batch norm untouched");
            }
        }
        assert!(convs > 10, "{convs}");
    }
}
