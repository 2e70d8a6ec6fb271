//! ExecSync: a command run in a container to its end, its output
//! collected (bounded), under an optional deadline.

use super::{pref, ContainerError, Containers, KILL_WAIT};
use crate::id::new_id;
use std::time::Duration;
use vmcri_proto::agent::v1 as pb;

/// Most output ExecSync returns per stream; the rest is cut (kubelet
/// itself caps probe output far lower).
const MAX_EXEC_OUTPUT: usize = 16 << 20;

/// What ExecSync returns.
#[derive(Debug, Clone, Default)]
pub struct ExecResult {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Exit code.
    pub exit_code: i32,
}

impl Containers {
    /// ExecSync: runs `cmd` in the container and collects its output;
    /// `timeout` zero means none.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecResult, ContainerError> {
        check_program("ExecSync", &cmd)?;
        let (rec, agent) = self.running(id).await?;
        let id = rec.id;
        let exec_id = new_id()[..16].to_string();
        agent
            .exec_process(pb::ExecProcessRequest {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                args: cmd,
                env: Vec::new(),
                cwd: String::new(),
                tty: false,
                stdin: false,
            })
            .await?;
        let process = pref(&id, &exec_id);
        let run = async {
            let mut output = agent.read_output(process.clone(), 0).await?;
            let mut out = ExecResult::default();
            while let Some(chunk) = output.next().await {
                let Ok(chunk) = chunk else { break };
                let buf = if chunk.stream == pb::output_chunk::Stream::Stderr as i32 {
                    &mut out.stderr
                } else {
                    &mut out.stdout
                };
                let room = MAX_EXEC_OUTPUT.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk.data[..chunk.data.len().min(room)]);
            }
            let w = agent.wait(process.clone()).await?;
            out.exit_code = w.exit_code;
            Ok::<_, ContainerError>(out)
        };
        if timeout.is_zero() {
            return run.await;
        }
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => {
                let _ = agent.signal(process.clone(), libc::SIGKILL as u32).await;
                // Collect it so the agent forgets it.
                let _ = tokio::time::timeout(KILL_WAIT, agent.wait(process)).await;
                Err(ContainerError::Timeout(format!(
                    "ExecSync in container {id} timed out after {}s",
                    timeout.as_secs()
                )))
            }
        }
    }
}

/// Refuses an exec command without a program name: kubelet has been
/// seen to send `[""]`.
pub fn check_program(call: &str, cmd: &[String]) -> Result<(), ContainerError> {
    if cmd.first().is_none_or(String::is_empty) {
        return Err(ContainerError::Invalid(format!(
            "{call}: cmd is empty (it needs a program name)"
        )));
    }
    Ok(())
}
