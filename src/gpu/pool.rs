//! Reusable GPU buffers: a call takes buffers of the sizes it needs and gives them back when it
//! has waited for its work, so a repeated shape allocates nothing.
//!
//! Buffers come in size classes (four per octave, at most 25% larger than asked), so calls of
//! varied shapes share them. The free buffers kept are bounded by what recent calls needed at
//! once: the largest total of buffers in use over the last [`WINDOW`] takes. When calls shrink,
//! the pool shrinks with them.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::Mutex;

/// Free buffers the pool keeps at most, in bytes, however large recent calls were.
const POOL_BYTES: u64 = 2 << 30;
/// Takes over which the pool remembers how many bytes were in use at once.
const WINDOW: usize = 256;

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

/// Free buffers (oldest first) and the recent demand that bounds them.
#[derive(Default)]
pub(crate) struct Pool {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    free: VecDeque<wgpu::Buffer>,
    free_bytes: u64,
    /// Bytes of pooled buffers taken and not yet given back.
    in_use: u64,
    /// `in_use` right after each of the last `WINDOW` takes.
    recent: VecDeque<u64>,
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
        let buffer = self.buffer.take().expect("present until drop");
        if self.lifetime == Lifetime::Call {
            self.pool.lock().in_use -= buffer.size();
        }
        buffer
    }
}

/// The size class of a request of `bytes` (at least 16): the next multiple of a quarter of its
/// octave (2^k, 1.25·2^k, 1.5·2^k, 1.75·2^k; 16-byte steps for small ones), but never past `cap`
/// (a buffer bigger than a binding could not be bound whole) unless the request itself is.
pub(crate) fn size_class(bytes: u64, cap: u64) -> u64 {
    let bytes = bytes.max(16);
    let octave = 1u64 << (63 - bytes.leading_zeros());
    let step = (octave / 4).max(16);
    (bytes.div_ceil(step) * step).min(cap.max(bytes))
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of at least `bytes` bytes, of its size class (see [`size_class`], capped at
    /// `cap`), with exactly `usage`: a free one when there is one and the lifetime allows, else a
    /// new one labelled `label`.
    pub fn take<'a>(
        &'a self,
        device: &wgpu::Device,
        label: &str,
        (bytes, cap): (u64, u64),
        usage: wgpu::BufferUsages,
        lifetime: Lifetime,
    ) -> Pooled<'a> {
        let (size, reused) = match lifetime {
            Lifetime::Call => {
                let size = size_class(bytes, cap);
                (size, self.take_free(size, usage))
            }
            Lifetime::Detached => (bytes.max(16), None),
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

    /// Removes and returns a free buffer of exactly `size` and `usage`, and counts `size` bytes
    /// in use either way.
    fn take_free(&self, size: u64, usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        let mut state = self.lock();
        state.in_use += size;
        let in_use = state.in_use;
        if state.recent.len() == WINDOW {
            state.recent.pop_front();
        }
        state.recent.push_back(in_use);
        let i = state
            .free
            .iter()
            .position(|b| b.size() == size && b.usage() == usage)?;
        let buffer = state.free.remove(i)?;
        state.free_bytes -= buffer.size();
        Some(buffer)
    }

    /// Takes a buffer back, then drops the oldest free ones while more is kept than recent calls
    /// had in use at once.
    fn give_back(&self, buffer: wgpu::Buffer) {
        let mut state = self.lock();
        state.in_use -= buffer.size();
        state.free_bytes += buffer.size();
        state.free.push_back(buffer);
        let budget = state
            .recent
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .min(POOL_BYTES);
        while state.free_bytes > budget {
            let Some(oldest) = state.free.pop_front() else {
                break;
            };
            state.free_bytes -= oldest.size();
        }
    }

    /// Bytes of the free buffers kept.
    #[cfg(test)]
    pub fn free_bytes(&self) -> u64 {
        self.lock().free_bytes
    }

    /// Drops every free buffer.
    pub fn clear(&self) {
        let mut state = self.lock();
        state.free.clear();
        state.free_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_at_most_a_quarter_larger_and_never_past_the_cap() {
        let sizes = (1..5000u64).chain([1 << 20, (1 << 20) + 4, 3 << 29, u32::MAX as u64 - 3]);
        for bytes in sizes {
            let class = size_class(bytes, u64::MAX);
            assert!(
                class >= bytes.max(16) && class.is_multiple_of(16),
                "{bytes}: {class}"
            );
            // A quarter more at most, or one 16-byte step for small requests.
            let most = (bytes.max(16) * 5 / 4).max(bytes.max(16) + 15);
            assert!(class <= most, "{bytes}: {class}");
            let capped = size_class(bytes, 1 << 20);
            assert!(
                capped >= bytes && capped <= (1 << 20u64).max(bytes),
                "{bytes}: {capped}"
            );
        }
        // Varied requests share few classes.
        let classes: std::collections::BTreeSet<u64> = (1u64 << 20..2 << 20)
            .step_by(4096)
            .map(|b| size_class(b, u64::MAX))
            .collect();
        assert_eq!(classes.len(), 5, "{classes:?}");
    }

    /// Calls of varied, shrinking sizes keep at most what recent calls had in use at once, not
    /// every size ever asked for.
    #[test]
    fn the_pool_is_bounded_by_recent_demand() {
        let Some((device, _)) = crate::gpu::context::test_device() else {
            return;
        };
        let pool = Pool::default();
        let usage = wgpu::BufferUsages::STORAGE;
        let mut largest_call = 0;
        for call in 0..600u64 {
            // Three buffers per call, of sizes that vary from call to call, shrinking after 300.
            let scale = if call < 300 { 1 << 20 } else { 1 << 16 };
            let sizes = [1 + call * 7919 % 4, 1 + call * 104729 % 3, 1 + call % 5];
            let held: Vec<_> = sizes
                .iter()
                .map(|s| {
                    pool.take(
                        &device,
                        "test",
                        (s * scale, u64::MAX),
                        usage,
                        Lifetime::Call,
                    )
                })
                .collect();
            let total: u64 = held.iter().map(|b| b.size()).sum();
            if call >= 300 {
                largest_call = largest_call.max(total);
            }
            drop(held);
            assert!(
                pool.free_bytes() <= 16 << 20,
                "call {call}: {} bytes",
                pool.free_bytes()
            );
        }
        // Past the window, only the small calls' demand is kept.
        assert!(
            pool.free_bytes() <= largest_call,
            "{} bytes kept for calls of at most {largest_call}",
            pool.free_bytes()
        );
    }
}
