//! The settings tree: YAML file layered under `CHECKPOINTER_<SECTION>__<KEY>` environment
//! overrides, explicit defaults, and `validate()` for the rules that span several keys.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::checkpoint::choice::RestoreFrom;
use crate::checkpoint::{InputSpec, StateSpec};
use crate::engine::{AggregateKind, FieldSource, TimeSource, WindowDef, WindowKind};
pub use crate::position::OffsetReset;

/// Everything that can go wrong while loading or validating configuration. Each variant names
/// the offending key so the operator can fix it without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration in {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub input: InputSettings,
    pub windows: Vec<WindowSettings>,
    #[serde(default = "default_aggregates")]
    pub aggregates: Vec<AggregateKind>,
    #[serde(default)]
    pub watermark: WatermarkSettings,
    pub output: OutputSettings,
    pub checkpoint: CheckpointSettings,
    #[serde(default)]
    pub state: StateSettings,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list (librdkafka `bootstrap.servers`).
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    #[serde(default)]
    pub auto_offset_reset: OffsetReset,
    /// Where a partition the checkpoint holds no position for starts: the group's committed
    /// offset (else `auto_offset_reset`), its earliest or its latest offset. Unset:
    /// `auto_offset_reset`.
    #[serde(default)]
    pub start_from: Option<StartFrom>,
    /// What a held position the broker no longer has (records deleted by retention, the
    /// topic recreated) does: stop, or move that partition to its earliest or latest offset.
    #[serde(default)]
    pub on_offset_out_of_range: OnOutOfRange,
    /// Static group membership (`group.instance.id`), e.g. the pod name: a restarted instance
    /// gets its partitions back without waiting for its old session to expire.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Passed verbatim to librdkafka for both the consumer and the producer.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// With `state.scope: instance` (partitions assigned directly, no group membership): how
    /// often the topics are asked for partitions added since the start; `0s` looks at start only
    /// (and for topics not found yet). Partition scope follows the group's rebalances instead.
    #[serde(
        default = "default_partition_discovery_interval",
        with = "humantime_serde"
    )]
    pub partition_discovery_interval: Duration,
}

fn default_partition_discovery_interval() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputSettings {
    /// `$key` (the Kafka message key) or a JSON pointer such as `/user_id`.
    pub key: String,
    /// JSON pointer to the numeric value; required by sum, min, max and mean.
    #[serde(default)]
    pub value: Option<String>,
    /// `$timestamp` (the Kafka message timestamp) or a JSON pointer to epoch milliseconds.
    pub timestamp: String,
    /// Topic that invalid and late input records are copied to, unchanged, with headers naming
    /// the reason and where they came from (and, with `output.on_error: dead_letter`, final
    /// windows the output topic refuses for good). None: they are counted and skipped.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSettings {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: WindowType,
    #[serde(default, with = "humantime_serde")]
    pub size: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub hop: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub gap: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowType {
    Tumbling,
    Hopping,
    Session,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSettings {
    #[serde(default = "default_out_of_orderness", with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    #[serde(default, with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// How far ahead of the wall clock a record's event time may be; further ahead, it is
    /// invalid (`future_timestamp`) and moves no watermark.
    #[serde(default = "default_max_future_skew", with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// A partition caught up and quiet this long no longer holds the service watermark back,
    /// until its next record. Unset: never.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// With `state.scope: partition`: whether an idle partition's own windows close as the
    /// wall clock advances.
    #[serde(default)]
    pub idle_advance: IdleAdvance,
}

/// `kafka.start_from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The group's committed offset (migrating from a consumer of the same group), else
    /// `auto_offset_reset`.
    Committed,
    Earliest,
    Latest,
}

/// `kafka.on_offset_out_of_range`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOutOfRange {
    /// Exit 1 naming the partition, the held position and the broker's offsets; the
    /// checkpoint stays as it is.
    #[default]
    Fail,
    /// Move the partition to the earliest offset the broker has (skipping only what is gone).
    Earliest,
    /// Move the partition to the latest offset (skipping everything up to it).
    Latest,
}

impl KafkaSettings {
    /// Where a partition with neither a held position nor (with `start_from: committed`) a
    /// committed offset starts.
    pub fn reset(&self) -> OffsetReset {
        match self.start_from {
            Some(StartFrom::Earliest) => OffsetReset::Earliest,
            Some(StartFrom::Latest) => OffsetReset::Latest,
            Some(StartFrom::Committed) | None => self.auto_offset_reset,
        }
    }

    /// Whether a partition with no held position starts at the group's committed offset.
    pub fn from_committed(&self) -> bool {
        self.start_from == Some(StartFrom::Committed)
    }
}

/// `watermark.idle_advance`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleAdvance {
    /// An idle partition's own windows wait for its next records.
    #[default]
    None,
    /// An idle partition's own event time follows the wall clock (not deterministic).
    WallClock,
}

fn default_max_future_skew() -> Duration {
    Duration::from_secs(3600)
}

