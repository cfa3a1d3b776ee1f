//! Named tensors, and the symmetric save/load of a component's persistent fields.
//!
//! A component lists each field it carries across tasks once, in one function that serves both
//! directions:
//!
//! ```
//! # use sequel_core::state::{StateIo, StateDict};
//! # use sequel_core::Result;
//! struct Counter { seen: u64, weights: Option<candle_core::Tensor> }
//! impl Counter {
//!     fn state(&mut self, io: &mut StateIo) -> Result<()> {
//!         io.field("seen", &mut self.seen)?;
//!         io.field("weights", &mut self.weights)
//!     }
//! }
//! # let mut c = Counter { seen: 3, weights: None };
//! # let mut dict = StateDict::new();
//! # c.state(&mut StateIo::save(&mut dict)).unwrap();
//! # let mut d = Counter { seen: 0, weights: None };
//! # d.state(&mut StateIo::load(&dict)).unwrap();
//! # assert_eq!(d.seen, 3);
//! ```
//!
//! so a field cannot be saved and forgotten on load (or the reverse). Tensors are copied on save:
//! the optimizers update parameters in place, and a checkpoint being written must not change.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Named tensors: the unit of state every component saves and restores.
pub type StateDict = HashMap<String, Tensor>;

/// A value that can be written to and read back from a [`StateDict`] under a key.
pub trait Persist: Sized {
    /// Write `self` under `key` (one or several entries starting with `key`).
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()>;
    /// Read back what [`Persist::save`] wrote under `key`.
    fn load(key: &str, from: &StateDict) -> Result<Self>;
    /// Whether `from` holds a saved value under `key` (for `Option<Self>`).
    fn present(key: &str, from: &StateDict) -> bool {
        from.contains_key(key)
    }
}

enum Mode<'a> {
    Save(&'a mut StateDict),
    Load(&'a StateDict),
}

/// One direction of a component's state function: saving into, or loading from, a dictionary.
pub struct StateIo<'a> {
    mode: Mode<'a>,
    prefix: String,
}

impl<'a> StateIo<'a> {
    /// Saving into `out`.
    pub fn save(out: &'a mut StateDict) -> Self {
        Self {
            mode: Mode::Save(out),
            prefix: String::new(),
        }
    }

    /// Loading from `from`.
    pub fn load(from: &'a StateDict) -> Self {
        Self {
            mode: Mode::Load(from),
            prefix: String::new(),
        }
    }

    pub fn is_loading(&self) -> bool {
        matches!(self.mode, Mode::Load(_))
    }

    /// Save `value` under `key`, or replace it with the loaded one.
    ///
    /// # Errors
    /// On load, when the dictionary lacks `key` (and the field is not an `Option`).
    pub fn field<T: Persist>(&mut self, key: &str, value: &mut T) -> Result<()> {
        let key = format!("{}{key}", self.prefix);
        match &mut self.mode {
            Mode::Save(out) => value.save(&key, out),
            Mode::Load(from) => {
                *value = T::load(&key, from)?;
                Ok(())
            }
        }
    }

    /// Run `f` with every key below prefixed by `prefix.` (a nested component's fields).
    pub fn scope<R>(&mut self, prefix: &str, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        let saved = self.prefix.clone();
        self.prefix = format!("{saved}{prefix}.");
        let r = f(self);
        self.prefix = saved;
        r
    }
}

fn lacks(key: &str) -> Error {
    Error::msg(format!("checkpoint lacks `{key}`"))
}

fn get<'a>(from: &'a StateDict, key: &str) -> Result<&'a Tensor> {
    from.get(key).ok_or_else(|| lacks(key))
}

impl Persist for Tensor {
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
        out.insert(key.to_string(), self.copy()?);
        Ok(())
    }
    fn load(key: &str, from: &StateDict) -> Result<Self> {
        get(from, key).cloned()
    }
}

impl<T: Persist> Persist for Option<T> {
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
        match self {
            Some(v) => v.save(key, out),
            None => Ok(()),
        }
    }
    fn load(key: &str, from: &StateDict) -> Result<Self> {
        if T::present(key, from) {
            T::load(key, from).map(Some)
        } else {
            Ok(None)
        }
    }
    fn present(_key: &str, _from: &StateDict) -> bool {
        true
    }
}

/// A list as `<key>.len` and `<key>.<i>`.
impl<T: Persist> Persist for Vec<T> {
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
        out.insert(
            format!("{key}.len"),
            Tensor::new(&[self.len() as u32], &Device::Cpu)?,
        );
        for (i, v) in self.iter().enumerate() {
            v.save(&format!("{key}.{i}"), out)?;
        }
        Ok(())
    }
    fn load(key: &str, from: &StateDict) -> Result<Self> {
        let n = get(from, &format!("{key}.len"))?
            .to_vec1::<u32>()?
            .first()
            .copied()
            .unwrap_or(0) as usize;
        (0..n)
            .map(|i| T::load(&format!("{key}.{i}"), from))
            .collect()
    }
    fn present(key: &str, from: &StateDict) -> bool {
        from.contains_key(&format!("{key}.len"))
    }
}

