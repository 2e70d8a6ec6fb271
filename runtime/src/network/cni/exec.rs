//! Running one plugin binary: the `CNI_*` environment, its config on
//! stdin, its output bounded in size and time.

use super::result::plugin_error;
use super::CniError;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Most a plugin may print on stdout or stderr: a result is a few KiB.
pub const MAX_OUTPUT: usize = 1 << 20;

/// Longest part of unparsed plugin output quoted in an error.
const QUOTE: usize = 512;

/// The `CNI_*` variables of one call but the command.
#[derive(Debug, Clone)]
pub struct Env<'a> {
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_NETNS (empty on a DEL whose namespace is gone).
    pub netns: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// CNI_ARGS.
    pub args: &'a str,
    /// CNI_PATH.
    pub path: &'a str,
}

/// Runs plugin `binary` (`plugin` names it in errors) for `command` with
/// `config` on stdin, and returns its stdout: the result of an ADD.
pub async fn run(
    binary: &Path,
    plugin: &str,
    command: &'static str,
    env: &Env<'_>,
    config: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, CniError> {
    let mut cmd = tokio::process::Command::new(binary);
    // A plugin reads only what this call sets: none of the daemon's own.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", env.container_id)
        .env("CNI_NETNS", env.netns)
        .env("CNI_IFNAME", env.ifname)
        .env("CNI_ARGS", env.args)
        .env("CNI_PATH", env.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| CniError::Spawn {
        plugin: plugin.to_string(),
        source,
    })?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let io = async {
        let write = async {
            if let Some(mut s) = stdin {
                // A plugin that exits without reading is judged by its exit.
                let _ = s.write_all(config).await;
            }
            Ok::<(), CniError>(())
        };
        let (_, out, err) = tokio::try_join!(
            write,
            read_capped(stdout, plugin, "stdout"),
            read_capped(stderr, plugin, "stderr")
        )?;
        let status = child.wait().await.map_err(|source| CniError::Spawn {
            plugin: plugin.to_string(),
            source,
        })?;
        Ok::<_, CniError>((status, out, err))
    };
    let outcome = tokio::time::timeout(timeout, io).await;
    let (status, out, err) = match outcome {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            let _ = child.start_kill();
            return Err(e);
        }
        Err(_) => {
            let _ = child.start_kill();
            return Err(CniError::Timeout {
                plugin: plugin.to_string(),
                command,
                secs: timeout.as_secs(),
            });
        }
    };
    if !err.is_empty() {
        tracing::debug!(plugin, command, stderr = %quote(&err), "CNI plugin wrote to stderr");
    }
    if status.success() {
        return Ok(out);
    }
    if let Some(error) = plugin_error(&out) {
        return Err(CniError::Plugin {
            plugin: plugin.to_string(),
            command,
            error,
        });
    }
    Err(CniError::Exit {
        plugin: plugin.to_string(),
        command,
        status: status.to_string(),
        output: quote(if out.is_empty() { &err } else { &out }),
    })
}

/// All of `r`, or an error past [`MAX_OUTPUT`] bytes.
async fn read_capped(
    r: Option<impl AsyncRead + Unpin>,
    plugin: &str,
    stream: &'static str,
) -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    let Some(r) = r else { return Ok(buf) };
    let cap = u64::try_from(MAX_OUTPUT).unwrap_or(u64::MAX);
    r.take(cap + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|source| CniError::Spawn {
            plugin: plugin.to_string(),
            source,
        })?;
    if buf.len() > MAX_OUTPUT {
        return Err(CniError::TooLarge {
            plugin: plugin.to_string(),
            stream,
        });
    }
    Ok(buf)
}

/// The start of `bytes` as text, for an error message.
pub fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(QUOTE)]);
    let text = text.trim();
    if bytes.len() > QUOTE {
        format!("{text}...")
    } else {
        text.to_string()
    }
}
