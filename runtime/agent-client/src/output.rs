//! A process's output as the host takes it: every chunk the agent sends
//! (up to [`crate::MAX_REPLY`] each) is cut on receipt into pieces of at
//! most [`MAX_OUTPUT_CHUNK`] bytes, so whatever queues them downstream
//! (log formatting, attach backlogs) is bounded by a chunk count.

use bytes::Bytes;
use vmcri_proto::agent::v1 as pb;

/// Most bytes of output one chunk carries on the host.
pub const MAX_OUTPUT_CHUNK: usize = 64 << 10;

/// Cuts chunks into pieces of at most [`MAX_OUTPUT_CHUNK`] bytes, each
/// with its own offset; the rest of a chunk waits here, uncopied.
#[derive(Debug, Default)]
pub struct Splitter {
    rest: Option<(pb::OutputChunk, Bytes)>,
}

impl Splitter {
    /// The next piece still pending from the last chunk, if any.
    pub fn pending(&mut self) -> Option<pb::OutputChunk> {
        let (head, mut data) = self.rest.take()?;
        let piece = data.split_to(data.len().min(MAX_OUTPUT_CHUNK));
        let out = pb::OutputChunk {
            data: piece.to_vec(),
            ..head.clone()
        };
        // An offset near u64::MAX is the guest's lie: the rest is dropped.
        let next_offset = head.offset.checked_add(piece.len() as u64);
        if let (false, Some(offset)) = (data.is_empty(), next_offset) {
            let next = pb::OutputChunk {
                offset,
                data: Vec::new(),
                ..head
            };
            self.rest = Some((next, data));
        }
        Some(out)
    }

    /// Takes a received chunk and returns its first piece.
    pub fn push(&mut self, mut chunk: pb::OutputChunk) -> pb::OutputChunk {
        if chunk.data.len() <= MAX_OUTPUT_CHUNK {
            return chunk;
        }
        let data = Bytes::from(std::mem::take(&mut chunk.data));
        self.rest = Some((chunk, data));
        self.pending().unwrap_or_default()
    }
}

/// The output stream of a process, in bounded pieces.
pub struct OutputStream {
    inner: tonic::Streaming<pb::OutputChunk>,
    split: Splitter,
}

impl OutputStream {
    pub(crate) fn new(inner: tonic::Streaming<pb::OutputChunk>) -> Self {
        OutputStream {
            inner,
            split: Splitter::default(),
        }
    }

    /// The next piece of output; None at the end. Cancel-safe: a piece
    /// is taken only when it is returned.
    pub async fn next(&mut self) -> Option<Result<pb::OutputChunk, tonic::Status>> {
        if let Some(piece) = self.split.pending() {
            return Some(Ok(piece));
        }
        match self.inner.message().await {
            Ok(Some(chunk)) => Some(Ok(self.split.push(chunk))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_chunks_are_cut_with_their_offsets_and_small_ones_pass() {
        let mut s = Splitter::default();
        let data: Vec<u8> = (0..=u8::MAX)
            .cycle()
            .take(MAX_OUTPUT_CHUNK * 2 + 10)
            .collect();
        let first = s.push(pb::OutputChunk {
            stream: pb::output_chunk::Stream::Stderr as i32,
            data: data.clone(),
            timestamp_ns: 7,
            offset: 100,
        });
        let mut pieces = vec![first];
        while let Some(p) = s.pending() {
            pieces.push(p);
        }
        assert_eq!(
            pieces.iter().map(|p| p.data.len()).collect::<Vec<_>>(),
            vec![MAX_OUTPUT_CHUNK, MAX_OUTPUT_CHUNK, 10]
        );
        assert_eq!(
            pieces.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![
                100,
                100 + MAX_OUTPUT_CHUNK as u64,
                100 + 2 * MAX_OUTPUT_CHUNK as u64
            ]
        );
        assert!(pieces
            .iter()
            .all(|p| p.timestamp_ns == 7 && p.stream == pb::output_chunk::Stream::Stderr as i32));
        let joined: Vec<u8> = pieces.into_iter().flat_map(|p| p.data).collect();
        assert_eq!(joined, data);
        let small = s.push(pb::OutputChunk {
            data: b"hi".to_vec(),
            offset: 5,
            ..Default::default()
        });
        assert_eq!((small.data.as_slice(), small.offset), (&b"hi"[..], 5));
        assert!(s.pending().is_none());
    }
}
