//! Benchmarks of the window engine and the checkpoint store.
//!
//! - `decode_aggregate`: records/s through decode + `Engine::process` with three window
//!   definitions (tumbling 1m, hopping 5m/1m, session 30s), 3 partitions and 10k keys, in the
//!   exactly-once mode (the default): every `CHECKPOINT_EVERY` records a checkpoint completes and
//!   the windows it released are emitted and acknowledged. The snapshot itself is left out of the
//!   timing; `checkpoint_stall` measures it.
//! - For 10k, 100k and 1M live keys (one tumbling window of 1h, so every key stays open), with
//!   10% of the keys updated since the previous checkpoint:
//!   - `checkpoint_stall/<n>`: `Engine::snapshot(id, false)`, the pause of the processing loop;
//!   - `checkpoint_stall_full/<n>`: `Engine::snapshot(id, true)`;
//!   - `checkpoint_duration/<n>`: `Store::write` of the delta into a sled store (in a temporary
//!     directory) holding the full state, flush included (until the checkpoint is durable);
//!   - `restore_reopen/<n>`: `Store::open` + `Store::load` + `Engine::from_state`, the restart
//!     path; each iteration first writes a delta checkpoint and closes the store (not timed);
//!   - `restore/<n>`: `Store::load` on the already open store + `Engine::from_state`.
//!
//!   The store starts with a full checkpoint (its size and write time are printed once, they
//!   are not a criterion measurement) and the restores read it after the deltas of
//!   `checkpoint_duration`. sled replays its log on open, so the cost of a reopen depends on
//!   the write history; the first reopen of each store is printed on its own. Each key count
//!   runs all its groups before the next is built.
//!
//! `KEY_GROUPS=N` in the environment sets the key groups of every benchmark (the service's
//! `state.key_groups`; its default otherwise).
//!
//! Run with `cargo bench --bench engine`; pass a filter to run a subset, e.g.
//! `cargo bench --bench engine -- restore`.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use checkpointer::checkpoint::Checkpoint;
use checkpointer::engine::{
    tumbling_start, Decoder, Engine, EngineConfig, FieldSource, GroupLayout, Outcome, Record,
    TimeSource, WindowDef, WindowKind, RECORDS_AHEAD,
};
use checkpointer::position::Partition;
use checkpointer::store::{Store, StoreError};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tempfile::TempDir;

const SECOND: i64 = 1_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
/// Event time of the first generated record, epoch milliseconds.
const T0: i64 = 1_700_000_000_000;
const MAX_OUT_OF_ORDERNESS: i64 = 5 * SECOND;
const PARTITIONS: i32 = 3;

/// Distinct keys of the throughput stream.
const STREAM_KEYS: u64 = 10_000;
/// Event time advances by this much per record (1,000 records per second of event time, so a
/// key is seen about every 10 s and 1m windows close every 60,000 records).
const STREAM_STEP_MS: i64 = 1;
/// Records may arrive up to this much behind the newest one (within the out-of-orderness).
const STREAM_JITTER_MS: u64 = 2_000;
/// Records between two checkpoints in the throughput benchmark.
const CHECKPOINT_EVERY: u64 = 50_000;

/// Live key counts of the checkpoint and restore benchmarks.
const LIVE_KEYS: [usize; 3] = [10_000, 100_000, 1_000_000];
/// Share of the live keys updated between two checkpoints, in percent.
const TOUCHED_PERCENT: usize = 10;

/// A small deterministic generator (splitmix64); the benchmark needs no statistical quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Key groups of `decode_aggregate`: `KEY_GROUPS` from the environment (1 to 65535), else the
/// default of a new store.
fn key_groups() -> u16 {
    match std::env::var("KEY_GROUPS") {
        Err(_) => checkpointer::engine::group::DEFAULT_GROUPS,
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&g: &u16| g > 0)
            .unwrap_or_else(|| panic!("KEY_GROUPS={v}: give 1 to 65535")),
    }
}

fn partitions() -> Vec<Partition> {
    (0..PARTITIONS)
        .map(|n| Partition::new("events", n))
        .collect()
}

