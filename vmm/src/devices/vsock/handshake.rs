//! The hybrid-vsock handshake on the host's Unix socket: the host writes
//! `CONNECT <port>\n`, the VMM answers `OK <host-port>\n` once the guest
//! accepted. The same text protocol as Firecracker's, so tools written
//! for it work; it is three words, so it is parsed by hand.

use thiserror::Error;

/// Longest handshake line we read before giving up on a client.
pub const MAX_LINE: usize = 32;

/// Why a handshake line was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("handshake line longer than {MAX_LINE} bytes")]
    TooLong,
    /// Not `CONNECT <port>`.
    #[error("expected 'CONNECT <port>', got {0:?}")]
    Malformed(String),
}

/// Looks for a complete `CONNECT <port>\n` in `buf`: `Ok(None)` if more
/// bytes are needed, `Ok(Some((port, consumed)))` once it is there.
pub fn parse_connect(buf: &[u8]) -> Result<Option<(u32, usize)>, HandshakeError> {
    let Some(nl) = buf.iter().position(|b| *b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Err(HandshakeError::TooLong)
        } else {
            Ok(None)
        };
    };
    if nl >= MAX_LINE {
        return Err(HandshakeError::TooLong);
    }
    let line = String::from_utf8_lossy(&buf[..nl]);
    let line = line.strip_suffix('\r').unwrap_or(&line);
    let mut words = line.split(' ');
    match (
        words.next(),
        words.next().map(str::parse::<u32>),
        words.next(),
    ) {
        (Some("CONNECT"), Some(Ok(port)), None) => Ok(Some((port, nl + 1))),
        _ => Err(HandshakeError::Malformed(line.to_string())),
    }
}

/// The reply sent once the guest accepted.
pub fn ok_line(local_port: u32) -> String {
    format!("OK {local_port}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_line_gives_port_and_length() {
        assert_eq!(parse_connect(b"CONNECT 1024\n"), Ok(Some((1024, 13))));
        assert_eq!(parse_connect(b"CONNECT 52\r\nextra"), Ok(Some((52, 12))));
    }

    #[test]
    fn partial_line_waits() {
        assert_eq!(parse_connect(b"CONN"), Ok(None));
        assert_eq!(parse_connect(b""), Ok(None));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b"connect 1\n"[..],
            b"CONNECT\n",
            b"CONNECT x\n",
            b"CONNECT 1 2\n",
            b"CONNECT -1\n",
            b"CONNECT 4294967296\n",
            b"CONNECT  5\n",
        ] {
            assert!(
                matches!(parse_connect(bad), Err(HandshakeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn overlong_input_is_refused_without_newline() {
        assert_eq!(
            parse_connect(&[b'A'; MAX_LINE]),
            Err(HandshakeError::TooLong)
        );
        let mut long = vec![b' '; 40];
        long.push(b'\n');
        assert_eq!(parse_connect(&long), Err(HandshakeError::TooLong));
    }

    #[test]
    fn reply_format() {
        assert_eq!(ok_line(1073741824), "OK 1073741824\n");
    }
}
