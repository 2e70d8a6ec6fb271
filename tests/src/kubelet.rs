//! kubelet's own requests, captured from kubelet 1.32 in
//! `../shared/kubelet-requests/` as proto-JSON, turned back into CRI
//! messages for replay tests.

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The folder of captured requests (beside the repository).
pub fn captures() -> PathBuf {
    crate::repo_root().join("../shared/kubelet-requests")
}

/// The capture named `name` (without `.json`), as JSON.
pub fn capture(name: &str) -> Value {
    let path = captures().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What a field left out of proto-JSON (its default) may be, tried in
/// turn: k8s-cri's serde derive has no `#[serde(default)]`, while
/// proto-JSON omits every field at its default.
const DEFAULTS: [fn() -> Value; 5] = [
    || Value::String(String::new()),
    || Value::from(0),
    || Value::Bool(false),
    || Value::Array(Vec::new()),
    || Value::Object(Default::default()),
];

/// The value at `path` in `v` (as serde_path_to_error names it).
fn at<'a>(v: &'a mut Value, path: &serde_path_to_error::Path) -> Option<&'a mut Value> {
    use serde_path_to_error::Segment;
    let mut cur = v;
    for seg in path.iter() {
        cur = match seg {
            Segment::Seq { index } => cur.get_mut(*index)?,
            Segment::Map { key } => cur.get_mut(key.as_str())?,
            Segment::Enum { .. } | Segment::Unknown => return None,
        };
    }
    Some(cur)
}

/// Parses proto-JSON `v` into `T`, filling in the defaults it left out.
pub fn parse<T: DeserializeOwned>(mut v: Value) -> T {
    // (path of the field, index into DEFAULTS) of the last field filled.
    let mut filled: Option<(String, usize)> = None;
    for _ in 0..1000 {
        let err = match serde_path_to_error::deserialize::<_, T>(v.clone()) {
            Ok(t) => return t,
            Err(e) => e,
        };
        let msg = err.inner().to_string();
        let here = err.path().to_string();
        if let Some(field) = msg
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            let obj = at(&mut v, err.path())
                .and_then(Value::as_object_mut)
                .unwrap_or_else(|| panic!("no object at {here} for {field}"));
            obj.insert(field.to_string(), DEFAULTS[0]());
            let path = if here == "." {
                field.to_string()
            } else {
                format!("{here}.{field}")
            };
            filled = Some((path, 0));
            continue;
        }
        // The default just filled has the wrong type: try the next one.
        match filled.take() {
            Some((path, i)) if path == here && i + 1 < DEFAULTS.len() => {
                *at(&mut v, err.path()).expect("the filled field") = DEFAULTS[i + 1]();
                filled = Some((path, i + 1));
            }
            _ => panic!("cannot parse the capture at {here}: {msg}"),
        }
    }
    panic!("the capture never parsed");
}

/// Sets the string at JSON pointer `pointer` in `v` (it must exist).
pub fn set(v: &mut Value, pointer: &str, to: impl Into<Value>) {
    *v.pointer_mut(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in the capture")) = to.into();
}

/// Every capture's name, sorted.
pub fn all_captures(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(String::from)
        })
        .collect();
    names.sort();
    names
}
