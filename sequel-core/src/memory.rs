//! The replay memory a rehearsal method keeps: a [`ReplayBuffer`] plus its insertion schedule.
//! An algorithm that returns one from [`crate::Algorithm::memory`] has it maintained by the
//! trainer — created on the first task, filled at the configured time, saved in checkpoints — and
//! only decides what to do with the samples it draws.

use candle_core::{Device, Tensor};

use crate::buffer::{BufferPolicy, InsertAt, MemoryConfig, ReplayBuffer};
use crate::data::{Batch, GatherBuf, SampleRef, Split, TaskStream};
use crate::error::{Error, Result};
use crate::model::{Model, ModelOutput};
use crate::rng::{SeededRng, Stream};
use crate::state::StateIo;

/// Samples per forward pass when logits are computed for task-end insertion.
const CHUNK: usize = 256;

/// A replay buffer, its insertion schedule and reused gather storage.
pub struct Memory {
    cfg: MemoryConfig,
    store_logits: bool,
    buffer: Option<ReplayBuffer>,
    gather: GatherBuf,
    slots: Vec<u32>,
}

/// A batch drawn from the memory, with the slots it came from and (when stored) their logits.
/// Empty (no rows, no logits) while the memory is.
pub struct Drawn {
    pub batch: Batch,
    pub slots: Vec<u32>,
    pub logits: Option<Tensor>,
}

impl Drawn {
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

impl Memory {
    /// A memory configured by `cfg`; with `store_logits` each slot also keeps the logits the model
    /// gave the sample when it was inserted (DER).
    ///
    /// # Errors
    /// `buffer_size` 0 ([`Error::Config`] naming `buffer_size`).
    pub fn new(cfg: MemoryConfig, store_logits: bool) -> Result<Self> {
        if cfg.buffer_size == 0 {
            return Err(Error::Config {
                file: String::new(),
                path: "algorithm.buffer_size".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(Self {
            cfg,
            store_logits,
            buffer: None,
            gather: GatherBuf::default(),
            slots: Vec::new(),
        })
    }

    pub fn config(&self) -> &MemoryConfig {
        &self.cfg
    }

    /// The buffer's groups on `stream` (see [`ReplayBuffer::new`]).
    fn groups(&self, stream: &TaskStream) -> usize {
        match self.cfg.buffer_policy {
            BufferPolicy::Reservoir => 0,
            BufferPolicy::TaskQuota | BufferPolicy::TaskBalanced => stream.len(),
            BufferPolicy::ClassBalanced => stream.num_units,
        }
    }

    /// Whether this memory can work on `stream` (e.g. `task_quota` needs a slot per task): the
    /// check that creating the buffer makes, run before a run starts.
    pub fn check(&self, stream: &TaskStream) -> Result<()> {
        ReplayBuffer::check(
            self.cfg.buffer_size,
            self.cfg.buffer_policy,
            self.groups(stream),
        )
    }

    /// Create the buffer on first use (the numbers of tasks and units are known only then). Its
    /// random stream is seeded from `rng`, the algorithm's stream, so it depends on the experiment
    /// seed and on nothing else.
    pub fn ensure(&mut self, stream: &TaskStream, rng: &mut SeededRng) -> Result<()> {
        if self.buffer.is_none() {
            let groups = self.groups(stream);
            let logit_dim = if self.store_logits {
                stream.num_units
            } else {
                0
            };
            let buffer_rng = SeededRng::with_stream_id(rng.next_u64(), Stream::Buffer as u64);
            self.buffer = Some(ReplayBuffer::new(
                self.cfg.buffer_size,
                self.cfg.buffer_policy,
                groups,
                logit_dim,
                buffer_rng,
            )?);
        }
        Ok(())
    }

    /// The buffer, once created.
    pub fn buffer(&self) -> Option<&ReplayBuffer> {
        self.buffer.as_ref()
    }

    pub fn buffer_mut(&mut self) -> Option<&mut ReplayBuffer> {
        self.buffer.as_mut()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.as_ref().is_none_or(ReplayBuffer::is_empty)
    }

    /// The buffer (once created), under `memory.` in checkpoints.
    pub fn state(&mut self, io: &mut StateIo) -> Result<()> {
        io.field("memory", &mut self.buffer)
    }

    /// Draw up to `n` distinct stored samples uniformly; an empty [`Drawn`] while the memory is
    /// empty (no random draw is consumed then).
    pub fn draw(&mut self, n: usize, stream: &TaskStream, device: &Device) -> Result<Drawn> {
        match self.buffer.as_mut() {
            Some(b) if !b.is_empty() && n > 0 => {
                b.draw(n, &mut self.slots);
                self.batch_of(self.slots.clone(), stream, device)
            }
            _ => Ok(Drawn {
                batch: stream.gather(&[], Split::Train, &mut self.gather, device)?,
                slots: Vec::new(),
                logits: None,
            }),
        }
    }

    /// The stored samples of `slots` as a batch, with their logits when stored.
    pub fn batch_of(
        &mut self,
        slots: Vec<u32>,
        stream: &TaskStream,
        device: &Device,
    ) -> Result<Drawn> {
        let buffer = self
            .buffer
            .as_ref()
            .ok_or_else(|| Error::msg("the replay memory has not been created yet"))?;
        let batch = buffer.gather(&slots, stream, &mut self.gather, device)?;
        let logits = if buffer.logit_dim() > 0 {
            Some(buffer.gather_logits(&slots, device)?)
        } else {
            None
        };
        Ok(Drawn {
            batch,
            slots,
            logits,
        })
    }

    /// With `insert: step`, offer the step's incoming samples (with the training forward pass's
    /// logits when stored — the logits *at insertion time*).
    pub fn after_step(&mut self, batch: &Batch, out: &ModelOutput) -> Result<()> {
        if self.cfg.insert != InsertAt::Step {
            return Ok(());
        }
        let buffer = self
            .buffer
            .as_mut()
            .ok_or_else(|| Error::msg("the replay memory has not been created yet"))?;
        buffer.offer_batch(batch, Some(&out.logits))
    }

    /// With `insert: task_end`, offer every training sample of the finished task `task` in a
    /// seeded random order, with the final model's evaluation-mode logits when stored.
    pub fn after_task(
        &mut self,
        task: usize,
        stream: &TaskStream,
        model: &dyn Model,
        device: &Device,
        rng: &mut SeededRng,
    ) -> Result<()> {
        self.ensure(stream, rng)?;
        if self.cfg.insert != InsertAt::TaskEnd {
            return Ok(());
        }
        let mut samples: Vec<SampleRef> = stream.tasks[task]
            .train
            .iter()
            .map(|&index| SampleRef {
                task: task as u32,
                index,
            })
            .collect();
        rng.shuffle(&mut samples);
        for chunk in samples.chunks(CHUNK) {
            let batch = stream.gather(chunk, Split::Train, &mut self.gather, device)?;
            let logits = if self.store_logits {
                Some(crate::model::forward_batch(model, &batch, false)?.logits)
            } else {
                None
            };
            let buffer = self
                .buffer
                .as_mut()
                .ok_or_else(|| Error::msg("the replay memory has not been created yet"))?;
            buffer.offer_batch(&batch, logits.as_ref())?;
        }
        Ok(())
    }
}
