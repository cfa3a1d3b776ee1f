//! The replay memory shared by every rehearsal method (ER, A-GEM, GEM, GDumb, DER, ER-ACE, …).
//!
//! **Storage.** A slot holds a [`SampleRef`] — which task's view of which dataset sample — its
//! target unit, and optionally the logits the model gave it when it was stored (DER). The dataset
//! keeps every image as immutable bytes and a task's transform is deterministic, so a reference
//! *is* the un-augmented input: drawing a batch is one [`TaskStream::gather`] into a reused buffer,
//! exactly the path incoming batches take. All storage is allocated once, at construction, for the
//! full capacity: inserting never grows anything, never concatenates datasets (the documented cause
//! of a popular library's replay slowdowns), and costs O(1) (O(capacity) for the rare
//! class-balanced eviction scan).
//!
//! **Policies** ([`BufferPolicy`]), all drawing from the buffer's own seeded stream:
//! - `reservoir` — Vitter's Algorithm R: with `n` samples offered before this one, store it at slot
//!   `n` while `n < M`, else draw `j ~ U{0..n}` and overwrite slot `j` if `j < M`. Every offered
//!   sample ends up stored with probability exactly `M / N`.
//! - `class_balanced` — GDumb's greedy sampler (Prabhu et al. 2020): store while there is room;
//!   when full, a sample whose class is not (one of) the largest evicts a uniformly drawn sample of
//!   a largest class (ties between largest classes drawn uniformly too); otherwise it is dropped.
//!   Class counts stay within one of each other once every class has been offered enough samples.
//! - `task_quota` — each of the stream's `T` tasks owns `⌊M / T⌋` slots, filled by a reservoir over
//!   that task's samples (A-GEM's and GEM's episodic memory when `T` is known in advance).
//! - `task_balanced` — the greedy sampler of `class_balanced` with tasks in place of classes: the
//!   whole memory is used from the first task on and shrinks each seen task to `⌊M / t⌋` (± 1) as
//!   task `t` arrives (GEM's memory when `T` is not known: m is reduced as new tasks are observed,
//!   Lopez-Paz & Ranzato 2017, §3). With task-end insertion in a random order
//!   each task keeps a uniform sample of itself.
//!
//! **Draws** are without replacement: a partial Fisher–Yates over a persistent permutation of the
//! filled slots, so a draw costs O(batch) and allocates nothing beyond its output.
//!
//! **Checkpoints.** [`ReplayBuffer::state`] returns every field, the random stream's position
//! included, as named tensors (safetensors-ready); [`ReplayBuffer::from_state`] rebuilds a buffer
//! that continues bit-identically.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::{Batch, GatherBuf, SampleRef, TaskStream};
use crate::error::{Error, Result};
use crate::rng::{RngState, SeededRng};

/// Which samples a full buffer keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferPolicy {
    Reservoir,
    ClassBalanced,
    TaskQuota,
    TaskBalanced,
}

impl BufferPolicy {
    fn code(self) -> u32 {
        match self {
            Self::Reservoir => 0,
            Self::ClassBalanced => 1,
            Self::TaskQuota => 2,
            Self::TaskBalanced => 3,
        }
    }

    fn from_code(c: u32) -> Result<Self> {
        Ok(match c {
            0 => Self::Reservoir,
            1 => Self::ClassBalanced,
            2 => Self::TaskQuota,
            3 => Self::TaskBalanced,
            _ => return Err(Error::msg(format!("unknown buffer policy code {c}"))),
        })
    }
}

/// When samples of the stream are offered to the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InsertAt {
    /// After every optimizer step, the incoming samples of that step (online; ER, DER).
    Step,
    /// After the last step of a task, every training sample of the task in a seeded random order
    /// (A-GEM, GEM; Avalanche's default for ER).
    TaskEnd,
}

/// The memory keys every replay method shares in its `algorithm:` section. Each method supplies
/// its own defaults (A-GEM fills its memory per task at the task's end, ER by reservoir at every
/// step); the registry parses these keys once for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Memory size M in samples.
    pub buffer_size: usize,
    /// `reservoir`, `class_balanced`, `task_quota` or `task_balanced`.
    pub buffer_policy: BufferPolicy,
    /// `step` (insert every step's incoming samples) or `task_end`.
    pub insert: InsertAt,
}

