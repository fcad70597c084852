//! The house rules of `daemon/src`, checked on the source text:
//!
//! - the top-level modules form no import circle (`crate::<module>`
//!   references, comments left out, test modules included);
//! - runtime modules never reach into the CLI layer (`commands`, `cli`,
//!   `demo`);
//! - no function is longer than [`MAX_FN_LINES`] lines.
//!
//! See "Dependency rules" in ARCHITECTURE.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest a function in `daemon/src` may be, signature to closing brace.
const MAX_FN_LINES: usize = 120;

/// The CLI layer: it may import any runtime module, never the reverse.
const CLI_LAYER: &[&str] = &["cli", "commands", "demo"];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("daemon/src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The top-level module a file belongs to (`pool/provider.rs` → `pool`);
/// `None` for the crate roots.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("under daemon/src");
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The text without `//` comments (doc comments included: a doc link is no
/// import).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The names right after `crate::`, and the first name of each item of a
/// `crate::{a, b::c, d::{e, f}}` group.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(is_ident) {
            continue; // `llmq_crate::` and the like
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item = String::new();
            let mut at_item_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        at_item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && at_item_start {
                    if is_ident(c) {
                        item.push(c);
                        continue;
                    }
                    if !item.is_empty() {
                        refs.insert(std::mem::take(&mut item));
                        at_item_start = false;
                    }
                }
            }
            if !item.is_empty() {
                refs.insert(item);
            }
        } else {
            let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// module → the other top-level modules it references, with the files.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn module_graph() -> Graph {
    let src = src_dir();
    let files = rust_files(&src);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let Some(from) = top_module(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("a readable source file");
        let shown = file
            .strip_prefix(&src)
            .unwrap_or(file)
            .display()
            .to_string();
        let edges = graph.entry(from.clone()).or_default();
        for to in crate_refs(&strip_comments(&text)) {
            if to != from && modules.contains(&to) {
                edges.entry(to).or_default().insert(shown.clone());
            }
        }
    }
    graph
}

/// One cycle of the graph, as `a -> b -> … -> a`, if it has any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut marks, &mut Vec::new()))
}

#[test]
fn the_references_scanner_reads_groups_and_paths() {
    let text = "use crate::config::Config;\nuse crate::{error::Error, pool::{KeyPool, X}, queue};\nlet x = crate::metrics::KEY;\n// crate::commands in a comment\nllmq_crate::nope";
    let refs: Vec<String> = crate_refs(&strip_comments(text)).into_iter().collect();
    assert_eq!(refs, ["config", "error", "metrics", "pool", "queue"]);
}

#[test]
fn the_cycle_finder_finds_a_circle_and_only_one() {
    let mut g = Graph::new();
    g.entry("a".into())
        .or_default()
        .entry("b".into())
        .or_default();
    g.entry("b".into())
        .or_default()
        .entry("c".into())
        .or_default();
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into())
        .or_default()
        .entry("a".into())
        .or_default();
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

#[test]
fn daemon_modules_form_no_import_circle() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the scan found the modules: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| format!("{} -> {} (in {:?})", w[0], w[1], graph[&w[0]][&w[1]]))
            .collect();
        panic!(
            "import circle: {}\n{}",
            cycle.join(" -> "),
            steps.join("\n")
        );
    }
}

#[test]
fn runtime_modules_never_import_the_cli_layer() {
    let graph = module_graph();
    let mut offenders = Vec::new();
    for (from, edges) in &graph {
        if CLI_LAYER.contains(&from.as_str()) {
            continue;
        }
        for (to, files) in edges {
            if CLI_LAYER.contains(&to.as_str()) {
                offenders.push(format!("{from} -> {to} (in {files:?})"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "runtime modules import the CLI layer:\n{}",
        offenders.join("\n")
    );
}

/// Whether a line opens a function: optional `pub`/`pub(…)`, `const`,
/// `async`, `unsafe`, `extern "…"`, then `fn `.
fn opens_fn(line: &str) -> bool {
    let mut rest = line.trim_start();
    if let Some(r) = rest.strip_prefix("pub") {
        rest = match r.strip_prefix('(') {
            Some(r) => match r.find(')') {
                Some(i) => &r[i + 1..],
                None => return false,
            },
            None => r,
        };
        rest = rest.trim_start();
    }
    for word in ["const ", "async ", "unsafe "] {
        if let Some(r) = rest.strip_prefix(word) {
            rest = r.trim_start();
        }
    }
    if let Some(r) = rest.strip_prefix("extern ") {
        rest = r.trim_start();
        if rest.starts_with('"') {
            rest = rest[1..]
                .split_once('"')
                .map_or("", |(_, r)| r)
                .trim_start();
        }
    }
    rest.starts_with("fn ")
}

/// `(first line, lines)` of every function with a body in `text`: from the
/// `fn` line to the `}` at the same indentation (rustfmt's layout).
fn function_lengths(text: &str) -> Vec<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !opens_fn(line) {
            continue;
        }
        let indent = &line[..line.len() - line.trim_start().len()];
        // The signature ends at the first line ending in `{` (a body) or
        // `;` (a declaration without one).
        let Some(open) = (i..lines.len()).find(|&j| {
            let t = lines[j].trim_end();
            t.ends_with('{') || t.ends_with(';') || (j == i && t.contains('{') && t.ends_with('}'))
        }) else {
            continue;
        };
        let t = lines[open].trim_end();
        if t.ends_with(';') {
            continue;
        }
        if t.ends_with('}') {
            out.push((i + 1, 1));
            continue;
        }
        let close = format!("{indent}}}");
        if let Some(end) = (open + 1..lines.len()).find(|&k| lines[k].trim_end() == close) {
            out.push((i + 1, end - i + 1));
        }
    }
    out
}

#[test]
fn the_length_scanner_counts_signature_to_closing_brace() {
    let text = "pub(crate) async fn a(\n    x: u8,\n) -> u8 {\n    x\n}\n\nfn b() -> u8 { 1 }\n\ntrait T {\n    fn c(&self);\n    fn d(&self) {\n        let _ = 1;\n    }\n}\n";
    assert_eq!(function_lengths(text), [(1, 5), (7, 1), (11, 3)]);
}

#[test]
fn no_function_in_daemon_src_is_over_the_limit() {
    let src = src_dir();
    let mut long = Vec::new();
    let mut seen = 0;
    for file in rust_files(&src) {
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        for (line, len) in function_lengths(&text) {
            seen += 1;
            if len > MAX_FN_LINES {
                let shown = file
                    .strip_prefix(&src)
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                long.push(format!("{shown}:{line}: {len} lines"));
            }
        }
    }
    assert!(seen > 500, "the scan found the functions ({seen})");
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them into named steps):\n{}",
        long.join("\n")
    );
}