impl Default for WatermarkSettings {
    fn default() -> Self {
        WatermarkSettings {
            max_out_of_orderness: default_out_of_orderness(),
            allowed_lateness: Duration::ZERO,
            max_future_skew: default_max_future_skew(),
            idle_timeout: None,
            idle_advance: IdleAdvance::None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSettings {
    pub topic: String,
    /// Final windows waiting for the output (not acknowledged yet) past which consumption
    /// pauses until half of them are acknowledged; 0: no bound.
    #[serde(default = "default_max_pending_windows")]
    pub max_pending_windows: u64,
    /// What a final window the output topic refuses for good (too large, not authorized,
    /// unknown topic, invalid record) does: stop the service or go to the dead-letter topic.
    #[serde(default)]
    pub on_error: OnOutputError,
}

/// `output.on_error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnOutputError {
    /// Exit 1 naming the window and the error; the state keeps the window, which is sent
    /// again at the next start.
    #[default]
    Fail,
    /// Write the window to `input.dead_letter_topic` with headers naming the error, and go on.
    DeadLetter,
}

fn default_max_pending_windows() -> u64 {
    1_000_000
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointMode {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSettings {
    pub dir: PathBuf,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default)]
    pub mode: CheckpointMode,
    #[serde(default, with = "humantime_serde")]
    pub min_pause: Duration,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    #[serde(default = "default_tolerable_failures")]
    pub tolerable_failures: u32,
    /// Upper bound on a graceful stop: final checkpoint, emission of the windows it closed.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a start waits for the store lock held by another process (an old instance
    /// still shutting down on the same volume) before it gives up.
    #[serde(default = "default_lock_wait", with = "humantime_serde")]
    pub lock_wait: Duration,
    /// Complete checkpoints kept restorable; older ones are removed.
    #[serde(default = "default_retained")]
    pub retained: usize,
    /// Savepoints taken without a name that are kept; older ones are removed (named ones stay
    /// until deleted).
    #[serde(default = "default_retained_unnamed_savepoints")]
    pub retained_unnamed_savepoints: usize,
    /// Savepoints operators may ask for in a minute; more are refused (429).
    #[serde(default = "default_savepoints_per_minute")]
    pub savepoints_per_minute: u32,
    /// What a graceful stop does with the checkpoints.
    #[serde(default)]
    pub on_cancel: OnCancel,
    /// What to restore at start.
    #[serde(default)]
    pub restore_from: RestoreFrom,
    /// With `restore_from: latest`, take the newest checkpoint even if a savepoint is newer.
    #[serde(default)]
    pub prefer_checkpoint_for_recovery: bool,
    /// Checkpoint and savepoint attempts kept in the history.
    #[serde(default = "default_history")]
    pub history: u64,
    /// Start even when restored state no longer fits the configuration, dropping the open
    /// windows that do not (Flink's allowNonRestoredState). Off: such a start is refused.
    #[serde(default)]
    pub allow_non_restored_state: bool,
    /// Bound of the store's page cache (sled's `cache_capacity`), e.g. `64 MiB`.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: bytesize::ByteSize,
}

/// The least `state.max_memory` accepted.
const MIN_MAX_MEMORY: u64 = 16 << 20;

fn default_retained_unnamed_savepoints() -> usize {
    5
}

fn default_savepoints_per_minute() -> u32 {
    6
}

fn default_cache_capacity() -> bytesize::ByteSize {
    bytesize::ByteSize::b(crate::store::DEFAULT_CACHE_CAPACITY)
}

/// `checkpoint.on_cancel`: Flink's RETAIN_ON_CANCELLATION / DELETE_ON_CANCELLATION.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCancel {
    #[default]
    Retain,
    Delete,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// What one window aggregates: every partition's records of a key (`instance`), or one
    /// source partition's (`partition`), which lets partitions move between instances.
    #[serde(default)]
    pub scope: StateScope,
    /// Compacted Kafka topic every checkpoint publishes its per-partition changes to, so that
    /// an instance taking over a partition restores its state (needs `scope: partition`).
    #[serde(default)]
    pub changelog_topic: Option<String>,
    /// Resident memory past which consumption pauses until it fell below 90% of it; unset:
    /// 80% of the container's memory limit, if it has one.
    #[serde(default)]
    pub max_memory: Option<bytesize::ByteSize>,
    /// Open windows (window instances of a key) past which consumption pauses until they fell
    /// below 90% of it: the key-count guard. Unset: no limit.
    #[serde(default)]
    pub max_open_windows: Option<u64>,
    /// What a changelog record this build cannot read (damaged, or written by a newer build)
    /// does when a partition's state is restored: stop naming it, or skip it and restore the
    /// newest complete publication without it.
    #[serde(default)]
    pub on_unreadable_changelog: OnUnreadable,
    /// Key groups per state scope of a new store (1 to 65535): the unit a checkpoint writes.
    /// Recorded when the store is created; a store keeps the count it was created with. Unset:
    /// see [`StateSettings::key_groups`].
    #[serde(default)]
    pub key_groups: Option<u16>,
}

impl StateSettings {
    /// The key groups a new store gets: `state.key_groups`, else the engine's default, with or
    /// without a changelog (a group too large for one changelog record travels in pieces).
    pub fn key_groups(&self) -> u16 {
        self.key_groups
            .unwrap_or(crate::engine::group::DEFAULT_GROUPS)
    }
}

/// What a configuration without a `state` section gets: each field's own default.
impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            scope: StateScope::default(),
            changelog_topic: None,
            max_memory: None,
            max_open_windows: None,
            on_unreadable_changelog: OnUnreadable::default(),
            key_groups: None,
        }
    }
}

/// `state.on_unreadable_changelog`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnreadable {
    /// Stop (exit 1) naming the changelog partition and offset; every instance that gets the
    /// partition stops the same way until an operator decides.
    #[default]
    Fail,
    /// Skip the record: the publication it belongs to is incomplete, so the newest complete
    /// one before it is restored, and the records after that are read again.
    Skip,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateScope {
    #[default]
    Instance,
    Partition,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// File holding the token that requests changing the instance (savepoints, stops,
    /// deletions) must carry as `Authorization: Bearer <token>`; e.g. a mounted secret.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Start on an address other than loopback without a token (anyone who reaches it can
    /// stop the service and delete its savepoints). Off: such a start is refused.
    #[serde(default)]
    pub allow_unauthenticated_admin: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: default_listen(),
            admin_token_file: None,
            allow_unauthenticated_admin: false,
        }
    }
}