/// Spreads records round-robin over the partitions with consecutive offsets per partition.
struct Offsets {
    seq: u64,
    next: Vec<i64>,
}

impl Offsets {
    fn new() -> Self {
        Offsets {
            seq: 0,
            next: vec![0; PARTITIONS as usize],
        }
    }

    /// Partition index and offset of the next record.
    fn next(&mut self) -> (usize, i64) {
        let p = (self.seq % PARTITIONS as u64) as usize;
        self.seq += 1;
        let offset = self.next[p];
        self.next[p] += 1;
        (p, offset)
    }
}

struct Message {
    partition: usize,
    offset: i64,
    payload: Vec<u8>,
}

/// The processing loop of the service, reduced to its engine calls, over an endless stream of
/// JSON records.
struct Pipeline {
    engine: Engine,
    decoder: Decoder,
    partitions: Vec<Partition>,
    offsets: Offsets,
    rng: Rng,
    /// Records generated so far; drives event time.
    generated: u64,
    since_checkpoint: u64,
    next_checkpoint: u64,
    batch: Vec<Message>,
}

impl Pipeline {
    fn new() -> Self {
        let cfg = EngineConfig {
            windows: vec![
                WindowDef {
                    name: "tumbling_1m".into(),
                    kind: WindowKind::Tumbling { size: MINUTE },
                },
                WindowDef {
                    name: "hopping_5m_1m".into(),
                    kind: WindowKind::Hopping {
                        size: 5 * MINUTE,
                        hop: MINUTE,
                    },
                },
                WindowDef {
                    name: "session_30s".into(),
                    kind: WindowKind::Session { gap: 30 * SECOND },
                },
            ],
            max_out_of_orderness: MAX_OUT_OF_ORDERNESS,
            allowed_lateness: 0,
            hold_until_checkpoint: true,
            partition_scoped: false,
            groups: GroupLayout {
                seed: 0,
                groups: key_groups(),
            },
        };
        let partitions = partitions();
        let mut engine = Engine::new(cfg);
        engine.assign(&partitions);
        Pipeline {
            engine,
            decoder: Decoder::new(
                FieldSource::Pointer("/user".into()),
                Some("/amount".into()),
                TimeSource::Pointer("/ts".into()),
            ),
            partitions,
            offsets: Offsets::new(),
            rng: Rng(7),
            generated: 0,
            since_checkpoint: 0,
            next_checkpoint: 1,
            batch: Vec::new(),
        }
    }

