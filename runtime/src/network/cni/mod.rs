//! The CNI protocol, runtime side (spec 0.4.0 to 1.0.0): network lists
//! run as chains for ADD, DEL and CHECK, each plugin given its config with
//! the list's name and version, the previous result, and the runtime
//! config of the capabilities it declares.
//!
//! Hand-written rather than bound to libcni (Go) or a crate: the runtime's
//! side of the spec is a few rules (chaining, capability filtering,
//! environment), and owning them lets every plugin call be bounded in
//! time and output, which a plugin-side crate would not do for us.

pub mod config;
pub mod exec;
pub mod result;

use config::NetworkList;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Errors of plugin calls.
#[derive(Debug, Error)]
pub enum CniError {
    /// No binary for a plugin type in the bin dirs.
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    NotFound {
        /// Plugin type.
        plugin: String,
        /// Where it was looked for.
        dirs: String,
    },
    /// The plugin could not be run.
    #[error("running CNI plugin {plugin}: {source}")]
    Spawn {
        /// Plugin type.
        plugin: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The plugin did not finish in time (it was killed).
    #[error("CNI plugin {plugin} {command} did not finish within {secs}s")]
    Timeout {
        /// Plugin type.
        plugin: String,
        /// ADD, DEL or CHECK.
        command: &'static str,
        /// The deadline.
        secs: u64,
    },
    /// The plugin printed more than we read.
    #[error(
        "CNI plugin {plugin} printed more than {} bytes on {stream}",
        exec::MAX_OUTPUT
    )]
    TooLarge {
        /// Plugin type.
        plugin: String,
        /// stdout or stderr.
        stream: &'static str,
    },
    /// The plugin failed with the spec's error JSON.
    #[error("CNI plugin {plugin} {command} failed: {error}")]
    Plugin {
        /// Plugin type.
        plugin: String,
        /// ADD, DEL or CHECK.
        command: &'static str,
        /// Its error.
        error: result::PluginError,
    },
    /// The plugin failed without the error JSON.
    #[error("CNI plugin {plugin} {command} failed ({status}): {output}")]
    Exit {
        /// Plugin type.
        plugin: String,
        /// ADD, DEL or CHECK.
        command: &'static str,
        /// Its exit status.
        status: String,
        /// The start of its output.
        output: String,
    },
    /// The plugin's result is not a valid result.
    #[error("CNI plugin {plugin} {command}: {msg}")]
    Result {
        /// Plugin type.
        plugin: String,
        /// ADD or CHECK.
        command: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// The cached network config no longer reads.
    #[error("cached CNI network config: {0}")]
    Cache(String),
}

/// One pod's attachment to a network: everything its ADD was run with,
/// and its result once it succeeded. Kept in the sandbox's directory so
/// that DEL gets the same config, arguments and result even after the
/// conf dir changed or the daemon restarted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    /// The network list, exactly as used.
    pub list: Value,
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS.
    pub netns: PathBuf,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_ARGS, in order.
    pub args: Vec<(String, String)>,
    /// Runtime config by capability, given to the plugins that declare it.
    pub capabilities: Map<String, Value>,
    /// The ADD result, once the whole list succeeded.
    pub result: Option<Value>,
}

impl Attachment {
    fn cni_args(&self) -> String {
        self.args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    fn list(&self) -> Result<NetworkList, CniError> {
        NetworkList::from_json(self.list.clone()).map_err(CniError::Cache)
    }
}

/// Runs plugins found in bin dirs.
#[derive(Debug, Clone)]
pub struct Plugins {
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
}

impl Plugins {
    /// Plugins looked up in `bin_dirs`, each call bounded by `timeout`.
    pub fn new(bin_dirs: Vec<PathBuf>, timeout: Duration) -> Plugins {
        Plugins { bin_dirs, timeout }
    }

    /// The binary of plugin type `name`: the first in the bin dirs.
    pub fn find(&self, name: &str) -> Result<PathBuf, CniError> {
        self.bin_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::NotFound {
                plugin: name.to_string(),
                dirs: self.path(),
            })
    }

    /// The list's plugins that have no binary.
    pub fn missing(&self, list: &NetworkList) -> Vec<String> {
        list.plugins()
            .iter()
            .filter_map(|p| config::plugin_type(p).ok())
            .filter(|t| self.find(t).is_err())
            .map(str::to_string)
            .collect()
    }