impl HttpSettings {
    /// Listening where others can reach it, with nothing asked of them.
    fn open_to_others(&self) -> bool {
        !self.listen.ip().is_loopback() && self.admin_token_file.is_none()
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// librdkafka options whose values are credentials: masked wherever the configuration is shown.
pub fn is_secret(option: &str) -> bool {
    let k = option.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        ".key",
        "oauthbearer.config",
        "jaas",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn default_aggregates() -> Vec<AggregateKind> {
    vec![
        AggregateKind::Count,
        AggregateKind::Sum,
        AggregateKind::Min,
        AggregateKind::Max,
        AggregateKind::Mean,
    ]
}
fn default_out_of_orderness() -> Duration {
    Duration::from_secs(5)
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_max_concurrent() -> u32 {
    1
}
fn default_tolerable_failures() -> u32 {
    3
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_lock_wait() -> Duration {
    Duration::from_secs(60)
}
fn default_retained() -> usize {
    3
}
fn default_history() -> u64 {
    1000
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9180))
}

/// librdkafka settings the service manages itself (overriding them would break the guarantees),
/// each with what to do instead.
const MANAGED_KAFKA_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "set kafka.brokers instead"),
    ("metadata.broker.list", "set kafka.brokers instead"),
    ("group.id", "set kafka.group_id instead"),
    ("group.instance.id", "set kafka.instance_id instead"),
    (
        "enable.auto.commit",
        "offsets are committed to the group after each checkpoint",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed to the group after each checkpoint",
    ),
    (
        "enable.partition.eof",
        "the service follows the end of each partition itself",
    ),
    (
        "auto.offset.reset",
        "set kafka.auto_offset_reset, kafka.start_from or kafka.on_offset_out_of_range instead",
    ),
    // the output's, the dead-letter and the changelog writes must be neither lost nor repeated
    (
        "enable.idempotence",
        "the producers are always idempotent, so that a retry never writes a window twice",
    ),
    (
        "acks",
        "the producers always wait for all in-sync replicas (acks=all)",
    ),
    (
        "request.required.acks",
        "the producers always wait for all in-sync replicas (acks=all)",
    ),
    (
        "transactional.id",
        "the producers are idempotent, not transactional: exactly-once comes from the checkpoints",
    ),
];

/// Why `key` of `kafka.options` is refused, if it is: a setting the service manages, named as
/// is or with librdkafka's `topic.` prefix (which librdkafka strips).
fn managed_kafka_option(key: &str) -> Option<&'static str> {
    let name = key.trim();
    let name = name.strip_prefix("topic.").unwrap_or(name);
    MANAGED_KAFKA_OPTIONS
        .iter()
        .find(|(managed, _)| *managed == name)
        .map(|(_, instead)| *instead)
}

/// Most windows a hopping definition puts each record in (`size / hop`, rounded up): each
/// costs work per record and memory per key, so a typo in a hop (`1s` for `1m` in an hour's
/// window: 3,600) is refused rather than making the service thousands of times slower.
pub const MAX_HOPS: i64 = 1_000;

/// Longest window size, hop or gap: keeps window arithmetic on valid timestamps in range.
const MAX_WINDOW_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &["kafka.topics", "aggregates"];

impl Settings {
    /// Loads the YAML file at `path`, then applies `CHECKPOINTER_*` overrides from `env`
    /// (the process environment when `None`), then validates.
    pub fn load(
        path: &Path,
        env: Option<HashMap<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml_str(&text, &path.display().to_string(), env)
    }

