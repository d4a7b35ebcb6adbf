//! The documentation against what it documents: the metric table in docs/metrics.md lists
//! exactly the metric families the service registers, and every relative link in the README
//! and docs/ points at a file (and heading) that exists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use checkpointer::metrics::Metrics;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The metric family names in the first column of the table headed `| name | ...`: backticks
/// and label sets (`{topic,partition}`) stripped, in table order (duplicates kept).
fn documented_metrics(markdown: &str) -> Vec<String> {
    let mut lines = markdown.lines().map(str::trim);
    lines
        .by_ref()
        .find(|l| l.starts_with('|') && first_cell(l) == "name")
        .expect("a table whose first column is `name`");
    lines
        .skip_while(|l| l.starts_with("|--") || l.starts_with("| --"))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cell = first_cell(l).replace('`', "");
            let name = cell.split('{').next().unwrap_or("").trim();
            name.to_string()
        })
        .collect()
}

fn first_cell(row: &str) -> &str {
    row.trim_start_matches('|')
        .split('|')
        .next()
        .unwrap_or("")
        .trim()
}

/// What is wrong with a documented list against the registered one: registered but not
/// documented, documented but not registered, documented more than once.
fn metric_table_errors(documented: &[String], registered: &[String]) -> Vec<String> {
    let docs: BTreeSet<&str> = documented.iter().map(String::as_str).collect();
    let regs: BTreeSet<&str> = registered.iter().map(String::as_str).collect();
    let mut errors = Vec::new();
    for name in regs.difference(&docs) {
        errors.push(format!(
            "registered but missing from docs/metrics.md: {name}"
        ));
    }
    for name in docs.difference(&regs) {
        errors.push(format!(
            "in docs/metrics.md but not registered by the service: {name}"
        ));
    }
    for name in &docs {
        if documented.iter().filter(|d| d == name).count() > 1 {
            errors.push(format!(
                "documented more than once in docs/metrics.md: {name}"
            ));
        }
    }
    errors
}

#[test]
fn metric_table_lists_exactly_the_registered_metrics() {
    let metrics = Metrics::new();
    let registered = metrics.names();
    assert!(
        registered.len() > 30,
        "Metrics::names() lists only {registered:?}"
    );
    let documented = documented_metrics(&read("docs/metrics.md"));
    let errors = metric_table_errors(&documented, registered);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn the_metric_table_check_catches_a_removed_and_an_unknown_row() {
    let metrics = Metrics::new();
    let registered = metrics.names();
    let table = read("docs/metrics.md");
    let documented = documented_metrics(&table);
    assert!(
        documented.contains(&"checkpointer_consumer_lag_records".to_string()),
        "label sets are stripped: {documented:?}"
    );

    let removed = table
        .lines()
        .filter(|l| !l.contains("`checkpointer_consumer_lag_records{"))
        .collect::<Vec<_>>()
        .join("\n");
    let errors = metric_table_errors(&documented_metrics(&removed), registered);
    assert_eq!(
        errors,
        vec!["registered but missing from docs/metrics.md: checkpointer_consumer_lag_records"]
    );

    let added = table.replacen(
        "| `checkpointer_ready` |",
        "| `checkpointer_gone_total{topic}` | counter | gone |\n| `checkpointer_ready` |",
        1,
    );
    let errors = metric_table_errors(&documented_metrics(&added), registered);
    assert_eq!(
        errors,
        vec!["in docs/metrics.md but not registered by the service: checkpointer_gone_total"]
    );
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// Targets of inline links `[text](target)` outside code blocks.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let tail = &rest[at + 2..];
            let Some(end) = tail.find(')') else { break };
            out.push(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    out
}

#[test]
fn relative_links_in_the_readme_and_docs_resolve() {
    let mut pages = vec!["README.md".to_string()];
    for entry in std::fs::read_dir(repo("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path.file_name().expect("name").to_string_lossy();
            pages.push(format!("docs/{name}"));
        }
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = read(page);
        let dir = Path::new(page).parent().unwrap_or(Path::new(""));
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, fragment) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                PathBuf::from(page)
            } else {
                dir.join(file)
            };
            let full = repo(&resolved.to_string_lossy());
            if !full.exists() {
                broken.push(format!("{page}: {target} (no {})", resolved.display()));
                continue;
            }
            if let Some(fragment) = fragment {
                let is_markdown = full.extension().is_some_and(|e| e == "md");
                let text = std::fs::read_to_string(&full).unwrap_or_default();
                if is_markdown && !anchors(&text).contains(fragment) {
                    broken.push(format!("{page}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found in {pages:?}");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_link_check_catches_a_missing_heading() {
    let text = read("docs/semantics.md");
    let found = anchors(&text);
    assert!(found.contains("restarts-and-group-membership"), "{found:?}");
    assert!(!found.contains("restarts-and-membership"));
    assert_eq!(
        link_targets("see [a](x.md#b) and [`c`](../d) but not `e`"),
        vec!["x.md#b", "../d"]
    );
}
