//! Container logs in the CRI format kubelet reads and rotates:
//! `<RFC3339Nano timestamp> <stdout|stderr> <P|F> <content>\n`, where P
//! marks a partial line continued by the next entry and F a full one;
//! [`copier`] fills them from the agent.

pub mod copier;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Which stream a log entry is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn tag(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Formats nanoseconds since the epoch as RFC 3339 with nanoseconds in
/// UTC (`2026-11-25T16:40:00.123456789Z`), the timestamp kubelet parses.
pub fn rfc3339_nano(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm):
    // a dozen lines instead of a date crate for one format.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes `data` read at `at_ns` from `stream` to `out` as CRI log
/// entries, as a stream: a chunk of empty lines grows ~45 times when
/// formatted, so it is never built whole in memory. A trailing piece
/// without newline becomes a P entry; the next chunk continues the line.
pub fn write_entries(
    out: &mut impl Write,
    stream: Stream,
    at_ns: i64,
    data: &[u8],
) -> std::io::Result<()> {
    let ts = rfc3339_nano(at_ns);
    let prefix_f = format!("{ts} {} F ", stream.tag());
    let prefix_p = format!("{ts} {} P ", stream.tag());
    let mut rest = data;
    while !rest.is_empty() {
        let (line, prefix, next) = match rest.iter().position(|b| *b == b'\n') {
            Some(i) => (&rest[..i], &prefix_f, &rest[i + 1..]),
            None => (rest, &prefix_p, &rest[rest.len()..]),
        };
        out.write_all(prefix.as_bytes())?;
        out.write_all(line)?;
        out.write_all(b"\n")?;
        rest = next;
    }
    Ok(())
}

/// Bytes of formatted log held before they are written out.
const LOG_BUFFER: usize = 64 << 10;

/// Opens (creating, 0640: readable by root's log collectors, not by every
/// local user) the log at `path` for appending.
fn open_append(path: &Path) -> std::io::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// A container's log file, reopened on request (after kubelet renames it).
pub struct LogFile {
    path: PathBuf,
    file: File,
}

impl LogFile {
    /// Opens (creating, appending to) the log at `path`.
    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(path)?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes a chunk of output as entries.
    pub fn write(&mut self, stream: Stream, at_ns: i64, data: &[u8]) -> std::io::Result<()> {
        let mut out = std::io::BufWriter::with_capacity(LOG_BUFFER, &self.file);
        write_entries(&mut out, stream, at_ns, data)?;
        out.flush()
    }

    /// The file's length and inode now.
    pub fn position(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.len(), m.ino()))
    }

    /// Closes the file and opens `path` anew.
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        assert_eq!(rfc3339_nano(0), "1970-01-01T00:00:00.000000000Z");
        // 2026-11-25T16:40:00.000000123Z
        assert_eq!(
            rfc3339_nano(1_795_624_800_000_000_123),
            "2026-11-25T16:40:00.000000123Z"
        );
        assert_eq!(
            rfc3339_nano(951_782_400_500_000_000),
            "2000-02-29T00:00:00.500000000Z"
        );
    }

    #[test]
    fn full_and_partial_lines_are_tagged() {
        let mut out = Vec::new();
        write_entries(&mut out, Stream::Stdout, 0, b"one\ntwo\nthr").unwrap();
        write_entries(&mut out, Stream::Stderr, 0, b"ee\n").unwrap();
        let text = String::from_utf8(out).unwrap();
        let ts = "1970-01-01T00:00:00.000000000Z";
        assert_eq!(
            text,
            format!("{ts} stdout F one\n{ts} stdout F two\n{ts} stdout P thr\n{ts} stderr F ee\n")
        );
    }

    #[test]
    fn an_empty_line_is_an_empty_full_entry() {
        let mut out = Vec::new();
        write_entries(&mut out, Stream::Stdout, 0, b"\n").unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with(" stdout F \n"));
    }

    /// Counts the bytes it is handed in one call, to see how much the
    /// formatter holds at once.
    struct Largest(usize, usize);
    impl Write for Largest {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.max(b.len());
            self.1 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_chunk_of_empty_lines_is_formatted_without_a_big_buffer() {
        let data = vec![b'\n'; 64 << 10];
        let mut out = std::io::BufWriter::with_capacity(LOG_BUFFER, Largest(0, 0));
        write_entries(&mut out, Stream::Stdout, 0, &data).unwrap();
        let sink = out.into_inner().map_err(|_| "flush").unwrap();
        // ~45 bytes per entry: the formatted chunk is ~45 times the data,
        // yet no write carried more than the buffer.
        assert_eq!(
            sink.1,
            data.len() * "1970-01-01T00:00:00.000000000Z stdout F \n".len()
        );
        assert!(sink.0 <= LOG_BUFFER, "{} bytes in one write", sink.0);
    }

    #[test]
    fn reopen_starts_a_new_file_after_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let mut log = LogFile::open(&path).unwrap();
        log.write(Stream::Stdout, 0, b"before\n").unwrap();
        std::fs::rename(&path, dir.path().join("c/0.log.1")).unwrap();
        log.reopen().unwrap();
        log.write(Stream::Stdout, 0, b"after\n").unwrap();
        let old = std::fs::read_to_string(dir.path().join("c/0.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("before") && !old.contains("after"));
        assert!(new.contains("after") && !new.contains("before"));
    }
}
