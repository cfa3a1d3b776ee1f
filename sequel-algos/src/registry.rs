//! Name → constructor registry for algorithms and consolidation strategies.
//!
//! The YAML keys of `algorithm:` are exactly the fields of the algorithm's config struct (plus
//! `name`), parsed with `deny_unknown_fields`, so a typo is an error that names the key. User
//! crates add their own entries with [`Registry::register_algorithm`] — no fork needed.
//!
//! `consolidation:` works the same way, except that the wiring keys every strategy shares
//! (`anchor`, `continue_from`, `evaluate`; [`Wiring`]) are taken out first and parsed here, with the
//! strategy's defaults ([`Consolidator::default_wiring`]); the strategy's own config sees the rest.
//! A key neither knows is still an error.

use sequel_core::config::{closest, from_value};
use sequel_core::{Algorithm, Consolidation, Consolidator, Error, Result, Wiring};
use serde::{de::DeserializeOwned, Serialize};
use serde_yaml::{Mapping, Value};

type Build<T> = Box<dyn Fn(Value, &str) -> Result<(Box<T>, Value)> + Send + Sync>;

struct Entry<T: ?Sized> {
    name: String,
    summary: String,
    build: Build<T>,
}

/// Every algorithm and consolidation strategy the CLI can name.
pub struct Registry {
    algorithms: Vec<Entry<dyn Algorithm>>,
    consolidators: Vec<Entry<dyn Consolidator>>,
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
        // Constructors report out-of-range parameters without knowing the file: add it.
        let built = make(cfg).map_err(|e| match e {
            Error::Config {
                file,
                path,
                message,
            } if file.is_empty() => Error::Config {
                file: origin.to_string(),
                path,
                message,
            },
            e => e,
        })?;
        Ok((built, resolved))
    })
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
        }
    }

    /// Every algorithm and strategy shipped with sequel-algos.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register_algorithm(
            "naive",
            "fine-tuning on the current task only (lower bound)",
            |c| Ok(Box::new(crate::naive::Naive::new(c)) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "joint",
            "cumulative training on all tasks seen so far (upper bound)",
            |c| Ok(Box::new(crate::joint::Joint::new(c)) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "ewc",
            "Elastic Weight Consolidation, one Fisher + anchor per past task (Kirkpatrick et al. 2017)",
            |c| Ok(Box::new(crate::ewc::Ewc::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "ewc-online",
            "online EWC: one running Fisher with decay gamma, one anchor (Schwarz et al. 2018)",
            |c| Ok(Box::new(crate::ewc_online::OnlineEwc::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "si",
            "Synaptic Intelligence: path-integral importance (Zenke et al. 2017)",
            |c| Ok(Box::new(crate::si::Si::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "mas",
            "Memory Aware Synapses: output-norm gradient importance (Aljundi et al. 2018)",
            |c| Ok(Box::new(crate::mas::Mas::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "lwf",
            "Learning without Forgetting: distillation from the task-start model (Li & Hoiem 2017)",
            |c| Ok(Box::new(crate::lwf::Lwf::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "er",
            "Experience Replay: each batch joined with a reservoir-buffer batch (Chaudhry et al. 2019)",
            |c| Ok(Box::new(crate::er::Er::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "agem",
            "A-GEM: project the gradient when it conflicts with a memory batch's (Chaudhry et al. 2019)",
            |c| Ok(Box::new(crate::agem::Agem::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "gem",
            "GEM: QP projection so no past task's memory loss increases (Lopez-Paz & Ranzato 2017)",
            |c| Ok(Box::new(crate::gem::Gem::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "der",
            "Dark Experience Replay: CE + alpha * MSE to the logits stored with each buffer sample (Buzzega et al. 2020)",
            |c| Ok(Box::new(crate::der::Der::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "derpp",
            "DER++: DER + beta * CE on a second, independent buffer draw (Buzzega et al. 2020)",
            |c| Ok(Box::new(crate::der::Der::plus_plus(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "er-ace",
            "ER with asymmetric CE: incoming logits masked to the batch's and unseen classes, replay unmasked (Caccia et al. 2022)",
            |c| Ok(Box::new(crate::er_ace::ErAce::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "icarl",
            "iCaRL: exemplars by herding, BCE with distillation, nearest-mean-of-exemplars prediction (Rebuffi et al. 2017)",
            |c| Ok(Box::new(crate::icarl::Icarl::new(c)?) as Box<dyn Algorithm>),
        );
        r.register_algorithm(
            "gdumb",
            "GDumb: class-balanced greedy memory; after each task re-initialise and train on the memory only (Prabhu et al. 2020)",
            |c| Ok(Box::new(crate::gdumb::Gdumb::new(c)?) as Box<dyn Algorithm>),
        );
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

    /// Register an algorithm whose YAML parameters deserialize into `C`.
    pub fn register_algorithm<C: DeserializeOwned + Serialize + 'static>(
        &mut self,
        name: &str,
        summary: &str,
        make: impl Fn(C) -> Result<Box<dyn Algorithm>> + Send + Sync + 'static,
    ) {
        self.algorithms.retain(|e| e.name != name);
        self.algorithms.push(Entry {
            name: name.to_string(),
            summary: summary.to_string(),
            build: typed("algorithm", make),
        });
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
        let (strategy, resolved) =
            (entry.build)(Value::Mapping(own), origin).map_err(mention_wiring_keys)?;
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

/// A strategy's "unknown field" error only lists the strategy's own keys: add the shared ones, and
/// suggest one of them when the typo is closer to it.
fn mention_wiring_keys(e: Error) -> Error {
    let Error::Config {
        file,
        path,
        message,
    } = e
    else {
        return e;
    };
    let shared: Vec<String> = Wiring::KEYS.iter().map(|k| k.to_string()).collect();
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
