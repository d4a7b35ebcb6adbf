//! What the process holds in memory and what it may hold: its resident set (`VmRSS` in
//! `/proc/self/status`, what the kernel's out-of-memory killer and container limits count) and
//! the memory limit of the container it runs in (cgroup v2 `memory.max`, or v1
//! `memory.limit_in_bytes`). On systems without them, both are unknown (`None`). The parsing
//! is pure; [`ProcessMemory`] and [`container_limit`] read the files.

/// Where the resident set comes from: the process itself, or a stand-in in tests.
pub trait Resident: Send + Sync {
    /// Bytes resident now, if known.
    fn resident_bytes(&self) -> Option<u64>;
}

/// This process's resident set, from `/proc/self/status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessMemory;

impl Resident for ProcessMemory {
    fn resident_bytes(&self) -> Option<u64> {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|text| parse_vm_rss(&text))
    }
}

/// The cgroup files that hold a container's memory limit, v2 first.
const CGROUP_LIMITS: [&str; 2] = [
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
];

/// The memory limit of the container this process runs in, if it has one.
pub fn container_limit() -> Option<u64> {
    CGROUP_LIMITS
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|text| parse_cgroup_limit(&text))
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// A cgroup memory limit file's value in bytes; `None` for no limit (`max` in v2, or v1's
/// "unlimited", a number near `i64::MAX` rounded to pages).
pub fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    let bytes: u64 = text.parse().ok()?;
    (bytes > 0 && bytes < 1 << 60).then_some(bytes)
}

/// The share of a container's limit the service allows itself by default
/// (`state.max_memory` unset): room is left for what the kernel counts besides the heap.
pub const DEFAULT_SHARE_PERCENT: u64 = 80;

/// The limit the memory guard enforces: `configured`, else the default share of the
/// container's limit, else none.
pub fn effective_limit(configured: Option<u64>, container: Option<u64>) -> Option<u64> {
    configured.or_else(|| container.map(|c| c / 100 * DEFAULT_SHARE_PERCENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_set_is_read_from_vm_rss_in_kilobytes() {
        let status = "Name:\tcheckpointer\nVmPeak:\t  900 kB\nVmRSS:\t   73728 kB\nThreads:\t20\n";
        assert_eq!(parse_vm_rss(status), Some(73_728 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tmany kB\n"), None);
    }

    #[test]
    fn a_container_limit_is_a_number_and_no_limit_is_none() {
        assert_eq!(parse_cgroup_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_cgroup_limit("max\n"), None);
        // cgroup v1 without a limit
        assert_eq!(parse_cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup_limit("0\n"), None);
        assert_eq!(parse_cgroup_limit("garbage"), None);
    }

    #[test]
    fn the_configured_limit_wins_and_a_container_gives_four_fifths_of_its_own() {
        assert_eq!(effective_limit(Some(500), Some(1000)), Some(500));
        assert_eq!(effective_limit(None, Some(1000)), Some(800));
        assert_eq!(effective_limit(None, None), None);
    }

    #[test]
    fn this_process_knows_its_resident_set_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = ProcessMemory.resident_bytes().expect("VmRSS on Linux");
            assert!(rss > 1 << 20, "{rss}");
        }
    }
}