    /// Generates the next `n` messages into `batch` (not timed).
    fn generate(&mut self, n: u64) {
        self.batch.clear();
        for _ in 0..n {
            let newest = T0 + self.generated as i64 * STREAM_STEP_MS;
            self.generated += 1;
            let ts = newest - self.rng.below(STREAM_JITTER_MS) as i64;
            let user = self.rng.below(STREAM_KEYS);
            let amount = self.rng.below(100);
            let (partition, offset) = self.offsets.next();
            let payload =
                format!(r#"{{"user":"u{user}","amount":{amount},"ts":{ts}}}"#).into_bytes();
            self.batch.push(Message {
                partition,
                offset,
                payload,
            });
        }
    }

    /// Processes `iters` records and returns the time spent, leaving out generation and
    /// snapshots.
    fn run(&mut self, iters: u64) -> Duration {
        let mut elapsed = Duration::ZERO;
        let mut left = iters;
        let mut rejected = 0u64;
        while left > 0 {
            let n = left.min(CHECKPOINT_EVERY - self.since_checkpoint);
            self.generate(n);
            let start = Instant::now();
            // as the service does: a batch of records decoded, their state asked for, then
            // each processed
            let mut decoded = Vec::with_capacity(RECORDS_AHEAD);
            for chunk in self.batch.chunks(RECORDS_AHEAD) {
                decoded.extend(
                    chunk
                        .iter()
                        .map(|m| self.decoder.decode(None, Some(&m.payload), None)),
                );
                self.engine.prefetch_records(
                    chunk
                        .iter()
                        .zip(&decoded)
                        .map(|(m, record)| (&self.partitions[m.partition], record)),
                );
                for (m, record) in chunk.iter().zip(decoded.drain(..)) {
                    let outcome =
                        self.engine
                            .process(&self.partitions[m.partition], m.offset, record);
                    if outcome != Outcome::Accepted {
                        rejected += 1;
                    }
                    // the service hands whatever became emittable to the sink after every
                    // record
                    let ready = self.engine.take_emission();
                    if !ready.is_empty() {
                        self.engine.emitted(ready.into_windows().map(|w| w.id));
                    }
                }
            }
            elapsed += start.elapsed();
            left -= n;
            self.since_checkpoint += n;
            if self.since_checkpoint == CHECKPOINT_EVERY {
                elapsed += self.checkpoint();
            }
        }
        assert_eq!(rejected, 0, "every generated record must be accepted");
        elapsed
    }

    /// Takes a checkpoint, completes it at once, and emits and acknowledges the windows it
    /// released. Returns the time spent on everything but the snapshot.
    fn checkpoint(&mut self) -> Duration {
        let id = self.next_checkpoint;
        self.next_checkpoint += 1;
        self.since_checkpoint = 0;
        drop(black_box(self.engine.snapshot(
            checkpointer::checkpoint_id::CheckpointId(id),
            false,
        )));
        let start = Instant::now();
        self.engine
            .checkpoint_completed(checkpointer::checkpoint_id::CheckpointId(id));
        let ready = self.engine.take_emission();
        self.engine.emitted(ready.into_windows().map(|w| w.id));
        start.elapsed()
    }
}

fn decode_aggregate(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_aggregate");
    group.throughput(Throughput::Elements(1));
    let mut pipeline = Pipeline::new();
    group.bench_function("3_windows_10k_keys", |b| {
        b.iter_custom(|iters| pipeline.run(iters))
    });
    group.finish();
}

fn live_config() -> EngineConfig {
    EngineConfig {
        windows: vec![WindowDef {
            name: "tumbling_1h".into(),
            kind: WindowKind::Tumbling { size: HOUR },
        }],
        max_out_of_orderness: MAX_OUT_OF_ORDERNESS,
        allowed_lateness: 0,
        hold_until_checkpoint: true,
        partition_scoped: false,
        groups: GroupLayout {
            seed: 0,
            groups: key_groups(),
        },
    }
}

/// The sled store of one live state, holding a chain of checkpoints.
struct Durable {
    dir: TempDir,
    /// `None` only while a benchmark reopens it.
    store: Option<Store>,
    last_id: u64,
    /// Whether the size of a delta was printed.
    delta_reported: bool,
    /// Whether the store was reopened yet.
    reopened: bool,
}

/// An engine holding `keys` open windows (keys `k0`..), built once and reused by every
/// benchmark of that size.
struct LiveState {
    keys: usize,
    engine: Engine,
    partitions: Vec<Partition>,
    offsets: Offsets,
    /// Next key to update; updates walk the key space round-robin.
    cursor: usize,
    /// Event time of updates; stays inside the one hour window so nothing closes.
    clock: i64,
    next_id: u64,
    durable: Option<Durable>,
}

impl LiveState {
    fn build(keys: usize) -> Self {
        let partitions = partitions();
        let mut engine = Engine::new(live_config());
        engine.assign(&partitions);
        let mut state = LiveState {
            keys,
            engine,
            partitions,
            offsets: Offsets::new(),
            cursor: 0,
            clock: 0,
            next_id: 1,
            durable: None,
        };
        let started = Instant::now();
        state.update(keys);
        assert_eq!(state.engine.open_windows(), keys);
        // the build is not a checkpoint interval: start from a clean change set
        let id = state.take_id();
        drop(
            state
                .engine
                .snapshot(checkpointer::checkpoint_id::CheckpointId(id), false),
        );
        eprintln!(
            "live state of {keys} keys built in {:.1?}",
            started.elapsed()
        );
        state
    }

