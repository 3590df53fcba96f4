//! What the shard needs beyond `kometa-sys`: handing freed memory back to
//! the OS.

pub use kometa_sys::*;

/// Makes the calling thread's allocator (mimalloc, the binary's global
/// allocator) return the memory it freed to the OS now. mimalloc purges
/// freed pages lazily, on a later allocation or free of the same thread;
/// a shard that sleeps right after a burst (15,000 handshakes) makes no
/// such call and keeps the burst's buffers resident (measured at 15,000
/// idle connections, transparent huge pages off: 233 B per connection
/// without this call, 156 B with it). A few tens of microseconds; harmless
/// when mimalloc is not the allocator (unit tests).
pub fn return_freed_memory() {
    // SAFETY: mi_collect only walks and purges the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(false) }
}
