//! Network configuration: the first valid file of the conf dir, as a
//! network list.

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The spec versions vmcri runs plugins at.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0"];

/// Largest config file read: real ones are a few hundred bytes.
const MAX_CONF_BYTES: u64 = 1 << 20;

/// A network list (a `.conflist`, or a `.conf` wrapped as one) and the
/// exact JSON it came from, which DEL must be given again.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    /// The network's name.
    pub name: String,
    /// The spec version its plugins are run at.
    pub cni_version: String,
    /// Whether CHECK is turned off for it.
    pub disable_check: bool,
    /// The list as JSON (`cniVersion`, `name`, `plugins`, ...).
    pub json: Value,
}

impl NetworkList {
    /// The list's plugin configs, in order.
    pub fn plugins(&self) -> &[Value] {
        self.json
            .get("plugins")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Checks list JSON `json` (as [`NetworkList::json`] holds it).
    pub fn from_json(json: Value) -> Result<NetworkList, String> {
        let obj = json.as_object().ok_or("not a JSON object")?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("no network name")?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or("no cniVersion")?
            .to_string();
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(format!(
                "cniVersion {cni_version:?} is not supported ({})",
                SUPPORTED_VERSIONS.join(", ")
            ));
        }
        let disable_check = obj
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let plugins = obj
            .get("plugins")
            .and_then(Value::as_array)
            .ok_or("no plugins list")?;
        if plugins.is_empty() {
            return Err("the plugins list is empty".into());
        }
        for (i, p) in plugins.iter().enumerate() {
            plugin_type(p).map_err(|e| format!("plugin {i}: {e}"))?;
            if let Some(caps) = p.get("capabilities") {
                if !caps
                    .as_object()
                    .is_some_and(|c| c.values().all(Value::is_boolean))
                {
                    return Err(format!(
                        "plugin {i}: capabilities must map names to booleans"
                    ));
                }
            }
        }
        Ok(NetworkList {
            name,
            cni_version,
            disable_check,
            json,
        })
    }

    /// Reads a config file: a `.conflist`, or a single-plugin `.conf` or
    /// `.json` (a file whose JSON has `plugins` is read as a list, as libcni does).
    pub fn from_file(path: &Path) -> Result<NetworkList, String> {
        let bytes = read_capped(path)?;
        let json: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        let is_list =
            path.extension().is_some_and(|e| e == "conflist") || json.get("plugins").is_some();
        if is_list {
            return NetworkList::from_json(json);
        }
        let conf = json.as_object().ok_or("not a JSON object")?;
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = conf.get(key) {
                list.insert(key.into(), v.clone());
            }
        }
        list.insert("plugins".into(), Value::Array(vec![json.clone()]));
        NetworkList::from_json(Value::Object(list))
    }
}

/// A plugin config's `type`: the binary's name, never a path.
pub fn plugin_type(plugin: &Value) -> Result<&str, String> {
    let t = plugin
        .get("type")
        .and_then(Value::as_str)
        .ok_or("no plugin type")?;
    if t.is_empty() || t == "." || t == ".." || t.contains('/') || t.contains('\0') {
        return Err(format!("invalid plugin type {t:?}"));
    }
    Ok(t)
}

fn read_capped(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(MAX_CONF_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONF_BYTES {
        return Err(format!("larger than {MAX_CONF_BYTES} bytes"));
    }
    Ok(bytes)
}

/// The config chosen from a conf dir.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    /// Its file.
    pub file: PathBuf,
    /// Its modification time when read.
    pub mtime: Option<SystemTime>,
    /// The network list.
    pub list: NetworkList,
}

/// The first file of `dir` ending in `.conflist`, `.conf` or `.json`, in
/// lexical order, that is a valid network config (containerd's choice).
/// Without one, why: every file's error, or that there is none.
pub fn choose(dir: &Path) -> Result<Chosen, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read CNI config dir {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    let mut errors = Vec::new();
    for file in files {
        let mtime = std::fs::metadata(&file).and_then(|m| m.modified()).ok();
        match NetworkList::from_file(&file) {
            Ok(list) => return Ok(Chosen { file, mtime, list }),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "skipping invalid CNI config");
                errors.push(format!("{}: {e}", file.display()));
            }
        }
    }
    if errors.is_empty() {
        Err(format!("no network config found in {}", dir.display()))
    } else {
        Err(format!(
            "no valid network config in {}: {}",
            dir.display(),
            errors.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_valid_file_in_lexical_order_is_chosen() {
        let d = tempfile::tempdir().unwrap();
        let err = choose(d.path()).unwrap_err();
        assert!(err.contains("no network config found"), "{err}");
        assert!(choose(&d.path().join("absent"))
            .unwrap_err()
            .contains("cannot read"));
        std::fs::write(d.path().join("05-broken.conflist"), "{not json").unwrap();
        std::fs::write(
            d.path().join("10-old.conflist"),
            r#"{"cniVersion":"0.2.0","name":"x","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("00-ignored.txt"), "{}").unwrap();
        let err = choose(d.path()).unwrap_err();
        assert!(err.contains("05-broken.conflist: invalid JSON"), "{err}");
        assert!(
            err.contains("10-old.conflist: cniVersion \"0.2.0\""),
            "{err}"
        );
        std::fs::write(
            d.path().join("20-single.conf"),
            r#"{"cniVersion":"1.0.0","name":"single","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("30-list.conflist"),
            r#"{"cniVersion":"0.4.0","name":"list","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        let c = choose(d.path()).unwrap();
        assert_eq!(c.file, d.path().join("20-single.conf"));
        assert_eq!(c.list.name, "single");
        assert_eq!(c.list.cni_version, "1.0.0");
        assert_eq!(c.list.plugins().len(), 1);
        assert_eq!(c.list.plugins()[0]["bridge"], "cni0");
        std::fs::remove_file(d.path().join("20-single.conf")).unwrap();
        let c = choose(d.path()).unwrap();
        assert_eq!(c.list.name, "list");
        assert_eq!(c.list.plugins().len(), 2);
    }

    #[test]
    fn invalid_lists_say_why() {
        let bad = |j: &str| NetworkList::from_json(serde_json::from_str(j).unwrap()).unwrap_err();
        assert!(bad(r#"{"cniVersion":"1.0.0","plugins":[]}"#).contains("name"));
        assert!(bad(r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#).contains("empty"));
        assert!(bad(r#"{"cniVersion":"1.0.0","name":"n","plugins":[{}]}"#).contains("type"));
        assert!(
            bad(r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../sh"}]}"#)
                .contains("invalid plugin type")
        );
        assert!(bad(
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"a","capabilities":{"x":1}}]}"#
        )
        .contains("capabilities"));
        assert!(bad(r#"{"name":"n","plugins":[{"type":"a"}]}"#).contains("cniVersion"));
    }
}
