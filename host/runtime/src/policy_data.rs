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
    /// are indexed in part, and the rest looked up the slow way).
    complete: bool,
}

impl Default for PolicyData {
    fn default() -> Self {
        PolicyData::new(Value::Null, 0)
    }
}

/// Nodes of a data document indexed for `data-get`; the rest of a larger one is found by
/// walking the document.
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
        data.complete = index_node(&data.value, &mut String::new(), &mut data.text, &mut data.index, max_nodes);
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

/// Append `value` to `text` as compact JSON, indexing it and its descendants under `pointer`
/// (while the index has room). Returns whether every node was indexed.
fn index_node(
    value: &Value,
    pointer: &mut String,
    text: &mut String,
    index: &mut HashMap<Box<str>, Range<usize>>,
    max_nodes: usize,
) -> bool {
    let start = text.len();
    let mut complete = true;
    let mut child = |key: &str, child: &Value, text: &mut String, index: &mut HashMap<_, _>| {
        let len = pointer.len();
        pointer.push('/');
        for c in key.chars() {
            match c {
                '~' => pointer.push_str("~0"),
                '/' => pointer.push_str("~1"),
                c => pointer.push(c),
            }
        }
        complete &= index_node(child, pointer, text, index, max_nodes);
        pointer.truncate(len);
    };
    match value {
        Value::Array(items) => {
            text.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                child(&i.to_string(), item, text, index);
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
                child(key, item, text, index);
            }
            text.push('}');
        }
        leaf => text.push_str(&leaf.to_string()),
    }
    if index.len() < max_nodes {
        index.insert(pointer.as_str().into(), start..text.len());
    } else {
        complete = false;
    }
    complete
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
}
