//! What every rehearsal method does with its [`ReplayBuffer`]: create it on the first task (the
//! number of tasks and units is known only then), insert at the configured time, and draw batches.
//! The algorithms (er.rs, agem.rs, der.rs, …) only decide *what to do* with the drawn samples.

use candle_core::{Device, Tensor};
use sequel_core::algorithm::task_samples;
use sequel_core::buffer::{BufferPolicy, InsertAt, ReplayBuffer};
use sequel_core::checkpoint::StateDict;
use sequel_core::data::{Batch, GatherBuf, Split, TaskStream};
use sequel_core::model::ModelOutput;
use sequel_core::rng::{SeededRng, Stream};
use sequel_core::{Error, Result, TaskCtx};

/// Samples per forward pass when logits are computed for task-end insertion.
const CHUNK: usize = 256;

/// A replay buffer plus its insertion schedule and reused gather storage.
pub struct Memory {
    capacity: usize,
    policy: BufferPolicy,
    insert: InsertAt,
    store_logits: bool,
    buffer: Option<ReplayBuffer>,
    gather: GatherBuf,
    slots: Vec<u32>,
}

/// A batch drawn from the memory, with the slots it came from and (when stored) their logits.
pub struct Drawn {
    pub batch: Batch,
    pub slots: Vec<u32>,
    pub logits: Option<Tensor>,
}

impl Memory {
    pub fn new(
        capacity: usize,
        policy: BufferPolicy,
        insert: InsertAt,
        store_logits: bool,
    ) -> Self {
        Self {
            capacity,
            policy,
            insert,
            store_logits,
            buffer: None,
            gather: GatherBuf::default(),
            slots: Vec::new(),
        }
    }

    /// Create the buffer on first use. Its random stream is seeded from the algorithm's stream,
    /// so it depends on the experiment seed and on nothing else.
    pub fn ensure(&mut self, stream: &TaskStream, rng: &mut SeededRng) -> Result<()> {
        if self.buffer.is_none() {
            let groups = match self.policy {
                BufferPolicy::Reservoir => 0,
                BufferPolicy::TaskQuota => stream.len(),
                BufferPolicy::ClassBalanced => stream.num_units,
            };
            let logit_dim = if self.store_logits {
                stream.num_units
            } else {
                0
            };
            let buffer_rng = SeededRng::with_stream_id(rng.next_u64(), Stream::Buffer as u64);
            self.buffer = Some(ReplayBuffer::new(
                self.capacity,
                self.policy,
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

    /// Replace the buffer (checkpoint restore).
    pub fn set_buffer(&mut self, buffer: ReplayBuffer) {
        self.buffer = Some(buffer);
    }

    /// The buffer (once created) under `memory.` (checkpoints).
    pub fn save(&self, out: &mut StateDict) -> Result<()> {
        if let Some(b) = &self.buffer {
            out.extend(b.state("memory.")?);
        }
        Ok(())
    }

    /// The whole state of an algorithm whose only carried state is this memory.
    pub fn state(&self) -> Result<Option<StateDict>> {
        let mut out = StateDict::new();
        self.save(&mut out)?;
        Ok(Some(out))
    }

    /// Restore what [`Memory::save`] wrote; without a saved buffer the memory stays uncreated.
    pub fn load(&mut self, state: &StateDict) -> Result<()> {
        self.buffer = if state.contains_key("memory.header") {
            Some(ReplayBuffer::from_state(state, "memory.")?)
        } else {
            None
        };
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.as_ref().is_none_or(ReplayBuffer::is_empty)
    }

    /// Draw up to `n` distinct stored samples; `None` while the memory is empty.
    pub fn draw(
        &mut self,
        n: usize,
        stream: &TaskStream,
        device: &Device,
    ) -> Result<Option<Drawn>> {
        let Some(buffer) = self.buffer.as_mut() else {
            return Ok(None);
        };
        if buffer.is_empty() || n == 0 {
            return Ok(None);
        }
        buffer.draw(n, &mut self.slots);
        self.batch_of(self.slots.clone(), stream, device).map(Some)
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

    /// H4: with `insert: step`, offer the step's incoming samples (with the training forward
    /// pass's logits when stored — the logits *at insertion time*).
    pub fn after_step(&mut self, batch: &Batch, out: &ModelOutput) -> Result<()> {
        if self.insert != InsertAt::Step {
            return Ok(());
        }
        let buffer = self
            .buffer
            .as_mut()
            .ok_or_else(|| Error::msg("the replay memory has not been created yet"))?;
        buffer.offer_batch(batch, Some(&out.logits))
    }

    /// H5: with `insert: task_end`, offer every training sample of the finished task in a seeded
    /// random order, with the final model's evaluation-mode logits when stored.
    pub fn after_task(&mut self, ctx: &mut TaskCtx) -> Result<()> {
        self.ensure(ctx.stream, ctx.rng)?;
        if self.insert != InsertAt::TaskEnd {
            return Ok(());
        }
        let mut samples = task_samples(ctx.stream, ctx.task);
        ctx.rng.shuffle(&mut samples);
        let store_logits = self.store_logits;
        for chunk in samples.chunks(CHUNK) {
            let batch = ctx
                .stream
                .gather(chunk, Split::Train, &mut self.gather, ctx.device)?;
            let logits = if store_logits {
                Some(ctx.model.forward(&batch.x, false)?.logits)
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