    fn path(&self) -> String {
        self.bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    async fn call(
        &self,
        a: &Attachment,
        netns: &str,
        command: &'static str,
        plugin: &Value,
        stdin: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let name = config::plugin_type(plugin).map_err(CniError::Cache)?;
        let binary = self.find(name)?;
        let args = a.cni_args();
        let path = self.path();
        let env = exec::Env {
            container_id: &a.container_id,
            netns,
            ifname: &a.ifname,
            args: &args,
            path: &path,
        };
        let input = serde_json::to_vec(stdin).map_err(|e| CniError::Cache(e.to_string()))?;
        tracing::debug!(sandbox_id = %a.container_id, plugin = name, command, "running CNI plugin");
        exec::run(&binary, name, command, &env, &input, self.timeout).await
    }

    /// ADD: runs the list in order, each plugin given the previous one's
    /// result, and returns the last result (checked).
    pub async fn add(&self, a: &Attachment) -> Result<Value, CniError> {
        let list = a.list()?;
        let netns = a.netns.display().to_string();
        let mut prev: Option<Value> = None;
        for plugin in list.plugins() {
            let name = config::plugin_type(plugin).map_err(CniError::Cache)?;
            let stdin = plugin_config(&list, plugin, &a.capabilities, prev.as_ref());
            let out = self.call(a, &netns, "ADD", plugin, &stdin).await?;
            let bad = |msg: String| CniError::Result {
                plugin: name.to_string(),
                command: "ADD",
                msg,
            };
            let value: Value = serde_json::from_slice(&out).map_err(|e| {
                bad(format!(
                    "its output is not a CNI result ({e}): {}",
                    exec::quote(&out)
                ))
            })?;
            result::parse(&value).map_err(bad)?;
            prev = Some(value);
        }
        prev.ok_or_else(|| CniError::Cache("the network list has no plugins".into()))
    }

    /// DEL: runs the list in reverse, each plugin given the cached ADD
    /// result (if ADD got that far). `netns_exists` false gives plugins an
    /// empty CNI_NETNS: the spec asks them to release what they can
    /// without it.
    pub async fn del(&self, a: &Attachment, netns_exists: bool) -> Result<(), CniError> {
        let list = a.list()?;
        let netns = if netns_exists {
            a.netns.display().to_string()
        } else {
            String::new()
        };
        for plugin in list.plugins().iter().rev() {
            let stdin = plugin_config(&list, plugin, &a.capabilities, a.result.as_ref());
            self.call(a, &netns, "DEL", plugin, &stdin).await?;
        }
        Ok(())
    }

    /// CHECK: runs the list in order with the cached result; nothing to do
    /// for a list with `disableCheck` or before ADD succeeded.
    pub async fn check(&self, a: &Attachment) -> Result<(), CniError> {
        let list = a.list()?;
        let Some(result) = a.result.as_ref() else {
            return Ok(());
        };
        if list.disable_check {
            return Ok(());
        }
        let netns = a.netns.display().to_string();
        for plugin in list.plugins() {
            let stdin = plugin_config(&list, plugin, &a.capabilities, Some(result));
            self.call(a, &netns, "CHECK", plugin, &stdin).await?;
        }
        Ok(())
    }
}

/// What plugin `plugin` of `list` reads on stdin: its own config with the
/// list's name and version, `prevResult`, and a `runtimeConfig` holding
/// only the capabilities it declares that the runtime has values for.
pub fn plugin_config(
    list: &NetworkList,
    plugin: &Value,
    capabilities: &Map<String, Value>,
    prev: Option<&Value>,
) -> Value {
    let mut conf = plugin.as_object().cloned().unwrap_or_default();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    if let Some(prev) = prev {
        conf.insert("prevResult".into(), prev.clone());
    } else {
        conf.remove("prevResult");
    }
    let declared = plugin.get("capabilities").and_then(Value::as_object);
    let runtime: Map<String, Value> = capabilities
        .iter()
        .filter(|(name, _)| {
            declared
                .and_then(|d| d.get(name.as_str()))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if runtime.is_empty() {
        conf.remove("runtimeConfig");
    } else {
        conf.insert("runtimeConfig".into(), Value::Object(runtime));
    }
    Value::Object(conf)
}

/// Where the attachment of a sandbox is kept, in its directory.
pub fn attachment_path(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join("cni.json")
}

#[cfg(test)]
mod tests;
