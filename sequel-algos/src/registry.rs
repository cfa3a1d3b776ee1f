//! Name → constructor registry for algorithms, consolidation strategies, datasets and backbones.
//!
//! The YAML keys of `algorithm:` are exactly the fields of the algorithm's config struct (plus
//! `name`), parsed with `deny_unknown_fields`, so a typo is an error that names the key; a method
//! with a replay memory also takes the shared memory keys ([`MemoryConfig`]), parsed here over its
//! own defaults. Each algorithm is added with one line, [`Registry::add`], from its
//! [`AlgorithmConfig`]; user crates do the same — no fork needed.
//!
//! `consolidation:` works the same way, except that the wiring keys every strategy shares
//! (`anchor`, `continue_from`, `evaluate`; [`Wiring`]) are taken out first and parsed here, with the
//! strategy's defaults ([`Consolidator::default_wiring`]); the strategy's own config sees the rest.
//! A key neither knows is still an error.

use sequel_core::config::{closest, from_value};
use sequel_core::{
    Algorithm, AlgorithmConfig, BackboneConfig, Consolidation, Consolidator, Error, MemoryConfig,
    Result, Sources, Wiring,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_yaml::{Mapping, Value};

type Build<T> = Box<dyn Fn(Value, &str) -> Result<(Box<T>, Value)> + Send + Sync>;

struct Entry<T: ?Sized> {
    name: String,
    summary: String,
    build: Build<T>,
    /// The section with every default filled in (the config reference is checked against it).
    defaults: Value,
}

/// Every algorithm, consolidation strategy, dataset and backbone the CLI can name.
pub struct Registry {
    algorithms: Vec<Entry<dyn Algorithm>>,
    consolidators: Vec<Entry<dyn Consolidator>>,
    sources: Sources,
}

fn typed<C, T: ?Sized>(
    section: &'static str,
    make: impl Fn(C) -> Result<Box<T>> + Send + Sync + 'static,
) -> Build<T>
where
    C: DeserializeOwned + Serialize,
{
    Box::new(move |params: Value, origin: &str| {
        let cfg: C = from_value(params, origin, section)?;
        let resolved = serde_yaml::to_value(&cfg).map_err(|e| Error::msg(e.to_string()))?;
        Ok((make(cfg).map_err(|e| e.in_file(origin))?, resolved))
    })
}

/// Parse an `algorithm:` section (without `name`) into `C`. A method with a replay memory has
/// the shared memory keys ([`MemoryConfig::KEYS`]) taken out first and parsed over its own
/// memory defaults; the rest must be `C`'s own keys.
fn parse_algorithm<C: AlgorithmConfig>(params: Value, origin: &str) -> Result<C> {
    let mut own = match params {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        other => return from_value(other, origin, "algorithm"),
    };
    let mut probe = C::default();
    let Some(defaults) = probe.memory().copied() else {
        return from_value(Value::Mapping(own), origin, "algorithm");
    };
    let mut given = Mapping::new();
    for key in MemoryConfig::KEYS {
        if let Some(v) = own.remove(key) {
            given.insert(key.into(), v);
        }
    }
    let mut cfg: C = from_value(Value::Mapping(own), origin, "algorithm")
        .map_err(|e| mention_shared_keys(e, &MemoryConfig::KEYS))?;
    let mut memory = match serde_yaml::to_value(defaults) {
        Ok(Value::Mapping(m)) => m,
        _ => return Err(Error::msg("cannot serialise the default memory config")),
    };
    memory.extend(given);
    if let Some(m) = cfg.memory() {
        *m = from_value(Value::Mapping(memory), origin, "algorithm")?;
    }
    Ok(cfg)
}

/// A config as YAML with every default filled in, the memory keys included.
fn resolved<C: AlgorithmConfig>(cfg: &mut C) -> Result<Value> {
    let mut v = serde_yaml::to_value(&*cfg).map_err(|e| Error::msg(e.to_string()))?;
    if let (Value::Mapping(m), Some(mem)) = (&mut v, cfg.memory()) {
        if let Ok(Value::Mapping(mm)) = serde_yaml::to_value(*mem) {
            m.extend(mm);
        }
    }
    Ok(v)
}

/// Split `{ name: x, ...params }` into the name and the remaining parameters.
fn split_spec(spec: &Value, origin: &str, section: &str) -> Result<(String, Value)> {
    let err = |message: String| Error::Config {
        file: origin.to_string(),
        path: section.to_string(),
        message,
    };
    let map = match spec {
        Value::Mapping(m) => m.clone(),
        Value::String(s) => {
            let mut m = Mapping::new();
            m.insert("name".into(), Value::String(s.clone()));
            m
        }
        _ => return Err(err("expected a mapping like `{ name: naive }`".into())),
    };
    let mut params = map;
    let name = match params.remove("name") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(err("`name` must be a string".into())),
        None => return Err(err("missing key `name`".into())),
    };
    Ok((name, Value::Mapping(params)))
}

