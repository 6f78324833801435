//! A policy's read-only data document, indexed once at load for the `data-get` import.

use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

/// A policy's read-only data document with its version.
///
/// `data-get` answers JSON text, and every check runs in a fresh instance that cannot keep a
/// parsed copy, so the same fragments are asked for again and again. The document is therefore
/// serialised once, when it is loaded, and each node's place in that text is indexed by its
/// JSON Pointer: a lookup is a hash probe and a copy, never a walk or a serialisation.
#[derive(Debug)]
pub struct PolicyData {
    /// The document.
    pub value: Value,
    /// Its version in the snapshot.
    pub version: u64,
    /// `value` as compact JSON.
    text: String,
    /// `sha256:` and the SHA-256 of `text` (hex): how decision records and the archive name it.
    digest: String,
    /// Where each node's JSON lies in `text`, by canonical JSON Pointer.
    index: HashMap<Box<str>, Range<usize>>,
    /// Whether every node is in `index` (documents with more than [`MAX_INDEXED_NODES`] nodes
    /// are indexed in part, their largest nodes, and the rest looked up the slow way).
    complete: bool,
}

impl Default for PolicyData {
    fn default() -> Self {
        PolicyData::new(Value::Null, 0)
    }
}

/// Nodes of a data document indexed for `data-get`: in a larger one, those with the longest
/// text (the root and the large objects); the rest, each no longer than any indexed node, are
/// found by walking the document.
pub const MAX_INDEXED_NODES: usize = 100_000;

impl PolicyData {
    /// Index `value` as the data document of version `version`.
    pub fn new(value: Value, version: u64) -> Self {
        Self::indexed(value, version, MAX_INDEXED_NODES)
    }

    fn indexed(value: Value, version: u64, max_nodes: usize) -> Self {
        let mut data = PolicyData {
            value,
            version,
            text: String::new(),
            digest: String::new(),
            index: HashMap::new(),
            complete: true,
        };
        let mut ranges = Vec::new();
        serialize(&data.value, &mut data.text, &mut ranges);
        let chosen = chosen(&ranges, max_nodes);
        data.complete = chosen.iter().all(|&c| c);
        index_chosen(&data.value, &mut String::new(), &ranges, &chosen, &mut 0, &mut data.index);
        data.digest = format!("sha256:{}", crate::sha256_hex(data.text.as_bytes()));
        data
    }

    /// The document as compact JSON text: what its digest is the digest of.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// `sha256:<hex>` of [`PolicyData::text`].
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The JSON text of the value at `pointer` (RFC 6901), exactly as `serde_json` writes it.
    pub fn get(&self, pointer: &str) -> Option<Cow<'_, str>> {
        match self.index.get(pointer) {
            Some(range) => Some(Cow::Borrowed(&self.text[range.clone()])),
            None if self.complete => None,
            None => self.value.pointer(pointer).map(|v| Cow::Owned(v.to_string())),
        }
    }
}

/// Append `value` to `text` as compact JSON, recording where each node's text lies, in
/// pre-order (a node before its children, children in order).
fn serialize(value: &Value, text: &mut String, ranges: &mut Vec<Range<usize>>) {
    let slot = ranges.len();
    ranges.push(0..0);
    let start = text.len();
    match value {
        Value::Array(items) => {
            text.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                serialize(item, text, ranges);
            }
            text.push(']');
        }
        Value::Object(map) => {
            text.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                text.push_str(&Value::from(key.as_str()).to_string());
                text.push(':');
                serialize(item, text, ranges);
            }
            text.push('}');
        }
        leaf => text.push_str(&leaf.to_string()),
    }
    ranges[slot] = start..text.len();
}

/// Which nodes (in [`serialize`]'s order) to index: all of them if there are at most
/// `max_nodes`, else the `max_nodes` with the longest text. A node left out is then never
/// longer than any indexed one, so looking it up the slow way (walking to it and writing it
/// out again) costs little: the root and the large objects, the ones costly to write out,
/// are always in the index.
fn chosen(ranges: &[Range<usize>], max_nodes: usize) -> Vec<bool> {
    // Longest first; a stable sort keeps nodes of equal length in document order.
    let mut longest: Vec<usize> = (0..ranges.len()).collect();
    longest.sort_by_key(|&node| std::cmp::Reverse(ranges[node].len()));
    let mut chosen = vec![false; ranges.len()];
    for &node in longest.iter().take(max_nodes) {
        chosen[node] = true;
    }
    chosen
}