/// Scalars are stored as one-element f64 tensors (exact for every count below 2⁵³).
macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Persist for $t {
            fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
                out.insert(key.to_string(), Tensor::new(&[*self as f64], &Device::Cpu)?);
                Ok(())
            }
            fn load(key: &str, from: &StateDict) -> Result<Self> {
                let v = get(from, key)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                v.first().map(|&x| x as $t).ok_or_else(|| Error::msg(format!("checkpoint entry `{key}` is empty")))
            }
        }
    )*};
}
scalar!(f32, f64, u32, u64, usize);

impl Persist for bool {
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
        (*self as u8 as f64).save(key, out)
    }
    fn load(key: &str, from: &StateDict) -> Result<Self> {
        Ok(f64::load(key, from)? != 0.0)
    }
}

/// A flag per element (e.g. the output units seen so far), as one u8 tensor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flags(pub Vec<bool>);

impl Persist for Flags {
    fn save(&self, key: &str, out: &mut StateDict) -> Result<()> {
        let v: Vec<u8> = self.0.iter().map(|&b| b as u8).collect();
        let n = v.len();
        out.insert(key.to_string(), Tensor::from_vec(v, n, &Device::Cpu)?);
        Ok(())
    }
    fn load(key: &str, from: &StateDict) -> Result<Self> {
        Ok(Self(
            get(from, key)?
                .to_vec1::<u8>()?
                .into_iter()
                .map(|b| b != 0)
                .collect(),
        ))
    }
}

/// Entries of `dict` under `prefix`, with the prefix removed.
pub fn take_prefixed(dict: &StateDict, prefix: &str) -> StateDict {
    dict.iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
        .collect()
}

/// Insert `src` into `dst` with `prefix` prepended to every key.
pub fn put_prefixed(dst: &mut StateDict, prefix: &str, src: StateDict) {
    dst.extend(src.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Parts {
        count: u64,
        rate: f64,
        flags: Flags,
        list: Vec<Tensor>,
        maybe: Option<Tensor>,
        nested: Option<Vec<Tensor>>,
    }

    impl Parts {
        fn state(&mut self, io: &mut StateIo) -> Result<()> {
            io.field("count", &mut self.count)?;
            io.field("rate", &mut self.rate)?;
            io.field("flags", &mut self.flags)?;
            io.field("list", &mut self.list)?;
            io.field("maybe", &mut self.maybe)?;
            io.scope("inner", |io| io.field("nested", &mut self.nested))
        }
    }

    #[test]
    fn every_field_round_trips_and_absent_options_stay_absent() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let mut a = Parts {
            count: (1 << 40) + 3,
            rate: 0.1,
            flags: Flags(vec![true, false, true]),
            list: vec![t(&[1.0, 2.0]), t(&[3.0])],
            maybe: None,
            nested: Some(vec![t(&[4.0])]),
        };
        let mut dict = StateDict::new();
        a.state(&mut StateIo::save(&mut dict)).unwrap();
        assert!(dict.contains_key("inner.nested.len"));
        let mut b = Parts {
            maybe: Some(t(&[9.0])),
            ..Parts::default()
        };
        b.state(&mut StateIo::load(&dict)).unwrap();
        assert_eq!(b.count, a.count);
        assert_eq!(b.rate, a.rate);
        assert_eq!(b.flags, a.flags);
        assert!(b.maybe.is_none(), "an absent option must load as None");
        let v =
            |l: &[Tensor]| -> Vec<Vec<f32>> { l.iter().map(|x| x.to_vec1().unwrap()).collect() };
        assert_eq!(v(&b.list), v(&a.list));
        assert_eq!(v(b.nested.as_ref().unwrap()), vec![vec![4.0]]);
    }

    #[test]
    fn a_missing_required_field_is_an_error_naming_it() {
        let mut p = Parts::default();
        let e = p.state(&mut StateIo::load(&StateDict::new())).unwrap_err();
        assert!(e.to_string().contains("`count`"), "{e}");
    }

    #[test]
    fn saved_tensors_are_copies() {
        let var = candle_core::Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let mut dict = StateDict::new();
        let mut t = var.as_tensor().clone();
        StateIo::save(&mut dict).field("t", &mut t).unwrap();
        var.set(&Tensor::new(&[5f32, 6.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(dict["t"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }
}