impl MemoryConfig {
    /// The YAML keys, as the registry takes them out of an `algorithm:` section.
    pub const KEYS: [&'static str; 3] = ["buffer_size", "buffer_policy", "insert"];
}

/// Reservoir sampling at every step into 200 slots (ER, DER: Mammoth's seq-mnist setting).
impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            buffer_size: 200,
            buffer_policy: BufferPolicy::Reservoir,
            insert: InsertAt::Step,
        }
    }
}

impl crate::state::Persist for ReplayBuffer {
    fn save(&self, key: &str, out: &mut crate::state::StateDict) -> Result<()> {
        out.extend(self.state(&format!("{key}."))?);
        Ok(())
    }
    fn load(key: &str, from: &crate::state::StateDict) -> Result<Self> {
        Self::from_state(from, &format!("{key}."))
    }
    fn present(key: &str, from: &crate::state::StateDict) -> bool {
        from.contains_key(&format!("{key}.header"))
    }
}

/// A fixed-capacity replay memory. See the module documentation.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    capacity: usize,
    policy: BufferPolicy,
    samples: Vec<SampleRef>,
    units: Vec<u32>,
    /// Logits per slot (`capacity × logit_dim`), when `logit_dim > 0`.
    logit_dim: usize,
    logits: Vec<f32>,
    /// Samples offered so far (Algorithm R's `n`).
    seen: u64,
    /// Per group (task for `task_quota` and `task_balanced`, unit for `class_balanced`): samples
    /// offered and slots.
    group_seen: Vec<u64>,
    group_slots: Vec<Vec<u32>>,
    /// Slots per task under `task_quota`.
    quota: usize,
    /// A permutation of `0..len()`; draws shuffle a prefix of it.
    order: Vec<u32>,
    rng: SeededRng,
}

impl ReplayBuffer {
    /// Whether a buffer of `capacity` slots can work under `policy` with `groups` groups (tasks
    /// for `task_quota` and `task_balanced`, output units for `class_balanced`): the check [`ReplayBuffer::new`]
    /// makes, callable before a run starts. The error is a [`Error::Config`] naming
    /// `algorithm.buffer_size`, without a file (the caller adds it).
    pub fn check(capacity: usize, policy: BufferPolicy, groups: usize) -> Result<()> {
        let err = |message: String| Error::Config {
            file: String::new(),
            path: "algorithm.buffer_size".into(),
            message,
        };
        if capacity == 0 {
            return Err(err("must be at least 1".into()));
        }
        if policy != BufferPolicy::Reservoir && groups == 0 {
            return Err(Error::msg(format!(
                "a {policy:?} buffer needs at least one group"
            )));
        }
        if policy == BufferPolicy::TaskQuota && capacity < groups {
            // Every task would get 0 slots: the method would silently never replay.
            return Err(err(format!(
                "{capacity} is smaller than the number of tasks ({groups}): buffer_policy \
                 task_quota gives each task ⌊{capacity}/{groups}⌋ = 0 slots; raise buffer_size \
                 to at least {groups} or set buffer_policy: reservoir"
            )));
        }
        if policy == BufferPolicy::TaskBalanced && capacity < groups {
            // The oldest tasks would be evicted entirely: their samples silently never replayed.
            return Err(err(format!(
                "{capacity} is smaller than the number of tasks ({groups}): buffer_policy \
                 task_balanced would evict the oldest tasks entirely; raise buffer_size to at \
                 least {groups} or set buffer_policy: reservoir"
            )));
        }
        Ok(())
    }