    pub fn from_yaml_str(
        yaml: &str,
        origin: &str,
        env: Option<HashMap<String, String>>,
    ) -> Result<Settings, ConfigError> {
        let env_map: HashMap<String, String> = match env {
            Some(map) => map,
            None => std::env::vars().collect(),
        };
        // only CHECKPOINTER_<SECTION>__<KEY> (and the top-level list CHECKPOINTER_AGGREGATES)
        // are overrides; other CHECKPOINTER_* variables, such as CHECKPOINTER_CONFIG, are not
        let env_map: HashMap<String, String> = env_map
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix("CHECKPOINTER_")
                    .is_some_and(|rest| rest.contains("__") || rest == "AGGREGATES")
            })
            .collect();
        let mut environment = config::Environment::with_prefix("CHECKPOINTER")
            .prefix_separator("_")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(env_map.into_iter().collect()));
        for key in LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        let built = config::Config::builder()
            .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
            .add_source(environment)
            .build()
            .map_err(|e| ConfigError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        let settings: Settings = built.try_deserialize().map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Cross-field rules. Returns the first violation, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "must not be empty"));
        }
        if k.instance_id.as_ref().is_some_and(|i| i.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "kafka.instance_id",
                "must not be empty when set",
            ));
        }
        if k.group_id.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.group_id", "must not be empty"));
        }
        if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "kafka.topics",
                "must list at least one non-empty topic name",
            ));
        }
        if k.topics.contains(&self.output.topic) {
            return Err(ConfigError::invalid(
                "output.topic",
                format!(
                    "`{}` is also an input topic; the service would consume its own output",
                    self.output.topic
                ),
            ));
        }
        for key in k.options.keys() {
            if let Some(instead) = managed_kafka_option(key) {
                return Err(ConfigError::invalid(
                    format!("kafka.options.{key}"),
                    format!("is managed by checkpointer: {instead}"),
                ));
            }
        }
        if self.output.topic.trim().is_empty() {
            return Err(ConfigError::invalid("output.topic", "must not be empty"));
        }
        self.key_source()?;
        self.time_source()?;
        if let Some(v) = &self.input.value {
            if !v.starts_with('/') {
                return Err(ConfigError::invalid(
                    "input.value",
                    format!("`{v}` is not a JSON pointer (it must start with `/`)"),
                ));
            }
        }
        if let Some(t) = &self.state.changelog_topic {
            if self.state.scope != StateScope::Partition {
                return Err(ConfigError::invalid(
                    "state.changelog_topic",
                    "needs state.scope: partition (only partition-scoped state can move between instances)",
                ));
            }
            if t.trim().is_empty() || k.topics.contains(t) || *t == self.output.topic {
                return Err(ConfigError::invalid(
                    "state.changelog_topic",
                    format!("`{t}` must be a non-empty topic of its own, neither an input nor the output topic"),
                ));
            }
        }
        if let Some(t) = &self.input.dead_letter_topic {
            if t.trim().is_empty()
                || k.topics.contains(t)
                || *t == self.output.topic
                || self.state.changelog_topic.as_ref() == Some(t)
            {
                return Err(ConfigError::invalid(
                    "input.dead_letter_topic",
                    format!("`{t}` must be a non-empty topic of its own, neither an input, the output nor the changelog topic"),
                ));
            }
        }
        if self.output.on_error == OnOutputError::DeadLetter
            && self.input.dead_letter_topic.is_none()
        {
            return Err(ConfigError::invalid(
                "output.on_error",
                "dead_letter needs input.dead_letter_topic, the topic refused windows go to",
            ));
        }
        if self.watermark.max_future_skew < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "watermark.max_future_skew",
                "must be at least 1s: records stamped by producers whose clocks run a little \
                 ahead would be refused (default 1h)",
            ));
        }
        let w = &self.watermark;
        if w.idle_timeout
            .is_some_and(|t| t < Duration::from_millis(100))
        {
            return Err(ConfigError::invalid(
                "watermark.idle_timeout",
                "must be at least 100ms (partitions are looked at every quarter second)",
            ));
        }
        if w.idle_advance == IdleAdvance::WallClock {
            if w.idle_timeout.is_none() {
                return Err(ConfigError::invalid(
                    "watermark.idle_advance",
                    "wall_clock needs watermark.idle_timeout: it applies to idle partitions",
                ));
            }
            if self.state.scope != StateScope::Partition {
                return Err(ConfigError::invalid(
                    "watermark.idle_advance",
                    "wall_clock needs state.scope: partition (with instance scope an idle partition already stops holding the other partitions' windows back)",
                ));
            }
        }
        if self.checkpoint.cache_capacity.as_u64() < 1 << 20 {
            return Err(ConfigError::invalid(
                "checkpoint.cache_capacity",
                format!(
                    "{} is too small for the store's page cache; give at least 1 MiB (default 64 MiB)",
                    self.checkpoint.cache_capacity
                ),
            ));
        }
        if self
            .state
            .max_memory
            .is_some_and(|m| m.as_u64() < MIN_MAX_MEMORY)
        {
            return Err(ConfigError::invalid(
                "state.max_memory",
                "must be at least 16 MiB: the process needs about that to start",
            ));
        }
        if self.state.key_groups == Some(0) {
            return Err(ConfigError::invalid(
                "state.key_groups",
                format!(
                    "0 groups cannot hold a key; give 1 to 65535 (default {})",
                    crate::engine::group::DEFAULT_GROUPS
                ),
            ));
        }
        if self.state.max_open_windows == Some(0) {
            return Err(ConfigError::invalid(
                "state.max_open_windows",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if self.aggregates.is_empty() {
            return Err(ConfigError::invalid(
                "aggregates",
                "must list at least one aggregate",
            ));
        }
        let unique: BTreeSet<_> = self.aggregates.iter().collect();
        if unique.len() != self.aggregates.len() {
            return Err(ConfigError::invalid(
                "aggregates",
                "lists an aggregate twice",
            ));
        }
        if self.input.value.is_none() && self.aggregates.iter().any(|a| a.needs_value()) {
            return Err(ConfigError::invalid(
                "input.value",
                "is required when aggregates include sum, min, max or mean",
            ));
        }
        self.window_defs()?;
        let c = &self.checkpoint;
        if c.dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("checkpoint.dir", "must not be empty"));
        }
        if c.interval.is_zero() {
            return Err(ConfigError::invalid(
                "checkpoint.interval",
                "must be greater than 0",
            ));
        }
        if c.timeout.is_zero() {
            return Err(ConfigError::invalid(
                "checkpoint.timeout",
                "must be greater than 0",
            ));
        }
        if c.max_concurrent == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.max_concurrent",
                "must be at least 1",
            ));
        }
        if c.retained == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.retained",
                "must be at least 1",
            ));
        }
        if c.history == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.history",
                "must be at least 1",
            ));
        }
        if c.retained_unnamed_savepoints == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.retained_unnamed_savepoints",
                "must be at least 1: a savepoint taken without a name would be removed as soon as it is made",
            ));
        }
        if c.savepoints_per_minute == 0 {
            return Err(ConfigError::invalid(
                "checkpoint.savepoints_per_minute",
                "must be at least 1 (every savepoint would be refused)",
            ));
        }
        if c.shutdown_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "checkpoint.shutdown_timeout",
                "must be greater than 0",
            ));
        }
        let h = &self.http;
        if h.admin_token_file
            .as_ref()
            .is_some_and(|f| f.as_os_str().is_empty())
        {
            return Err(ConfigError::invalid(
                "http.admin_token_file",
                "must not be empty when set",
            ));
        }
        if h.open_to_others() && !h.allow_unauthenticated_admin {
            return Err(ConfigError::invalid(
                "http.admin_token_file",
                format!(
                    "is required: http.listen {} is not a loopback address, and without a token \
                     anyone who reaches it can stop the service and delete its savepoints; name \
                     a file holding a token (e.g. a mounted secret made by `openssl rand -hex \
                     32`), or set http.allow_unauthenticated_admin: true to accept that",
                    h.listen
                ),
            ));
        }
        Ok(())
    }

    /// Advice that does not stop the service: returned by `check-config` and logged at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let c = &self.checkpoint;
        if c.min_pause >= c.interval {
            out.push(format!(
                "checkpoint.min_pause ({}) is not shorter than checkpoint.interval ({}): checkpoints will be spaced by min_pause",
                humantime::format_duration(c.min_pause),
                humantime::format_duration(c.interval)
            ));
        }
        if c.retained == 1 {
            out.push("checkpoint.retained is 1: if the newest checkpoint is ever unreadable there is no older one to fall back to".to_string());
        }
        if c.timeout < c.interval {
            out.push(format!(
                "checkpoint.timeout ({}) is shorter than checkpoint.interval ({})",
                humantime::format_duration(c.timeout),
                humantime::format_duration(c.interval)
            ));
        }
        if self.http.open_to_others() {
            out.push(format!(
                "http.listen {} is not a loopback address and http.admin_token_file is not set: \
                 anyone who reaches it can stop the service and delete its savepoints \
                 (http.allow_unauthenticated_admin is true)",
                self.http.listen
            ));
        }
        out
    }

    pub fn key_source(&self) -> Result<FieldSource, ConfigError> {
        match self.input.key.as_str() {
            "$key" => Ok(FieldSource::MessageKey),
            p if p.starts_with('/') => Ok(FieldSource::Pointer(p.to_string())),
            other => Err(ConfigError::invalid(
                "input.key",
                format!("`{other}` must be `$key` or a JSON pointer starting with `/`"),
            )),
        }
    }

    pub fn time_source(&self) -> Result<TimeSource, ConfigError> {
        match self.input.timestamp.as_str() {
            "$timestamp" => Ok(TimeSource::MessageTimestamp),
            p if p.starts_with('/') => Ok(TimeSource::Pointer(p.to_string())),
            other => Err(ConfigError::invalid(
                "input.timestamp",
                format!("`{other}` must be `$timestamp` or a JSON pointer starting with `/`"),
            )),
        }
    }

    /// What checkpoints made under this configuration record about their state.
    pub fn state_spec(&self) -> Result<StateSpec, ConfigError> {
        Ok(StateSpec {
            windows: self.window_defs()?,
            aggregates: self.aggregates.clone(),
            input: Some(InputSpec {
                key: self.input.key.clone(),
                timestamp: self.input.timestamp.clone(),
                value: self.input.value.clone(),
            }),
            retired: Vec::new(),
            partition_scoped: self.state.scope == StateScope::Partition,
        })
    }

    /// The window definitions in engine form (milliseconds), checked.
    pub fn window_defs(&self) -> Result<Vec<WindowDef>, ConfigError> {
        if self.windows.is_empty() {
            return Err(ConfigError::invalid(
                "windows",
                "must define at least one window",
            ));
        }
        if self.windows.len() > usize::from(u16::MAX) {
            return Err(ConfigError::invalid("windows", "too many windows"));
        }
        let mut names = BTreeSet::new();
        let mut defs = Vec::with_capacity(self.windows.len());
        for (i, w) in self.windows.iter().enumerate() {
            let at = |field: &str| format!("windows[{i}].{field}");
            if w.name.is_empty() || w.name.contains('/') {
                return Err(ConfigError::invalid(
                    at("name"),
                    "must be non-empty and must not contain `/` (it is part of the output message key)",
                ));
            }
            if !names.insert(w.name.clone()) {
                return Err(ConfigError::invalid(
                    at("name"),
                    format!("`{}` is used by two windows", w.name),
                ));
            }
            let ms = |d: Option<Duration>, field: &str| -> Result<i64, ConfigError> {
                let d = d.ok_or_else(|| {
                    ConfigError::invalid(at(field), format!("is required for {:?} windows", w.kind))
                })?;
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                if ms <= 0 {
                    return Err(ConfigError::invalid(at(field), "must be at least 1ms"));
                }
                if ms > MAX_WINDOW_MS {
                    return Err(ConfigError::invalid(at(field), "must not exceed 100 years"));
                }
                Ok(ms)
            };
            let forbid = |d: Option<Duration>, field: &str| -> Result<(), ConfigError> {
                match d {
                    Some(_) => Err(ConfigError::invalid(
                        at(field),
                        format!("does not apply to {:?} windows", w.kind),
                    )),
                    None => Ok(()),
                }
            };
            let kind = match w.kind {
                WindowType::Tumbling => {
                    forbid(w.hop, "hop")?;
                    forbid(w.gap, "gap")?;
                    WindowKind::Tumbling {
                        size: ms(w.size, "size")?,
                    }
                }
                WindowType::Hopping => {
                    forbid(w.gap, "gap")?;
                    let size = ms(w.size, "size")?;
                    let hop = ms(w.hop, "hop")?;
                    if hop > size {
                        return Err(ConfigError::invalid(
                            at("hop"),
                            "must not be longer than size (records between windows would be lost)",
                        ));
                    }
                    // both at least 1 ms, and hop at most size
                    let windows = (size - 1) / hop + 1;
                    if windows > MAX_HOPS {
                        return Err(ConfigError::invalid(
                            at("hop"),
                            format!(
                                "puts every record in {windows} windows (size / hop), more than \
                                 the {MAX_HOPS} allowed: each costs work per record and memory \
                                 per key (is the hop a typo?)"
                            ),
                        ));
                    }
                    WindowKind::Hopping { size, hop }
                }
                WindowType::Session => {
                    forbid(w.size, "size")?;
                    forbid(w.hop, "hop")?;
                    WindowKind::Session {
                        gap: ms(w.gap, "gap")?,
                    }
                }
            };
            defs.push(WindowDef {
                name: w.name.clone(),
                kind,
            });
        }
        Ok(defs)
    }

    /// A copy safe to print: values of librdkafka options that look like secrets are masked.
    pub fn redacted(&self) -> Settings {
        let mut copy = self.clone();
        for (key, value) in copy.kafka.options.iter_mut() {
            if is_secret(key) {
                *value = "********".to_string();
            }
        }
        copy
    }
}