    fn touched(&self) -> usize {
        self.keys * TOUCHED_PERCENT / 100
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Feeds one record to each of the next `n` keys.
    fn update(&mut self, n: usize) {
        let window_start = tumbling_start(T0, HOUR);
        for _ in 0..n {
            let key = format!("k{}", self.cursor);
            self.cursor = (self.cursor + 1) % self.keys;
            // cycles through the first 50 minutes of the hour: far from closing it
            let ts = window_start + self.clock;
            self.clock = (self.clock + 1) % (50 * MINUTE);
            let (p, offset) = self.offsets.next();
            let record = Record {
                key: key.into(),
                value: Some((offset % 100) as f64),
                ts: checkpointer::event_time::EventTime(ts),
            };
            let outcome = self.engine.process(&self.partitions[p], offset, Ok(record));
            assert_eq!(outcome, Outcome::Accepted);
        }
    }

    /// The store, created on first use with a full checkpoint of the current state.
    fn durable(&mut self) -> &mut Durable {
        if self.durable.is_none() {
            let dir = tempfile::tempdir().expect("temporary directory");
            let store =
                Store::open(dir.path(), checkpointer::store::Open::Create).expect("open store");
            let id = self.take_id();
            let cp = Checkpoint {
                id: checkpointer::checkpoint_id::CheckpointId(id),
                base: None,
                trigger_ms: 0,
                spec: Default::default(),
                delta: self
                    .engine
                    .snapshot(checkpointer::checkpoint_id::CheckpointId(id), true),
            };
            let stats = write(&store, &cp).expect("write full state");
            eprintln!(
                "store of {} keys: full checkpoint {} bytes, written in {:.1?} + flushed in {:.1?}",
                self.keys, stats.bytes, stats.write, stats.flush
            );
            self.durable = Some(Durable {
                dir,
                store: Some(store),
                last_id: id,
                delta_reported: false,
                reopened: false,
            });
        }
        self.durable.as_mut().expect("store just created")
    }
}

fn stall(live: &mut LiveState, iters: u64, full: bool) -> Duration {
    let mut elapsed = Duration::ZERO;
    for _ in 0..iters {
        live.update(live.touched());
        let id = live.take_id();
        let start = Instant::now();
        let delta = live
            .engine
            .snapshot(checkpointer::checkpoint_id::CheckpointId(id), full);
        elapsed += start.elapsed();
        // a delta carries every changed group whole: at least the touched keys
        let carried: usize = delta.groups.iter().map(|g| g.len()).sum();
        if full {
            assert_eq!(carried, live.keys);
        } else {
            assert!(carried >= live.touched());
        }
        drop(black_box(delta));
    }
    elapsed
}

/// Updates 10% of the keys and writes the delta checkpoint. Returns how long the write took,
/// flush included.
fn write_delta(live: &mut LiveState) -> Duration {
    live.update(live.touched());
    let base = live.durable().last_id;
    let id = live.take_id();
    let cp = Checkpoint {
        id: checkpointer::checkpoint_id::CheckpointId(id),
        base: Some(checkpointer::checkpoint_id::CheckpointId(base)),
        trigger_ms: 0,
        spec: Default::default(),
        delta: live
            .engine
            .snapshot(checkpointer::checkpoint_id::CheckpointId(id), false),
    };
    let keys = live.keys;
    let durable = live.durable();
    let store = durable.store.as_ref().expect("store is open");
    let start = Instant::now();
    let stats = write(store, &cp).expect("write checkpoint");
    let took = start.elapsed();
    durable.last_id = id;
    if !durable.delta_reported {
        durable.delta_reported = true;
        eprintln!(
            "store of {keys} keys: delta checkpoint of {} groups, {} bytes",
            cp.delta.groups.len(),
            stats.bytes
        );
    }
    took
}

fn checkpoint_duration(live: &mut LiveState, iters: u64) -> Duration {
    (0..iters).map(|_| write_delta(live)).sum()
}

/// Opens the store at `path` and returns when the successful attempt started. sled's background
/// threads may hold the directory lock for a moment after the previous handle is dropped; a
/// restarted service is a new process and does not wait for that, so the waiting is left out.
fn reopen_store(path: &Path) -> (Instant, Store) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let start = Instant::now();
        match Store::open(path, checkpointer::store::Open::Create) {
            Ok(store) => return (start, store),
            Err(StoreError::Locked { .. }) if start < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("reopen store: {e}"),
        }
    }
}