    /// A buffer of `capacity` slots. `groups` is the number of tasks (`task_quota`,
    /// `task_balanced`) or output units (`class_balanced`); `logit_dim` > 0 stores that many logits per slot.
    pub fn new(
        capacity: usize,
        policy: BufferPolicy,
        groups: usize,
        logit_dim: usize,
        rng: SeededRng,
    ) -> Result<Self> {
        Self::check(capacity, policy, groups)?;
        let groups = match policy {
            BufferPolicy::Reservoir => 0,
            _ => groups,
        };
        let quota = match policy {
            BufferPolicy::TaskQuota => capacity / groups,
            _ => 0,
        };
        Ok(Self {
            capacity,
            policy,
            samples: Vec::with_capacity(capacity),
            units: Vec::with_capacity(capacity),
            logit_dim,
            logits: vec![0.0; capacity * logit_dim],
            seen: 0,
            group_seen: vec![0; groups],
            group_slots: (0..groups)
                .map(|_| Vec::with_capacity(if quota > 0 { quota } else { capacity }))
                .collect(),
            quota,
            order: Vec::with_capacity(capacity),
            rng,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn policy(&self) -> BufferPolicy {
        self.policy
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Samples offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Stored sample of a slot.
    pub fn sample(&self, slot: usize) -> SampleRef {
        self.samples[slot]
    }

    /// Target unit of a slot.
    pub fn unit(&self, slot: usize) -> u32 {
        self.units[slot]
    }

    /// Every stored sample, by slot.
    pub fn samples(&self) -> &[SampleRef] {
        &self.samples
    }

    /// Stored logits of a slot (empty without logits).
    pub fn logits(&self, slot: usize) -> &[f32] {
        &self.logits[slot * self.logit_dim..(slot + 1) * self.logit_dim]
    }

    pub fn logit_dim(&self) -> usize {
        self.logit_dim
    }

    /// Slots holding samples of `task`, in slot order.
    pub fn slots_of_task(&self, task: u32) -> Vec<u32> {
        (0..self.len() as u32)
            .filter(|&s| self.samples[s as usize].task == task)
            .collect()
    }

    /// Number of stored samples per unit (`units` entries).
    pub fn unit_counts(&self, units: usize) -> Vec<usize> {
        let mut c = vec![0; units];
        for &u in &self.units {
            if let Some(x) = c.get_mut(u as usize) {
                *x += 1;
            }
        }
        c
    }

    /// Offer one sample; returns the slot it was stored in, if any. `logits` must have
    /// `logit_dim` entries when the buffer stores logits (it is ignored otherwise).
    pub fn offer(
        &mut self,
        sample: SampleRef,
        unit: u32,
        logits: Option<&[f32]>,
    ) -> Result<Option<usize>> {
        let n = self.seen;
        self.seen += 1;
        let slot = match self.policy {
            BufferPolicy::Reservoir => {
                if (n as usize) < self.capacity {
                    Some(self.push_slot())
                } else {
                    let j = self.rng.below(n + 1) as usize;
                    (j < self.capacity).then_some(j)
                }
            }
            BufferPolicy::TaskQuota => self.offer_task_quota(sample.task as usize)?,
            BufferPolicy::ClassBalanced => self.offer_balanced(unit as usize)?,
            BufferPolicy::TaskBalanced => self.offer_balanced(sample.task as usize)?,
        };
        if let Some(s) = slot {
            self.write(s, sample, unit, logits)?;
        }
        Ok(slot)
    }

    /// Reserve the next free slot (the caller writes it).
    fn push_slot(&mut self) -> usize {
        let s = self.samples.len();
        self.samples.push(SampleRef { task: 0, index: 0 });
        self.units.push(0);
        self.order.push(s as u32);
        s
    }

    fn group(&self, g: usize) -> Result<()> {
        if g < self.group_slots.len() {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "buffer group {g} out of range (the buffer was built for {} groups)",
                self.group_slots.len()
            )))
        }
    }

    fn offer_task_quota(&mut self, task: usize) -> Result<Option<usize>> {
        self.group(task)?;
        let n = self.group_seen[task];
        self.group_seen[task] += 1;
        if self.quota == 0 {
            return Ok(None);
        }
        if (n as usize) < self.quota {
            let s = self.push_slot();
            self.group_slots[task].push(s as u32);
            return Ok(Some(s));
        }
        let j = self.rng.below(n + 1) as usize;
        Ok((j < self.quota).then(|| self.group_slots[task][j] as usize))
    }

    /// The greedy balanced sampler over groups (classes or tasks).
    fn offer_balanced(&mut self, unit: usize) -> Result<Option<usize>> {
        self.group(unit)?;
        self.group_seen[unit] += 1;
        if self.capacity == 0 {
            return Ok(None);
        }
        if self.len() < self.capacity {
            let s = self.push_slot();
            self.group_slots[unit].push(s as u32);
            return Ok(Some(s));
        }
        let largest = self.group_slots.iter().map(Vec::len).max().unwrap_or(0);
        if self.group_slots[unit].len() >= largest {
            return Ok(None);
        }
        let candidates: Vec<usize> = (0..self.group_slots.len())
            .filter(|&g| self.group_slots[g].len() == largest)
            .collect();
        let victim_class = candidates[self.rng.below(candidates.len() as u64) as usize];
        let victims = &mut self.group_slots[victim_class];
        let k = self.rng.below(victims.len() as u64) as usize;
        let slot = victims.swap_remove(k);
        self.group_slots[unit].push(slot);
        Ok(Some(slot as usize))
    }

    fn write(
        &mut self,
        slot: usize,
        sample: SampleRef,
        unit: u32,
        logits: Option<&[f32]>,
    ) -> Result<()> {
        self.samples[slot] = sample;
        self.units[slot] = unit;
        if self.logit_dim > 0 {
            let z = logits.ok_or_else(|| Error::msg("this buffer stores logits: pass them"))?;
            if z.len() != self.logit_dim {
                return Err(Error::msg(format!(
                    "expected {} logits per sample, got {}",
                    self.logit_dim,
                    z.len()
                )));
            }
            self.logits[slot * self.logit_dim..(slot + 1) * self.logit_dim].copy_from_slice(z);
        }
        Ok(())
    }

    /// Overwrite the logits stored in a slot (e.g. iCaRL-style refreshes).
    pub fn set_logits(&mut self, slot: usize, logits: &[f32]) -> Result<()> {
        let (sample, unit) = (self.samples[slot], self.units[slot]);
        self.write(slot, sample, unit, Some(logits))
    }

    /// Offer the incoming samples of a batch, with their rows of `logits` (`B × logit_dim`) when
    /// the buffer stores logits.
    pub fn offer_batch(&mut self, batch: &Batch, logits: Option<&Tensor>) -> Result<()> {
        let n = batch.incoming;
        let host: Option<Vec<f32>> = match (self.logit_dim, logits) {
            (0, _) => None,
            (_, Some(z)) => Some(
                z.narrow(0, 0, n)?
                    .detach()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ),
            (_, None) => return Err(Error::msg("this buffer stores logits: pass them")),
        };
        for i in 0..n {
            let z = host
                .as_ref()
                .map(|h| &h[i * self.logit_dim..(i + 1) * self.logit_dim]);
            self.offer(batch.refs[i], batch.units[i], z)?;
        }
        Ok(())
    }

    /// Draw `n` distinct slots uniformly (all of them if fewer are filled) into `out`.
    pub fn draw(&mut self, n: usize, out: &mut Vec<u32>) {
        out.clear();
        let len = self.order.len();
        let n = n.min(len);
        for i in 0..n {
            let j = i + self.rng.below((len - i) as u64) as usize;
            self.order.swap(i, j);
            out.push(self.order[i]);
        }
    }

    /// Draw `n` distinct slots uniformly from `slots`.
    pub fn draw_from(&mut self, slots: &[u32], n: usize) -> Vec<u32> {
        let mut pool = slots.to_vec();
        let n = n.min(pool.len());
        for i in 0..n {
            let j = i + self.rng.below((pool.len() - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(n);
        pool
    }

    /// The samples of `slots` as a batch on `device` (all counted as incoming; use
    /// [`Batch::append`] to add them to a stream batch as replayed samples).
    pub fn gather(
        &self,
        slots: &[u32],
        stream: &TaskStream,
        buf: &mut GatherBuf,
        device: &Device,
    ) -> Result<Batch> {
        let refs: Vec<SampleRef> = slots.iter().map(|&s| self.samples[s as usize]).collect();
        stream.gather_train(&refs, buf, device)
    }

    /// The stored logits of `slots`, `n × logit_dim`.
    pub fn gather_logits(&self, slots: &[u32], device: &Device) -> Result<Tensor> {
        let d = self.logit_dim;
        let mut host = Vec::with_capacity(slots.len() * d);
        for &s in slots {
            host.extend_from_slice(self.logits(s as usize));
        }
        Ok(Tensor::from_vec(host, (slots.len(), d), device)?)
    }

    /// Every field as named tensors under `prefix` (see [`ReplayBuffer::from_state`]).
    pub fn state(&self, prefix: &str) -> Result<HashMap<String, Tensor>> {
        let dev = Device::Cpu;
        let u32s = |v: Vec<u32>| Tensor::from_vec(v.clone(), v.len(), &dev);
        let u64s = |v: &[u64]| {
            let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            Tensor::from_vec(v.clone(), v.len(), &dev)
        };
        let rng = self.rng.state();
        let mut rng_words: Vec<u32> = rng
            .seed
            .chunks(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        rng_words.extend([rng.stream as u32, (rng.stream >> 32) as u32]);
        rng_words.extend((0..4).map(|k| (rng.word_pos >> (32 * k)) as u32));
        let mut lens = vec![self.group_slots.len() as u32];
        lens.extend(self.group_slots.iter().map(|g| g.len() as u32));
        let mut m = HashMap::new();
        let mut put = |k: &str, t: Tensor| {
            m.insert(format!("{prefix}{k}"), t);
        };
        put(
            "header",
            u32s(vec![
                self.capacity as u32,
                self.policy.code(),
                self.logit_dim as u32,
                self.quota as u32,
            ])?,
        );
        put(
            "sample_task",
            u32s(self.samples.iter().map(|s| s.task).collect())?,
        );
        put(
            "sample_index",
            u32s(self.samples.iter().map(|s| s.index).collect())?,
        );
        put("units", u32s(self.units.clone())?);
        put(
            "logits",
            Tensor::from_vec(self.logits.clone(), self.logits.len(), &dev)?,
        );
        put("seen", u64s(&[self.seen])?);
        put("group_seen", u64s(&self.group_seen)?);
        put("group_lens", u32s(lens)?);
        put("group_slots", u32s(self.group_slots.concat())?);
        put("order", u32s(self.order.clone())?);
        put("rng", u32s(rng_words)?);
        Ok(m)
    }

    /// Rebuild a buffer from [`ReplayBuffer::state`]'s tensors.
    pub fn from_state(state: &HashMap<String, Tensor>, prefix: &str) -> Result<Self> {
        let get = |k: &str| -> Result<&Tensor> {
            state
                .get(&format!("{prefix}{k}"))
                .ok_or_else(|| Error::msg(format!("checkpoint lacks `{prefix}{k}`")))
        };
        let u32s = |k: &str| -> Result<Vec<u32>> { Ok(get(k)?.to_vec1::<u32>()?) };
        let u64s = |k: &str| -> Result<Vec<u64>> {
            Ok(get(k)?
                .to_vec1::<i64>()?
                .into_iter()
                .map(|x| x as u64)
                .collect())
        };
        let header = u32s("header")?;
        let [capacity, policy, logit_dim, quota] = header[..] else {
            return Err(Error::msg("malformed buffer header in checkpoint"));
        };
        let tasks = u32s("sample_task")?;
        let indices = u32s("sample_index")?;
        let samples: Vec<SampleRef> = tasks
            .into_iter()
            .zip(indices)
            .map(|(task, index)| SampleRef { task, index })
            .collect();
        let lens = u32s("group_lens")?;
        let flat = u32s("group_slots")?;
        let mut group_slots = Vec::new();
        let mut at = 0usize;
        for &l in lens.iter().skip(1) {
            let l = l as usize;
            let mut g = Vec::with_capacity(if quota > 0 {
                quota as usize
            } else {
                capacity as usize
            });
            g.extend_from_slice(
                flat.get(at..at + l)
                    .ok_or_else(|| Error::msg("malformed buffer groups"))?,
            );
            group_slots.push(g);
            at += l;
        }
        let words = u32s("rng")?;
        if words.len() != 14 {
            return Err(Error::msg("malformed buffer rng state"));
        }
        let mut seed = [0u8; 32];
        for (k, w) in words[..8].iter().enumerate() {
            seed[4 * k..4 * k + 4].copy_from_slice(&w.to_le_bytes());
        }
        let stream = words[8] as u64 | (words[9] as u64) << 32;
        let word_pos = (0..4).fold(0u128, |acc, k| acc | (words[10 + k] as u128) << (32 * k));
        let mut units = Vec::with_capacity(capacity as usize);
        units.extend(u32s("units")?);
        let mut order = Vec::with_capacity(capacity as usize);
        order.extend(u32s("order")?);
        let mut stored = Vec::with_capacity(capacity as usize);
        stored.extend(samples);
        let seen = u64s("seen")?;
        Ok(Self {
            capacity: capacity as usize,
            policy: BufferPolicy::from_code(policy)?,
            samples: stored,
            units,
            logit_dim: logit_dim as usize,
            logits: get("logits")?.to_vec1::<f32>()?,
            seen: seen.first().copied().unwrap_or(0),
            group_seen: u64s("group_seen")?,
            group_slots,
            quota: quota as usize,
            order,
            rng: SeededRng::from(RngState {
                seed,
                stream,
                word_pos,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Stream;

    fn item(i: usize) -> SampleRef {
        SampleRef {
            task: 0,
            index: i as u32,
        }
    }

    fn buffer(cap: usize, policy: BufferPolicy, groups: usize, seed: u64) -> ReplayBuffer {
        ReplayBuffer::new(cap, policy, groups, 0, SeededRng::new(seed, Stream::Buffer)).unwrap()
    }

    /// Pearson's statistic of `counts` against a uniform expectation.
    fn chi_square(counts: &[u64], expected: f64) -> f64 {
        counts
            .iter()
            .map(|&o| (o as f64 - expected).powi(2) / expected)
            .sum()
    }

    #[test]
    fn reservoir_includes_every_item_with_probability_m_over_n() {
        let (n, m, trials) = (100usize, 10usize, 20_000u64);
        let mut counts = vec![0u64; n];
        for trial in 0..trials {
            let mut b = buffer(m, BufferPolicy::Reservoir, 0, trial);
            for i in 0..n {
                b.offer(item(i), 0, None).unwrap();
            }
            assert_eq!(b.len(), m);
            for s in b.samples() {
                counts[s.index as usize] += 1;
            }
        }
        // Each count is Binomial(trials, M/N); the statistic is ≈ χ²(N−1)·(1 − M/N). The 0.999
        // quantile of χ²(99) is 148.2: an off-by-one in the replacement draw (j ~ U{0..n−1}, a
        // bug public buffers shipped) gives a statistic in the hundreds here.
        let stat = chi_square(&counts, trials as f64 * m as f64 / n as f64);
        assert!(stat < 148.2, "chi-square {stat:.1}, counts {counts:?}");
    }

    #[test]
    fn off_by_one_reservoir_is_caught_by_the_same_statistic() {
        // The check above must be able to fail: replay the buggy rule by hand.
        let (n, m, trials) = (100usize, 10usize, 20_000u64);
        let mut counts = vec![0u64; n];
        for trial in 0..trials {
            let mut rng = SeededRng::new(trial, Stream::Buffer);
            let mut slots: Vec<usize> = (0..m).collect();
            for i in m..n {
                let j = rng.below(i as u64) as usize;
                if j < m {
                    slots[j] = i;
                }
            }
            for s in slots {
                counts[s] += 1;
            }
        }
        let stat = chi_square(&counts, trials as f64 * m as f64 / n as f64);
        assert!(stat > 148.2, "the buggy rule went unnoticed: {stat:.1}");
    }

    #[test]
    fn class_balanced_counts_stay_within_one() {
        let classes = 7;
        let mut b = buffer(50, BufferPolicy::ClassBalanced, classes, 1);
        let mut rng = SeededRng::new(2, Stream::DataOrder);
        // Classes arrive in a skewed, task-like order: mostly one class at a time.
        for i in 0..2000 {
            let c = if rng.uniform_f32() < 0.8 {
                (i / 300) % classes
            } else {
                rng.below(classes as u64) as usize
            };
            b.offer(item(i), c as u32, None).unwrap();
        }
        let counts = b.unit_counts(classes);
        assert_eq!(counts.iter().sum::<usize>(), 50);
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(hi - lo <= 1, "{counts:?}");
        // The bookkeeping agrees with the stored units.
        for (c, g) in b.group_slots.iter().enumerate() {
            assert_eq!(g.len(), counts[c]);
            assert!(g.iter().all(|&s| b.unit(s as usize) == c as u32));
        }
    }

    #[test]
    fn task_quota_gives_each_task_its_share() {
        let tasks = 4;
        let mut b = buffer(40, BufferPolicy::TaskQuota, tasks, 3);
        for t in 0..tasks as u32 {
            for i in 0..(100 + 50 * t) {
                b.offer(SampleRef { task: t, index: i }, 0, None).unwrap();
            }
        }
        for t in 0..tasks as u32 {
            let slots = b.slots_of_task(t);
            assert_eq!(slots.len(), 10, "task {t}");
            // A reservoir over the task, not its first samples.
            assert!(slots.iter().any(|&s| b.sample(s as usize).index >= 10));
        }
    }

    #[test]
    fn task_balanced_uses_the_whole_memory_and_shrinks_old_tasks_evenly() {
        let mut b = buffer(40, BufferPolicy::TaskBalanced, 4, 5);
        for t in 0..3u32 {
            // Task t arrives (in a random order, as task-end insertion offers it).
            for i in 0..(100 + 50 * t) {
                b.offer(SampleRef { task: t, index: i }, i % 2, None)
                    .unwrap();
            }
            assert_eq!(b.len(), 40, "after task {t}");
            let counts: Vec<usize> = (0..=t).map(|k| b.slots_of_task(k).len()).collect();
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(hi - lo <= 1, "after task {t}: {counts:?}");
            assert!(b.slots_of_task(3).is_empty());
        }
        // Within a group the greedy sampler keeps the first arrivals (a full memory drops a sample
        // of the largest group), so a uniform sample of a task needs a random arrival order, which
        // task-end insertion provides.
        assert!(b
            .slots_of_task(0)
            .iter()
            .all(|&s| b.sample(s as usize).index < 40));
    }

    #[test]
    fn a_task_quota_smaller_than_one_slot_per_task_is_an_error_naming_the_key() {
        for policy in [BufferPolicy::TaskQuota, BufferPolicy::TaskBalanced] {
            let e = ReplayBuffer::new(10, policy, 20, 0, SeededRng::new(0, Stream::Buffer))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("algorithm.buffer_size") && e.contains("reservoir"),
                "{e}"
            );
        }
        assert!(ReplayBuffer::new(
            20,
            BufferPolicy::TaskBalanced,
            20,
            0,
            SeededRng::new(0, Stream::Buffer)
        )
        .is_ok());
    }

    #[test]
    fn draws_are_distinct_and_cover_the_buffer() {
        let mut b = buffer(20, BufferPolicy::Reservoir, 0, 4);
        for i in 0..20 {
            b.offer(item(i), 0, None).unwrap();
        }
        let mut out = Vec::new();
        let mut hit = [0u32; 20];
        for _ in 0..200 {
            b.draw(5, &mut out);
            let mut s = out.clone();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), 5);
            for &x in &out {
                hit[x as usize] += 1;
            }
        }
        assert!(hit.iter().all(|&h| h > 0), "{hit:?}");
        b.draw(50, &mut out);
        assert_eq!(out.len(), 20);
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        for policy in [
            BufferPolicy::Reservoir,
            BufferPolicy::ClassBalanced,
            BufferPolicy::TaskQuota,
            BufferPolicy::TaskBalanced,
        ] {
            let mut a =
                ReplayBuffer::new(16, policy, 3, 2, SeededRng::new(9, Stream::Buffer)).unwrap();
            let offer = |b: &mut ReplayBuffer, i: u32| {
                let z = [i as f32 * 0.5, -(i as f32)];
                b.offer(
                    SampleRef {
                        task: i % 3,
                        index: i,
                    },
                    i % 3,
                    Some(&z),
                )
                .unwrap();
            };
            for i in 0..40 {
                offer(&mut a, i);
            }
            let mut out = Vec::new();
            a.draw(4, &mut out);
            // Through safetensors, as a checkpoint would.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("buffer.safetensors");
            candle_core::safetensors::save(&a.state("buffer.").unwrap(), &path).unwrap();
            let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let mut b = ReplayBuffer::from_state(&loaded, "buffer.").unwrap();
            assert_eq!(a.samples(), b.samples(), "{policy:?}");
            assert_eq!(a.units, b.units);
            assert_eq!(a.logits, b.logits);
            for i in 40..80 {
                offer(&mut a, i);
                offer(&mut b, i);
            }
            let (mut da, mut db) = (Vec::new(), Vec::new());
            a.draw(6, &mut da);
            b.draw(6, &mut db);
            assert_eq!(da, db, "{policy:?}");
            assert_eq!(a.samples(), b.samples(), "{policy:?}");
            assert_eq!(a.logits, b.logits);
        }
    }
}
