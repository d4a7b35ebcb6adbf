//! The demo's event journal: every event of the demo's input topic, one JSON line each, written
//! (and handed to the kernel) before the event is produced, next to the demo's checkpoint
//! directory. The embedded broker keeps its log in memory; a
//! demo started again replays the journal into a fresh broker, partition by partition in
//! offset order, so every event is back at its offset and the restored checkpoint's offsets
//! point at the same events as before.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One event of the demo's input topic, at its partition and offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub payload: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("demo journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("demo journal {path}, line {line}: {detail}")]
    Invalid {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

/// The events of each partition, in offset order from 0 without gaps.
pub type Partitions = BTreeMap<i32, Vec<Delivered>>;

/// What a journal holds: its events, and the length of its complete lines (anything after
/// them, a line cut short by a crash, is to be cut off before appending).
pub struct Read {
    pub events: Partitions,
    pub complete_len: u64,
}

/// Reads a journal. Offsets must run from 0 without gaps per partition; a last line without
/// its newline (cut short by a crash) is left out.
pub fn read(path: &Path) -> Result<Read, JournalError> {
    let text = std::fs::read_to_string(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let complete = text.rfind('\n').map_or(0, |at| at + 1);
    let mut events = Partitions::new();
    for (n, line) in text[..complete].lines().enumerate() {
        let event: Delivered = serde_json::from_str(line).map_err(|e| JournalError::Invalid {
            path: path.to_path_buf(),
            line: n + 1,
            detail: e.to_string(),
        })?;
        let held = events.entry(event.partition).or_default();
        if event.offset != held.len() as i64 {
            return Err(JournalError::Invalid {
                path: path.to_path_buf(),
                line: n + 1,
                detail: format!(
                    "partition {} offset {} follows {} events",
                    event.partition,
                    event.offset,
                    held.len()
                ),
            });
        }
        held.push(event);
    }
    Ok(Read {
        events,
        complete_len: complete as u64,
    })
}

/// Cuts a journal back to its complete lines (`Read::complete_len`).
pub fn truncate(path: &Path, len: u64) -> Result<(), JournalError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Appends events to a journal.
pub struct Writer {
    path: PathBuf,
    out: BufWriter<std::fs::File>,
}

impl Writer {
    pub fn append_to(path: &Path) -> Result<Writer, JournalError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| JournalError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Writer {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn push(&mut self, event: &Delivered) -> Result<(), JournalError> {
        let line = serde_json::to_string(event).map_err(|e| self.io(e.into()))?;
        writeln!(self.out, "{line}").map_err(|e| self.io(e))
    }

    pub fn flush(&mut self) -> Result<(), JournalError> {
        self.out.flush().map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(partition: i32, offset: i64) -> Delivered {
        Delivered {
            partition,
            offset,
            key: format!("k{offset}"),
            payload: format!(r#"{{"n":{offset}}}"#),
        }
    }

    #[test]
    fn a_written_journal_reads_back_per_partition_in_offset_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events");
        let written = [
            event(0, 0),
            event(1, 0),
            event(0, 1),
            event(1, 1),
            event(0, 2),
        ];
        for chunk in written.chunks(2) {
            let mut w = Writer::append_to(&path).expect("open");
            for e in chunk {
                w.push(e).expect("push");
            }
            w.flush().expect("flush");
        }
        let read = read(&path).expect("read");
        assert_eq!(read.events[&0], vec![event(0, 0), event(0, 1), event(0, 2)]);
        assert_eq!(read.events[&1], vec![event(1, 0), event(1, 1)]);
        assert_eq!(
            read.complete_len,
            std::fs::metadata(&path).expect("meta").len()
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_off_before_appending_and_a_gap_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events");
        let mut w = Writer::append_to(&path).expect("open");
        w.push(&event(0, 0)).expect("push");
        w.flush().expect("flush");
        drop(w);
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str(r#"{"partition":0,"off"#);
        std::fs::write(&path, &text).expect("write");
        let torn = read(&path).expect("read");
        assert_eq!(torn.events[&0], vec![event(0, 0)]);
        // the next run cuts the torn line off and appends after the complete ones
        truncate(&path, torn.complete_len).expect("truncate");
        let mut w = Writer::append_to(&path).expect("open");
        w.push(&event(0, 1)).expect("push");
        w.flush().expect("flush");
        assert_eq!(
            read(&path).expect("read again").events[&0],
            vec![event(0, 0), event(0, 1)]
        );

        let gap = format!(
            "{}\n{}\n",
            serde_json::to_string(&event(0, 0)).expect("json"),
            serde_json::to_string(&event(0, 2)).expect("json")
        );
        std::fs::write(&path, gap).expect("write");
        let err = read(&path).err().expect("gap");
        assert!(
            err.to_string().contains("offset 2 follows 1 events"),
            "{err}"
        );
    }
}
