//! checkpointer: consume Kafka, aggregate in event-time windows, checkpoint offsets and state
//! atomically to sled, resume exactly after redeploys.

pub mod board;
pub mod changelog;
pub mod checkpoint;
pub mod checkpoint_id;
pub mod clock;
pub mod config;
pub mod demo;
pub mod engine;
pub mod event_time;
pub mod generator;
pub mod http;
pub mod kafka_log;
pub mod lock;
pub mod memory;
pub mod metrics;
pub mod ops;
pub mod position;
pub mod ratelimit;
pub mod service;
pub mod sink;
pub mod source;
pub mod store;

/// jemalloc: the state path allocates and frees many small values (window keys, group copies);
/// glibc's allocator spent a quarter of the service's CPU on them and held more memory.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(test)]
mod allocator_tests {
    /// `.cargo/config.toml` builds jemalloc to return freed memory to the system after a second
    /// (its default is ten, and the 10k-key benchmark's peak RSS then followed the allocator's
    /// retention more than the state), and to give it back for good then (`MADV_DONTNEED`):
    /// pages only marked free (`MADV_FREE`, jemalloc's "muzzy" state) count in the RSS until
    /// the kernel runs short of memory; and to do it from its own background threads, not in
    /// the thread that frees (the processing loop waited up to 9 ms in one such call).
    #[test]
    fn the_allocator_is_built_to_return_freed_memory_within_a_second_off_the_loop() {
        let conf = tikv_jemalloc_ctl::config::malloc_conf::read()
            .expect("jemalloc reports the options it was built with")
            // the string comes with its C terminator
            .trim_end_matches('\0');
        for option in [
            "dirty_decay_ms:1000",
            "muzzy_decay_ms:0",
            "background_thread:true",
        ] {
            assert!(
                conf.split(',').any(|o| o == option),
                "built with {conf:?}, without {option}"
            );
        }
        // and the threads run in this process
        assert!(
            tikv_jemalloc_ctl::background_thread::read()
                .expect("jemalloc reports whether its background threads run"),
            "jemalloc's background threads are off"
        );
    }
}