/// Restores from the store. With `reopen`, every restore follows a delta checkpoint and
/// reopens the store, as a restart of the service after it wrote a checkpoint does.
fn restore(live: &mut LiveState, iters: u64, reopen: bool) -> Duration {
    let keys = live.keys;
    let mut elapsed = Duration::ZERO;
    for _ in 0..iters {
        if reopen {
            write_delta(live);
            // closing is not part of a restart
            live.durable().store = None;
        }
        let durable = live.durable();
        let mut start = Instant::now();
        if reopen {
            let (opened, store) = reopen_store(durable.dir.path());
            start = opened;
            durable.store = Some(store);
        }
        let store = durable.store.as_ref().expect("store is open");
        let (meta, state) = store
            .load()
            .expect("load checkpoint")
            .expect("the store holds a checkpoint");
        let engine = Engine::from_state(live_config(), state).expect("restore engine");
        let took = start.elapsed();
        elapsed += took;
        if reopen && !durable.reopened {
            // sled replays its log on open: the first reopen after a long write history is the
            // slowest, so it is printed on its own
            durable.reopened = true;
            eprintln!("store of {keys} keys: first reopen + load + restore took {took:.1?}");
        }
        assert_eq!(
            meta.id,
            checkpointer::checkpoint_id::CheckpointId(durable.last_id)
        );
        assert_eq!(engine.open_windows(), keys);
        drop(black_box(engine));
    }
    elapsed
}

/// One benchmark of group `group` on the live state of `keys` keys held in `slot`. The state,
/// and with `store` its store, are built on first use, outside any timing, so a filtered run
/// builds only what it needs.
fn live_bench(
    c: &mut Criterion,
    group: &str,
    keys: usize,
    slot: &mut Option<LiveState>,
    store: bool,
    mut routine: impl FnMut(&mut LiveState, u64) -> Duration,
) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.bench_function(BenchmarkId::from_parameter(keys), |b| {
        let live = slot.get_or_insert_with(|| LiveState::build(keys));
        if store {
            live.durable();
        }
        b.iter_custom(|iters| routine(live, iters))
    });
    g.finish();
}

fn live_state(c: &mut Criterion) {
    // One key count at a time: the previous state and its store are dropped before the next is
    // built, so each size runs as a service of that size would, without the memory and the
    // background work of a larger store in the same process.
    for keys in LIVE_KEYS {
        let slot = &mut None;
        live_bench(c, "checkpoint_stall", keys, slot, false, |live, iters| {
            stall(live, iters, false)
        });
        live_bench(
            c,
            "checkpoint_stall_full",
            keys,
            slot,
            false,
            |live, iters| stall(live, iters, true),
        );
        live_bench(
            c,
            "checkpoint_duration",
            keys,
            slot,
            true,
            checkpoint_duration,
        );
        live_bench(c, "restore_reopen", keys, slot, true, |live, iters| {
            restore(live, iters, true)
        });
        live_bench(c, "restore", keys, slot, true, |live, iters| {
            restore(live, iters, false)
        });
    }
}

criterion_group!(benches, decode_aggregate, live_state);
criterion_main!(benches);

/// One checkpoint through the store, as the service's writer does it.
fn write(
    store: &Store,
    cp: &checkpointer::checkpoint::Checkpoint,
) -> Result<checkpointer::store::WriteStats, checkpointer::store::StoreError> {
    use checkpointer::checkpoint::history::{CheckpointRecord, Status};
    use checkpointer::checkpoint::protocol::meta_of;
    store.write(&checkpointer::store::WriteRequest {
        checkpoint: cp,
        record: CheckpointRecord::from_meta(&meta_of(cp, 0, 0), Status::InProgress),
        savepoint: None,
        started: Instant::now(),
    })
}
