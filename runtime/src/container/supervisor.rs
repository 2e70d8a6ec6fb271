//! One supervisor task per live container: it copies the output into the
//! CRI log and records the exit; it is started again after a daemon
//! restart.

use super::log::copier::copy_output;
use super::{pref, Containers, Entry, UNKNOWN_EXIT};
use crate::id::now_ns;
use crate::lock::lock;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use vmcri_proto::agent::v1 as pb;

impl Containers {
    /// Copies the container's output into its log and records its exit.
    pub(super) fn supervise(self: Arc<Self>, entry: Arc<Entry>) {
        tokio::spawn(async move {
            let rec = lock(&entry.record).clone();
            let id = rec.id.clone();
            let agent = match self.sandboxes.sandbox(&rec.sandbox_id) {
                Ok(s) => s.agent().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let agent = match agent {
                Ok(a) => a,
                Err(e) => {
                    self.mark_exited(&entry, UNKNOWN_EXIT, "SandboxUnreachable", &e, now_ns());
                    return;
                }
            };
            let (reopen_tx, reopen_rx) = mpsc::channel(4);
            *lock(&entry.reopen) = Some(reopen_tx);
            let position = self.store().log_position_path(&rec.sandbox_id, &id);
            let copier = tokio::spawn(copy_output(
                agent.clone(),
                rec.clone(),
                position,
                reopen_rx,
                entry.output.clone(),
            ));
            match agent.wait(pref(&id, "")).await {
                Ok(w) => {
                    use pb::wait_process_response::Reason;
                    let reason = match Reason::try_from(w.reason) {
                        Ok(Reason::OomKilled) => "OOMKilled",
                        _ if w.exit_code == 0 => "Completed",
                        _ => "Error",
                    };
                    // The log holds everything before the exit is reported.
                    let _ = tokio::time::timeout(Duration::from_secs(5), copier).await;
                    self.mark_exited(&entry, w.exit_code, reason, "", w.finished_at_ns);
                }
                Err(e) => {
                    copier.abort();
                    self.mark_exited(
                        &entry,
                        UNKNOWN_EXIT,
                        "Unknown",
                        &format!("lost the container's sandbox: {e}"),
                        now_ns(),
                    );
                }
            }
            *lock(&entry.reopen) = None;
        });
    }
}