/// Index the chosen nodes of `value` under their JSON Pointers, walking it in [`serialize`]'s
/// order (`next` counts the nodes visited).
fn index_chosen(
    value: &Value,
    pointer: &mut String,
    ranges: &[Range<usize>],
    chosen: &[bool],
    next: &mut usize,
    index: &mut HashMap<Box<str>, Range<usize>>,
) {
    let node = *next;
    *next += 1;
    if chosen[node] {
        index.insert(pointer.as_str().into(), ranges[node].clone());
    }
    let mut child = |key: &str, child: &Value, next: &mut usize, index: &mut HashMap<_, _>| {
        let len = pointer.len();
        pointer.push('/');
        for c in key.chars() {
            match c {
                '~' => pointer.push_str("~0"),
                '/' => pointer.push_str("~1"),
                c => pointer.push(c),
            }
        }
        index_chosen(child, pointer, ranges, chosen, next, index);
        pointer.truncate(len);
    };
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                child(&i.to_string(), item, next, index);
            }
        }
        Value::Object(map) => {
            for (key, item) in map {
                child(key, item, next, index);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_lookups_answer_what_serde_json_would() {
        let value = serde_json::json!({
            "roles": { "reader": [{ "methods": ["GET"], "paths": ["/api/**"] }], "a/b~c": [1, 2.5, -3e40] },
            "": { "": "empty keys" },
            "text": "quote \" and \u{1} and é",
            "nested": [[], {}, [null, true, false]],
            "0": "a numeric key",
        });
        let pointers = [
            "",
            "/",
            "/roles",
            "/roles/reader",
            "/roles/reader/0",
            "/roles/reader/0/methods/0",
            "/roles/a~1b~0c",
            "/roles/a~1b~0c/2",
            "/roles/a/b~c",
            "/text",
            "/nested/2/1",
            "/nested/1",
            "/nested/01",
            "/nested/-",
            "/nested/+1",
            "/nested/3",
            "/0",
            "//",
            "roles",
            "/roles/",
            "/missing",
            "/text/0",
            "/roles/reader/0/methods/9",
        ];
        // Fully indexed, and with room for only three nodes (the rest found by walking).
        for data in [PolicyData::new(value.clone(), 1), PolicyData::indexed(value.clone(), 1, 3)] {
            for pointer in pointers {
                let expected = value.pointer(pointer).map(Value::to_string);
                assert_eq!(data.get(pointer).map(Cow::into_owned), expected, "pointer {pointer:?}");
            }
        }
        assert!(PolicyData::new(value.clone(), 1).complete);
        assert!(!PolicyData::indexed(value, 1, 3).complete);
        assert_eq!(PolicyData::default().get("").as_deref(), Some("null"));
    }

    /// In a document with more nodes than the index holds, the nodes left out are the smallest:
    /// never the root or a large object, which `data-get` would otherwise write out again on
    /// every call, outside the policy's time limit.
    #[test]
    fn a_document_indexed_in_part_keeps_its_largest_nodes() {
        let value = serde_json::json!({
            "a": (0..50).collect::<Vec<_>>(),
            "b": { "big": "x".repeat(1000), "small": 1 },
        });
        let data = PolicyData::indexed(value.clone(), 1, 4);
        assert!(!data.complete);
        let mut indexed: Vec<&str> = data.index.keys().map(|k| &**k).collect();
        indexed.sort_unstable();
        assert_eq!(indexed, ["", "/a", "/b", "/b/big"]);
        for pointer in ["", "/a", "/a/7", "/b", "/b/big", "/b/small", "/c"] {
            assert_eq!(
                data.get(pointer).map(Cow::into_owned),
                value.pointer(pointer).map(Value::to_string),
                "{pointer:?}"
            );
        }
        // Nodes of the threshold's length are taken in document order until the index is full.
        let ties = PolicyData::indexed(serde_json::json!([1, 2, 3]), 1, 3);
        let mut indexed: Vec<&str> = ties.index.keys().map(|k| &**k).collect();
        indexed.sort_unstable();
        assert_eq!(indexed, ["", "/0", "/1"]);
        assert_eq!(PolicyData::indexed(serde_json::json!([1]), 1, 0).get("/0").as_deref(), Some("1"));
    }
}
