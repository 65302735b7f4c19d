//! Reusable GPU buffers: a call takes buffers of the sizes it needs and gives them back when it
//! has waited for its work, so a repeated shape allocates nothing.

use std::ops::Deref;
use std::sync::Mutex;

/// Free buffers the pool keeps at most, in bytes; past it the oldest are dropped.
const POOL_BYTES: u64 = 2 << 30;

/// How long a buffer is needed, which decides whether it may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// Until the call returns, having waited for the GPU: taken from the pool, returned on drop.
    Call,
    /// Past the call: bound in work nobody waits for (a GPU tensor op), so never pooled.
    Detached,
}

impl Lifetime {
    /// `Call` when the caller waits for the work, `Detached` otherwise.
    pub fn waited(waits: bool) -> Lifetime {
        if waits {
            Lifetime::Call
        } else {
            Lifetime::Detached
        }
    }
}

/// Free buffers, oldest first.
#[derive(Default)]
pub(crate) struct Pool {
    free: Mutex<Vec<wgpu::Buffer>>,
}

/// A buffer for one call; a [`Lifetime::Call`] buffer goes back to the pool when dropped.
pub(crate) struct Pooled<'a> {
    pool: &'a Pool,
    buffer: Option<wgpu::Buffer>,
    lifetime: Lifetime,
    /// Made for this call rather than reused (a new upload buffer is still mapped).
    pub is_new: bool,
}

impl Deref for Pooled<'_> {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("present until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(b) = self
            .buffer
            .take()
            .filter(|_| self.lifetime == Lifetime::Call)
        {
            self.pool.give_back(b);
        }
    }
}

impl Pooled<'_> {
    /// The buffer itself, kept by the caller and never returned to the pool.
    pub fn into_buffer(mut self) -> wgpu::Buffer {
        self.buffer.take().expect("present until drop")
    }
}

impl Pool {
    /// A free buffer of exactly `bytes` (at least 16) and `usage` when there is one and the
    /// lifetime allows, else a new one labelled `label`.
    pub fn take<'a>(
        &'a self,
        device: &wgpu::Device,
        label: &str,
        bytes: u64,
        usage: wgpu::BufferUsages,
        lifetime: Lifetime,
    ) -> Pooled<'a> {
        let size = bytes.max(16);
        let reused = match lifetime {
            Lifetime::Call => self.take_free(size, usage),
            Lifetime::Detached => None,
        };
        let is_new = reused.is_none();
        let buffer = reused.unwrap_or_else(|| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                // Upload staging starts mapped, so its first use needs no wait.
                mapped_at_creation: usage.contains(wgpu::BufferUsages::MAP_WRITE),
            })
        });
        Pooled {
            pool: self,
            buffer: Some(buffer),
            lifetime,
            is_new,
        }
    }

    /// Removes and returns a free buffer of exactly `size` and `usage`.
    fn take_free(&self, size: u64, usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let i = free
            .iter()
            .position(|b| b.size() == size && b.usage() == usage)?;
        Some(free.remove(i))
    }

    fn give_back(&self, buffer: wgpu::Buffer) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buffer);
        let mut total: u64 = free.iter().map(|b| b.size()).sum();
        while total > POOL_BYTES {
            total -= free.remove(0).size();
        }
    }

    /// Drops every free buffer.
    pub fn clear(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