fn lookup<'a, T: ?Sized>(
    entries: &'a [Entry<T>],
    name: &str,
    kind: &'static str,
    origin: &str,
    section: &str,
) -> Result<&'a Entry<T>> {
    entries.iter().find(|e| e.name == name).ok_or_else(|| {
        let mut names: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
        names.sort();
        let hint = closest(name, &names)
            .map(|c| format!("did you mean `{c}`? "))
            .unwrap_or_default();
        Error::Config {
            file: origin.to_string(),
            path: format!("{section}.name"),
            message: format!("unknown {kind} `{name}`; {hint}valid: {}", names.join(", ")),
        }
    })
}

fn with_name(name: &str, params: Value) -> Value {
    let mut m = Mapping::new();
    m.insert("name".into(), name.into());
    if let Value::Mapping(p) = params {
        m.extend(p);
    }
    Value::Mapping(m)
}

impl Registry {
    /// An empty registry.
    pub fn empty() -> Self {
        Self {
            algorithms: Vec::new(),
            consolidators: Vec::new(),
            sources: Sources::empty(),
        }
    }

    /// Every algorithm and strategy shipped with sequel-algos, and sequel-core's datasets and
    /// backbones.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.sources = Sources::builtin();
        r.add::<crate::naive::NaiveConfig>();
        r.add::<crate::joint::JointConfig>();
        r.add::<crate::ewc::EwcConfig>();
        r.add::<crate::ewc_online::OnlineEwcConfig>();
        r.add::<crate::si::SiConfig>();
        r.add::<crate::rwalk::RwalkConfig>();
        r.add::<crate::mas::MasConfig>();
        r.add::<crate::lwf::LwfConfig>();
        r.add::<crate::lwf_mc::LwfMcConfig>();
        r.add::<crate::er::ErConfig>();
        r.add::<crate::agem::AgemConfig>();
        r.add::<crate::gem::GemConfig>();
        r.add::<crate::der::DerConfig>();
        r.add::<crate::der::DerppConfig>();
        r.add::<crate::er_ace::ErAceConfig>();
        r.add::<crate::er_aml::ErAmlConfig>();
        r.add::<crate::mir::MirConfig>();
        r.add::<crate::xder::XderConfig>();
        r.add::<crate::cls_er::ClsErConfig>();
        r.add::<crate::bic::BicConfig>();
        r.add::<crate::lucir::LucirConfig>();
        r.add::<crate::icarl::IcarlConfig>();
        r.add::<crate::gdumb::GdumbConfig>();
        use crate::consolidation as c;
        fn boxed<T: Consolidator + 'static>(x: Result<T>) -> Result<Box<dyn Consolidator>> {
            Ok(Box::new(x?))
        }
        r.register_consolidator(
            "lines",
            "LiNeS: scale the task's update per layer, λ(ℓ) = α + β(ℓ−1)/(L−1)",
            |cfg| boxed(c::lines::strategy(cfg)),
        );
        r.register_consolidator(
            "average",
            "uniform average of the trained task models (model soup)",
            |cfg| boxed(c::average::strategy(cfg)),
        );
        r.register_consolidator(
            "ema",
            "exponential moving average of the task models, μ·θ̄ + (1−μ)·θ̂",
            |cfg| boxed(c::average::ema_strategy(cfg)),
        );
        r.register_consolidator(
            "task-arithmetic",
            "task arithmetic: anchor + λ·Σ task vectors",
            |cfg| boxed(c::task_arithmetic::strategy(cfg)),
        );
        r.register_consolidator(
            "ties",
            "TIES merging: trim to top-k %, elect signs, disjoint mean, λ",
            |cfg| boxed(c::ties::strategy(cfg)),
        );
        r.register_consolidator(
            "dare",
            "DARE: drop task-vector entries with rate p, rescale, then task arithmetic or TIES",
            |cfg| boxed(c::dare::strategy(cfg)),
        );
        r.register_consolidator(
            "magmax",
            "MagMax: per entry the largest-magnitude task vector, λ; trains on from the raw weights",
            |cfg| boxed(c::magmax::strategy(cfg)),
        );
        r
    }

    /// Register the algorithm that `C` describes and builds (its name, summary and defaults come
    /// from `C`; a second registration under the same name replaces the first).
    pub fn add<C: AlgorithmConfig>(&mut self) {
        let defaults = resolved(&mut C::default()).unwrap_or(Value::Null);
        self.algorithms.retain(|e| e.name != C::NAME);
        self.algorithms.push(Entry {
            name: C::NAME.to_string(),
            summary: C::SUMMARY.to_string(),
            build: Box::new(|params: Value, origin: &str| {
                let mut cfg = parse_algorithm::<C>(params, origin)?;
                let resolved = resolved(&mut cfg)?;
                Ok((cfg.build().map_err(|e| e.in_file(origin))?, resolved))
            }),
            defaults: with_name(C::NAME, defaults),
        });
    }

    /// Register dataset `name` for `benchmark.dataset`: `load` gets `benchmark.data_dir` and
    /// returns both splits in memory ([`sequel_core::data::Dataset`]); the stream (split,
    /// permuted, rotated; class-, task- or domain-IL) is built from it like any other.
    pub fn add_dataset(
        &mut self,
        name: &str,
        summary: &str,
        load: impl Fn(Option<&std::path::Path>) -> Result<sequel_core::data::Dataset>
            + Send
            + Sync
            + 'static,
    ) {
        self.sources.add_dataset(name, summary, load);
    }

    /// Register the backbone `C` describes for `model.kind`; its keys go under `model.options`.
    pub fn add_backbone<C: BackboneConfig>(&mut self) {
        self.sources.add_backbone::<C>();
    }

    /// The datasets and backbones configs can name.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// The resolved defaults of algorithm `name`'s section (`name` included), if registered.
    pub fn algorithm_defaults(&self, name: &str) -> Option<&Value> {
        self.algorithms
            .iter()
            .find(|e| e.name == name)
            .map(|e| &e.defaults)
    }

    /// Register a consolidation strategy whose YAML parameters deserialize into `C`.
    pub fn register_consolidator<C: DeserializeOwned + Serialize + 'static>(
        &mut self,
        name: &str,
        summary: &str,
        make: impl Fn(C) -> Result<Box<dyn Consolidator>> + Send + Sync + 'static,
    ) {
        self.consolidators.retain(|e| e.name != name);
        self.consolidators.push(Entry {
            name: name.to_string(),
            summary: summary.to_string(),
            build: typed("consolidation", make),
            defaults: Value::Null,
        });
    }

    /// `(name, summary)` of every algorithm, sorted by name.
    pub fn algorithms(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<_> = self
            .algorithms
            .iter()
            .map(|e| (e.name.as_str(), e.summary.as_str()))
            .collect();
        v.sort();
        v
    }

    pub fn consolidators(&self) -> Vec<(&str, &str)> {
        let mut v: Vec<_> = self
            .consolidators
            .iter()
            .map(|e| (e.name.as_str(), e.summary.as_str()))
            .collect();
        v.sort();
        v
    }

    /// Build the algorithm of a config's `algorithm:` section; also returns the section with every
    /// default filled in.
    pub fn build_algorithm(
        &self,
        spec: &Value,
        origin: &str,
    ) -> Result<(Box<dyn Algorithm>, Value)> {
        let (name, params) = split_spec(spec, origin, "algorithm")?;
        let entry = lookup(&self.algorithms, &name, "algorithm", origin, "algorithm")?;
        let (algo, resolved) = (entry.build)(params, origin)?;
        Ok((algo, with_name(&name, resolved)))
    }

    /// Build the strategy of a config's `consolidation:` section with its wiring; also returns the
    /// section with every default (the wiring included) filled in.
    pub fn build_consolidator(&self, spec: &Value, origin: &str) -> Result<(Consolidation, Value)> {
        let (name, params) = split_spec(spec, origin, "consolidation")?;
        let entry = lookup(
            &self.consolidators,
            &name,
            "consolidation strategy",
            origin,
            "consolidation",
        )?;
        let mut own = match params {
            Value::Mapping(m) => m,
            _ => Mapping::new(),
        };
        let mut given = Mapping::new();
        for key in Wiring::KEYS {
            if let Some(v) = own.remove(key) {
                given.insert(key.into(), v);
            }
        }
        let (strategy, resolved) = (entry.build)(Value::Mapping(own), origin)
            .map_err(|e| mention_shared_keys(e, &Wiring::KEYS))?;
        let mut wiring = match serde_yaml::to_value(strategy.default_wiring()) {
            Ok(Value::Mapping(m)) => m,
            _ => return Err(Error::msg("cannot serialise the default wiring")),
        };
        wiring.extend(given);
        let wiring: Wiring = from_value(Value::Mapping(wiring.clone()), origin, "consolidation")?;
        let mut resolved = with_name(&name, resolved);
        if let (Value::Mapping(r), Ok(Value::Mapping(w))) =
            (&mut resolved, serde_yaml::to_value(wiring))
        {
            r.extend(w);
        }
        Ok((Consolidation { strategy, wiring }, resolved))
    }
}

/// A section's "unknown field" error only lists its own keys: add the shared ones (`keys`), and
/// suggest one of them when the typo is closer to it.
fn mention_shared_keys(e: Error, keys: &[&str]) -> Error {
    let Error::Config {
        file,
        path,
        message,
    } = e
    else {
        return e;
    };
    let shared: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    let message = match message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
    {
        Some(given) => match closest(given, &shared) {
            Some(key) => format!(
                "unknown field `{given}`; did you mean `{key}`? (shared keys: {})",
                shared.join(", ")
            ),
            None => format!("{message}; shared keys: {}", shared.join(", ")),
        },
        None => message,
    };
    Error::Config {
        file,
        path,
        message,
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}
