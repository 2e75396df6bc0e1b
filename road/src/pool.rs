//! Buffers for large payloads, reused process-wide: a junction or driver
//! that moves megabyte messages takes their buffers from here and gives
//! them back when the last reference goes, instead of mapping fresh memory
//! (and taking its page faults) for every one.

use std::sync::Mutex;

use bytes::Bytes;

/// Payloads at least this large are worth a pooled buffer.
pub const POOLED_FRAME: usize = 64 * 1024;
/// Buffers kept for reuse, at most.
const KEEP: usize = 16;
/// Larger buffers are not kept.
const KEEP_MAX_BYTES: usize = 8 << 20;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for `len` bytes.
pub fn take(len: usize) -> Vec<u8> {
    let reused = {
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        free.iter()
            .position(|b| b.capacity() >= len)
            .map(|i| free.swap_remove(i))
    };
    reused.unwrap_or_else(|| Vec::with_capacity(len))
}

/// Gives a buffer back for reuse.
pub fn give(mut buf: Vec<u8>) {
    if !(POOLED_FRAME..=KEEP_MAX_BYTES).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
    if free.len() < KEEP {
        free.push(buf);
    }
}

/// Bytes that give their buffer back when the last reference goes.
pub fn into_bytes(buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Pooled(buf))
}

struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again() {
        let mut buf = take(3 * POOLED_FRAME);
        buf.extend_from_slice(&[1; 10]);
        let bytes = into_bytes(buf);
        assert_eq!(&bytes[..], &[1; 10]);
        drop(bytes);
        // Given back emptied (or, if another test took it, a fresh one).
        let again = take(3 * POOLED_FRAME);
        assert!(again.is_empty() && again.capacity() >= 3 * POOLED_FRAME);
    }
}