pub fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint_id::CheckpointId;

    const BASE: &str = r#"
kafka:
  brokers: 127.0.0.1:9092
  group_id: g
  topics: [events]
input:
  key: /user
  value: /amount
  timestamp: /ts
windows:
  - { name: minute, type: tumbling, size: 1m }
  - { name: hop, type: hopping, size: 1m, hop: 30s }
  - { name: sess, type: session, gap: 30s }
output:
  topic: out
checkpoint:
  dir: /tmp/x
  interval: 2s
"#;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_yaml_str(yaml, "test.yaml", Some(env))
    }

    fn err_text(yaml: &str, env: &[(&str, &str)]) -> String {
        match load(yaml, env) {
            Ok(_) => panic!("configuration was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn base_config_loads_with_defaults() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.checkpoint.interval, Duration::from_secs(2));
        assert_eq!(s.checkpoint.mode, CheckpointMode::ExactlyOnce);
        assert_eq!(s.checkpoint.max_concurrent, 1);
        assert_eq!(s.kafka.auto_offset_reset, OffsetReset::Earliest);
        assert_eq!(s.aggregates.len(), 5);
        assert_eq!(s.window_defs().expect("windows").len(), 3);
        assert_eq!(s.watermark.max_out_of_orderness, Duration::from_secs(5));
    }

    #[test]
    fn environment_overrides_file() {
        let s = load(
            BASE,
            &[
                ("CHECKPOINTER_KAFKA__BROKERS", "10.0.0.1:9092"),
                ("CHECKPOINTER_KAFKA__TOPICS", "a,b"),
                ("CHECKPOINTER_CHECKPOINT__INTERVAL", "30s"),
                ("CHECKPOINTER_CHECKPOINT__MAX_CONCURRENT", "2"),
                ("CHECKPOINTER_CHECKPOINT__MODE", "at_least_once"),
                ("UNRELATED", "x"),
            ],
        )
        .expect("valid");
        assert_eq!(s.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(s.kafka.topics, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(s.checkpoint.interval, Duration::from_secs(30));
        assert_eq!(s.checkpoint.max_concurrent, 2);
        assert_eq!(s.checkpoint.mode, CheckpointMode::AtLeastOnce);
    }

    #[test]
    fn other_checkpointer_variables_are_not_overrides() {
        let s = load(
            BASE,
            &[
                ("CHECKPOINTER_CONFIG", "/etc/checkpointer.yaml"),
                ("CHECKPOINTER_BIN", "/usr/bin/x"),
                ("CHECKPOINTER_AGGREGATES", "count,sum"),
            ],
        )
        .expect("valid");
        assert_eq!(s.aggregates, vec![AggregateKind::Count, AggregateKind::Sum]);
        // a misspelt section is still an error naming it
        let text = err_text(BASE, &[("CHECKPOINTER_KAFAK__BROKERS", "x:1")]);
        assert!(text.contains("kafak"), "{text}");
    }

    #[test]
    fn lifecycle_settings_have_defaults_and_are_checked() {
        let s = load(BASE, &[]).expect("valid");
        let c = &s.checkpoint;
        assert_eq!((c.retained, c.history), (3, 1000));
        assert_eq!(c.on_cancel, OnCancel::Retain);
        assert_eq!(c.restore_from, RestoreFrom::Latest);
        assert!(!c.prefer_checkpoint_for_recovery);
        let yaml = BASE.replace(
            "checkpoint:\n",
            "checkpoint:\n  restore_from: 42\n  on_cancel: delete\n  retained: 5\n",
        );
        let s = load(&yaml, &[]).expect("valid");
        assert_eq!(
            s.checkpoint.restore_from,
            RestoreFrom::Checkpoint(CheckpointId(42))
        );
        assert_eq!(s.checkpoint.on_cancel, OnCancel::Delete);
        assert_eq!(s.checkpoint.retained, 5);
        let s = load(
            BASE,
            &[
                ("CHECKPOINTER_CHECKPOINT__RESTORE_FROM", "savepoint:pre-2.0"),
                (
                    "CHECKPOINTER_CHECKPOINT__PREFER_CHECKPOINT_FOR_RECOVERY",
                    "true",
                ),
            ],
        )
        .expect("valid");
        assert_eq!(
            s.checkpoint.restore_from,
            RestoreFrom::Savepoint("pre-2.0".into())
        );
        assert!(s.checkpoint.prefer_checkpoint_for_recovery);
        let yaml = BASE.replace("checkpoint:\n", "checkpoint:\n  retained: 0\n");
        assert!(err_text(&yaml, &[]).contains("checkpoint.retained"));
        let text = err_text(BASE, &[("CHECKPOINTER_CHECKPOINT__RESTORE_FROM", "newest")]);
        assert!(text.contains("latest, none"), "{text}");
        let text = err_text(BASE, &[("CHECKPOINTER_CHECKPOINT__ON_CANCEL", "destroy")]);
        assert!(
            text.contains("on_cancel") || text.contains("destroy"),
            "{text}"
        );
    }

    #[test]
    fn single_topic_from_environment_is_a_list() {
        let s = load(BASE, &[("CHECKPOINTER_KAFKA__TOPICS", "only")]).expect("valid");
        assert_eq!(s.kafka.topics, vec!["only".to_string()]);
    }

    #[test]
    fn unknown_key_is_named() {
        let yaml = BASE.replace("interval: 2s", "interval: 2s\n  intervall: 3s");
        assert!(err_text(&yaml, &[]).contains("intervall"));
    }

    #[test]
    fn unknown_top_level_section_is_named() {
        let yaml = format!("{BASE}\nsinks: {{}}\n");
        assert!(err_text(&yaml, &[]).contains("sinks"));
    }

    #[test]
    fn bad_duration_is_rejected() {
        let yaml = BASE.replace("interval: 2s", "interval: two seconds");
        let text = err_text(&yaml, &[]);
        assert!(text.contains("interval"), "{text}");
    }

    #[test]
    fn the_future_skew_defaults_to_an_hour_and_is_at_least_a_second() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.watermark.max_future_skew, Duration::from_secs(3600));
        let s = load(BASE, &[("CHECKPOINTER_WATERMARK__MAX_FUTURE_SKEW", "10m")]).expect("valid");
        assert_eq!(s.watermark.max_future_skew, Duration::from_secs(600));
        let text = err_text(BASE, &[("CHECKPOINTER_WATERMARK__MAX_FUTURE_SKEW", "0s")]);
        assert!(text.contains("watermark.max_future_skew"), "{text}");
    }

    #[test]
    fn start_from_is_unset_by_default_and_overrides_auto_offset_reset_when_set() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.kafka.start_from, None);
        assert_eq!(s.kafka.reset(), OffsetReset::Earliest);
        assert!(!s.kafka.from_committed());
        let s = load(BASE, &[("CHECKPOINTER_KAFKA__START_FROM", "committed")]).expect("valid");
        assert!(s.kafka.from_committed());
        assert_eq!(s.kafka.reset(), OffsetReset::Earliest, "the fallback");
        let s = load(BASE, &[("CHECKPOINTER_KAFKA__START_FROM", "latest")]).expect("valid");
        assert_eq!(s.kafka.reset(), OffsetReset::Latest);
        let text = err_text(BASE, &[("CHECKPOINTER_KAFKA__START_FROM", "yesterday")]);
        assert!(
            text.contains("start_from") || text.contains("yesterday"),
            "{text}"
        );
    }

    #[test]
    fn the_dead_letter_topic_is_a_topic_of_its_own_and_dead_letter_output_needs_it() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.input.dead_letter_topic, None);
        assert_eq!(s.output.on_error, OnOutputError::Fail);
        let topic = ("CHECKPOINTER_INPUT__DEAD_LETTER_TOPIC", "dead");
        let divert = ("CHECKPOINTER_OUTPUT__ON_ERROR", "dead_letter");
        let s = load(BASE, &[topic, divert]).expect("valid");
        assert_eq!(s.input.dead_letter_topic.as_deref(), Some("dead"));
        assert_eq!(s.output.on_error, OnOutputError::DeadLetter);
        let text = err_text(BASE, &[divert]);
        assert!(
            text.contains("output.on_error") && text.contains("input.dead_letter_topic"),
            "{text}"
        );
        for same in ["events", "out", " "] {
            let text = err_text(BASE, &[("CHECKPOINTER_INPUT__DEAD_LETTER_TOPIC", same)]);
            assert!(text.contains("input.dead_letter_topic"), "{same}: {text}");
        }
        let text = err_text(BASE, &[("CHECKPOINTER_OUTPUT__ON_ERROR", "retry")]);
        assert!(text.contains("on_error"), "{text}");
        assert_eq!(s.state.on_unreadable_changelog, OnUnreadable::Fail);
        let skip = ("CHECKPOINTER_STATE__ON_UNREADABLE_CHANGELOG", "skip");
        let s = load(BASE, &[skip]).expect("valid");
        assert_eq!(s.state.on_unreadable_changelog, OnUnreadable::Skip);
    }

    #[test]
    fn key_groups_default_to_the_engines_with_or_without_a_changelog_and_refuse_zero_and_past_u16()
    {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.state.key_groups(), crate::engine::group::DEFAULT_GROUPS);
        let s = load(BASE, &[("CHECKPOINTER_STATE__KEY_GROUPS", "4096")]).expect("valid");
        assert_eq!(s.state.key_groups(), 4096);
        let changelog = [
            ("CHECKPOINTER_STATE__SCOPE", "partition"),
            ("CHECKPOINTER_STATE__CHANGELOG_TOPIC", "changes"),
        ];
        let s = load(BASE, &changelog).expect("valid");
        assert_eq!(s.state.key_groups(), crate::engine::group::DEFAULT_GROUPS);
        let [scope, topic] = changelog;
        let s = load(
            BASE,
            &[scope, topic, ("CHECKPOINTER_STATE__KEY_GROUPS", "64")],
        )
        .expect("valid");
        assert_eq!(s.state.key_groups(), 64);
        for bad in ["0", "65536", "-1", "many"] {
            let text = err_text(BASE, &[("CHECKPOINTER_STATE__KEY_GROUPS", bad)]);
            assert!(text.contains("key_groups"), "{bad}: {text}");
        }
    }

    #[test]
    fn the_open_window_limit_is_off_by_default_and_at_least_one() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.state.max_open_windows, None);
        let s = load(BASE, &[("CHECKPOINTER_STATE__MAX_OPEN_WINDOWS", "5000000")]).expect("valid");
        assert_eq!(s.state.max_open_windows, Some(5_000_000));
        let text = err_text(BASE, &[("CHECKPOINTER_STATE__MAX_OPEN_WINDOWS", "0")]);
        assert!(text.contains("state.max_open_windows"), "{text}");
        let text = err_text(BASE, &[("CHECKPOINTER_STATE__MAX_OPEN_WINDOWS", "many")]);
        assert!(text.contains("max_open_windows"), "{text}");
    }

    #[test]
    fn idle_partitions_are_off_by_default_and_the_wall_clock_needs_partition_scope() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.watermark.idle_timeout, None);
        assert_eq!(s.watermark.idle_advance, IdleAdvance::None);
        let idle = ("CHECKPOINTER_WATERMARK__IDLE_TIMEOUT", "30s");
        let s = load(BASE, &[idle]).expect("valid");
        assert_eq!(s.watermark.idle_timeout, Some(Duration::from_secs(30)));
        let text = err_text(BASE, &[("CHECKPOINTER_WATERMARK__IDLE_TIMEOUT", "10ms")]);
        assert!(text.contains("watermark.idle_timeout"), "{text}");
        let wall = ("CHECKPOINTER_WATERMARK__IDLE_ADVANCE", "wall_clock");
        let text = err_text(BASE, &[wall]);
        assert!(text.contains("needs watermark.idle_timeout"), "{text}");
        let text = err_text(BASE, &[idle, wall]);
        assert!(text.contains("needs state.scope: partition"), "{text}");
        let s = load(
            BASE,
            &[idle, wall, ("CHECKPOINTER_STATE__SCOPE", "partition")],
        )
        .expect("valid");
        assert_eq!(s.watermark.idle_advance, IdleAdvance::WallClock);
    }

    #[test]
    fn savepoint_limits_default_to_five_unnamed_kept_and_six_a_minute_and_are_never_zero() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.checkpoint.retained_unnamed_savepoints, 5);
        assert_eq!(s.checkpoint.savepoints_per_minute, 6);
        for key in ["retained_unnamed_savepoints", "savepoints_per_minute"] {
            let var = format!("CHECKPOINTER_CHECKPOINT__{}", key.to_uppercase());
            let text = err_text(BASE, &[(var.as_str(), "0")]);
            assert!(text.contains(&format!("checkpoint.{key}")), "{text}");
        }
    }

    #[test]
    fn an_admin_api_others_can_reach_needs_a_token_or_an_explicit_waiver() {
        // loopback (the default): no token needed
        let s = load(BASE, &[]).expect("valid");
        assert!(s.http.admin_token_file.is_none());
        assert!(s.warnings().iter().all(|w| !w.contains("http.listen")));
        let all = [("CHECKPOINTER_HTTP__LISTEN", "0.0.0.0:9180")];
        let text = err_text(BASE, &all);
        assert!(text.contains("http.admin_token_file"), "{text}");
        assert!(text.contains("0.0.0.0:9180"), "{text}");
        let ipv6 = [("CHECKPOINTER_HTTP__LISTEN", "[::]:9180")];
        assert!(err_text(BASE, &ipv6).contains("http.admin_token_file"));
        let s = load(
            BASE,
            &[
                all[0],
                ("CHECKPOINTER_HTTP__ADMIN_TOKEN_FILE", "/run/secrets/token"),
            ],
        )
        .expect("a token file is enough");
        assert_eq!(
            s.http.admin_token_file.as_deref(),
            Some(std::path::Path::new("/run/secrets/token"))
        );
        assert!(s.warnings().iter().all(|w| !w.contains("http.listen")));
        let s = load(
            BASE,
            &[
                all[0],
                ("CHECKPOINTER_HTTP__ALLOW_UNAUTHENTICATED_ADMIN", "true"),
            ],
        )
        .expect("waived");
        assert!(
            s.warnings()
                .iter()
                .any(|w| w.contains("http.admin_token_file")),
            "{:?}",
            s.warnings()
        );
    }

    #[test]
    fn a_hopping_window_puts_a_record_in_at_most_a_thousand_windows() {
        let yaml = BASE.replace("size: 1m, hop: 30s", "size: 1000s, hop: 1s");
        assert!(load(&yaml, &[]).is_ok());
        // 1,001 windows, counting the one a remainder of the size starts
        for (size, hop) in [("1001s", "1s"), ("1h", "1s"), ("1000001ms", "1s")] {
            let yaml = BASE.replace("size: 1m, hop: 30s", &format!("size: {size}, hop: {hop}"));
            let text = err_text(&yaml, &[]);
            assert!(text.contains("windows[1].hop"), "{text}");
            assert!(text.contains("more than the 1000 allowed"), "{text}");
        }
    }

    #[test]
    fn hopping_window_needs_hop_not_longer_than_size() {
        let yaml = BASE.replace("hop: 30s", "hop: 2m");
        assert!(err_text(&yaml, &[]).contains("windows[1].hop"));
        let yaml = BASE.replace(", hop: 30s", "");
        assert!(err_text(&yaml, &[]).contains("windows[1].hop"));
    }

    #[test]
    fn session_window_rejects_size() {
        let yaml = BASE.replace(
            "type: session, gap: 30s",
            "type: session, gap: 30s, size: 1m",
        );
        assert!(err_text(&yaml, &[]).contains("windows[2].size"));
    }

    #[test]
    fn duplicate_window_names_are_rejected() {
        let yaml = BASE.replace("name: hop", "name: minute");
        assert!(err_text(&yaml, &[]).contains("windows[1].name"));
    }

    #[test]
    fn managed_kafka_option_is_rejected() {
        let yaml = BASE.replace(
            "topics: [events]",
            "topics: [events]\n  options: { enable.auto.commit: \"true\" }",
        );
        assert!(err_text(&yaml, &[]).contains("kafka.options.enable.auto.commit"));
    }

    #[test]
    fn a_managed_option_is_found_as_librdkafka_reads_its_name() {
        let instead = managed_kafka_option("acks").expect("acks is managed");
        assert!(instead.contains("acks=all"), "{instead}");
        for name in ["topic.acks", " acks ", "metadata.broker.list"] {
            assert!(managed_kafka_option(name).is_some(), "{name:?}");
        }
        // librdkafka strips the prefix once and matches names case-sensitively: these are
        // names it does not know, and it refuses them itself
        for name in ["topic.topic.acks", "ACKS", "topic.", "linger.ms", "acks.x"] {
            assert_eq!(managed_kafka_option(name), None, "{name:?}");
        }
    }

    #[test]
    fn producer_guarantees_cannot_be_weakened_through_kafka_options() {
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("transactional.id", "t"),
            // librdkafka strips this prefix: the same settings under another name
            ("topic.acks", "1"),
            ("topic.request.required.acks", "1"),
            ("topic.auto.offset.reset", "earliest"),
        ] {
            let yaml = BASE.replace(
                "topics: [events]",
                &format!("topics: [events]\n  options: {{ {key}: \"{value}\" }}"),
            );
            let text = err_text(&yaml, &[]);
            assert!(
                text.contains(&format!("kafka.options.{key}")),
                "{key}: {text}"
            );
            assert!(text.contains("is managed by checkpointer"), "{key}: {text}");
        }
        // a tuning setting of the producer is the operator's to make
        let yaml = BASE.replace(
            "topics: [events]",
            "topics: [events]\n  options: { linger.ms: \"20\" }",
        );
        assert!(load(&yaml, &[]).is_ok());
    }

    #[test]
    fn value_required_for_sum() {
        let yaml = BASE.replace("  value: /amount\n", "");
        assert!(err_text(&yaml, &[]).contains("input.value"));
        let yaml = format!(
            "{}\naggregates: [count]\n",
            BASE.replace("  value: /amount\n", "")
        );
        assert!(load(&yaml, &[]).is_ok());
    }

    #[test]
    fn bad_key_source_is_named() {
        let yaml = BASE.replace("key: /user", "key: user");
        assert!(err_text(&yaml, &[]).contains("input.key"));
    }

    #[test]
    fn output_topic_must_differ_from_inputs() {
        let yaml = BASE.replace("topic: out", "topic: events");
        assert!(err_text(&yaml, &[]).contains("output.topic"));
    }

    #[test]
    fn zero_max_concurrent_rejected() {
        let yaml = BASE.replace("interval: 2s", "interval: 2s\n  max_concurrent: 0");
        assert!(err_text(&yaml, &[]).contains("checkpoint.max_concurrent"));
    }

    #[test]
    fn secrets_are_redacted() {
        let yaml = BASE.replace(
            "topics: [events]",
            "topics: [events]\n  options: { sasl.password: hunter2, client.id: c }",
        );
        let s = load(&yaml, &[]).expect("valid");
        let shown = serde_json::to_string(&s.redacted()).expect("json");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("client.id"));
    }

    #[test]
    fn the_output_bound_defaults_to_a_million_and_reads_from_file_or_environment() {
        let s = load(BASE, &[]).expect("valid");
        assert_eq!(s.output.max_pending_windows, 1_000_000);
        let s = load(
            BASE,
            &[("CHECKPOINTER_OUTPUT__MAX_PENDING_WINDOWS", "250000")],
        )
        .expect("valid");
        assert_eq!(s.output.max_pending_windows, 250_000);
        let yaml = BASE.replace("topic: out", "topic: out\n  max_pending_windows: 0");
        assert_ne!(yaml, BASE, "the base configuration names its output topic");
        let s = load(&yaml, &[]).expect("valid");
        assert_eq!(s.output.max_pending_windows, 0);
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/checkpointer.yaml");
        Settings::load(&path, Some(HashMap::new()))
            .expect("config/checkpointer.yaml must validate");
    }

    #[test]
    fn cache_capacity_reads_sizes_from_file_or_environment_and_refuses_a_tiny_one() {
        assert_eq!(
            load(BASE, &[])
                .expect("valid")
                .checkpoint
                .cache_capacity
                .as_u64(),
            64 << 20
        );
        let yaml = BASE.replace(
            "  interval: 2s",
            "  interval: 2s\n  cache_capacity: 256 MiB",
        );
        let s = load(&yaml, &[]).expect("valid");
        assert_eq!(s.checkpoint.cache_capacity.as_u64(), 256 << 20);
        let s = load(BASE, &[("CHECKPOINTER_CHECKPOINT__CACHE_CAPACITY", "1GiB")]).expect("valid");
        assert_eq!(s.checkpoint.cache_capacity.as_u64(), 1 << 30);
        let text = err_text(
            &BASE.replace("  interval: 2s", "  interval: 2s\n  cache_capacity: 10 KiB"),
            &[],
        );
        assert!(text.contains("checkpoint.cache_capacity"), "{text}");
    }
}
