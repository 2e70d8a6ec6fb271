//! The log copier: a container's output from its agent into its CRI log
//! file, resumable exactly after a daemon restart.

use super::{LogFile, Stream};
use crate::container::{pref, ReopenRequest};
use std::path::{Path, PathBuf};

use crate::store::ContainerRecord;
use tokio::sync::{broadcast, mpsc};
use vmcri_agent_client::Agent;
use vmcri_proto::agent::v1 as pb;

/// Where a container's log copy stands, saved after every write so a
/// restarted daemon resumes exactly there: the output offset written, and
/// the log file's length and inode after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LogPosition {
    offset: u64,
    len: u64,
    inode: u64,
}

/// Fixed-size records, rewritten in place with one write.
const POSITION_RECORD: usize = 64;

impl LogPosition {
    fn load(path: &Path) -> LogPosition {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let v: Vec<u64> = text
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match v[..] {
            [offset, len, inode] => LogPosition { offset, len, inode },
            _ => LogPosition::default(),
        }
    }

    fn encode(&self) -> [u8; POSITION_RECORD] {
        let mut rec = [b' '; POSITION_RECORD];
        let text = format!("{} {} {}", self.offset, self.len, self.inode);
        rec[..text.len()].copy_from_slice(text.as_bytes());
        rec[POSITION_RECORD - 1] = b'\n';
        rec
    }
}

/// Streams the container's output from the agent into its log file until
/// the output ends, serving reopen requests between chunks. After a
/// restart it resumes at the saved position: output written after the
/// last save is cut from the log and written again, so nothing is lost
/// or doubled.
pub(crate) async fn copy_output(
    agent: Agent,
    rec: ContainerRecord,
    pos_path: PathBuf,
    mut reopen: mpsc::Receiver<ReopenRequest>,
    attached: broadcast::Sender<pb::OutputChunk>,
) {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let id = rec.id.clone();
    let mut pos = LogPosition::load(&pos_path);
    let log_file = Path::new(&rec.log_path);
    if !rec.log_path.is_empty() {
        if let Ok(m) = std::fs::metadata(log_file) {
            // Same file as at the last save: drop what came after it.
            if m.ino() == pos.inode && m.len() > pos.len {
                if let Err(e) = std::fs::File::options()
                    .write(true)
                    .open(log_file)
                    .and_then(|f| f.set_len(pos.len))
                {
                    tracing::warn!(container_id = %id, error = %e, "trimming the log to its saved position");
                }
            }
        }
    }
    let mut output = match agent.read_output(pref(&id, ""), pos.offset).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(container_id = %id, error = %e, "cannot read container output");
            return;
        }
    };
    let mut log = if rec.log_path.is_empty() {
        None
    } else {
        match LogFile::open(log_file) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(container_id = %id, path = %rec.log_path, error = %e, "cannot open container log");
                None
            }
        }
    };
    let pos_file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&pos_path);
    loop {
        tokio::select! {
            chunk = output.next() => {
                let Some(Ok(mut chunk)) = chunk else { return };
                // A resumed stream may start before what we hold.
                if chunk.offset < pos.offset {
                    // At most the chunk's length, so it fits a usize.
                    let behind = usize::try_from(pos.offset - chunk.offset).unwrap_or(usize::MAX);
                    let skip = behind.min(chunk.data.len());
                    chunk.data.drain(..skip);
                    chunk.offset += skip as u64;
                }
                if chunk.data.is_empty() {
                    continue;
                }
                if chunk.offset > pos.offset {
                    tracing::warn!(container_id = %id, lost = chunk.offset - pos.offset, "container output older than the agent's window was lost");
                }
                let stream = if chunk.stream == pb::output_chunk::Stream::Stderr as i32 {
                    Stream::Stderr
                } else {
                    Stream::Stdout
                };
                // The offset is the guest's word: one that would overflow
                // is a lie, and the rest of the stream is not trusted.
                let Some(end) = chunk.offset.checked_add(chunk.data.len() as u64) else {
                    tracing::warn!(container_id = %id, "agent sent an impossible output offset; stopped copying");
                    return;
                };
                pos.offset = end;
                if attached.receiver_count() > 0 {
                    let _ = attached.send(chunk.clone());
                }
                if let Some(l) = log.as_mut() {
                    if let Err(e) = l.write(stream, chunk.timestamp_ns, &chunk.data) {
                        tracing::error!(container_id = %id, error = %e, "writing container log");
                    }
                    if let Ok((len, inode)) = l.position() {
                        pos.len = len;
                        pos.inode = inode;
                    }
                }
                if let Ok(f) = &pos_file {
                    if let Err(e) = f.write_all_at(&pos.encode(), 0) {
                        tracing::warn!(container_id = %id, error = %e, "saving the log position");
                    }
                }
            }
            Some(done) = reopen.recv() => {
                let r = match log.as_mut() {
                    Some(l) => l.reopen(),
                    None => Ok(()),
                };
                let _ = done.send(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_positions_round_trip_in_fixed_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.logpos");
        let p = LogPosition {
            offset: 123_456,
            len: 789,
            inode: 42,
        };
        std::fs::write(&path, p.encode()).unwrap();
        assert_eq!(LogPosition::load(&path), p);
        // A shorter record over a longer one leaves no stale digits.
        let q = LogPosition {
            offset: 1,
            len: 2,
            inode: 3,
        };
        std::fs::write(&path, q.encode()).unwrap();
        assert_eq!(LogPosition::load(&path), q);
        assert_eq!(
            LogPosition::load(&dir.path().join("missing")),
            LogPosition::default()
        );
    }
}
