//! The SPDY/3 frame decoder and its header-block inflation.
//!
//! The input is either the raw byte stream a client sends, or (to reach
//! the header-block parser past zlib) a list of frames whose header
//! blocks the harness wraps in stored (uncompressed) deflate blocks of
//! one zlib stream, as a peer's compressor could have produced them.
//!
//! Checked besides panics: decoding the stream in one piece or in chunks
//! of any size gives the same frames and errors; a fatal error ends the
//! stream; and every frame decoded re-encodes, and decodes back to
//! itself.

use crate::input::Input;
use bytes::{BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use vmcri_streaming::spdy::{Frame, FrameDecoder, FrameEncoder};

/// The limits the streaming server decodes with.
const MAX_FRAME: usize = 1 << 20;
const MAX_HEADERS: usize = 64 * 1024;
/// The zlib dictionary ID of the SPDY/3 header dictionary (its Adler-32).
const DICTIONARY_ID: u32 = 0xE3C6_A7C2;
const MAX_RECORDS: usize = 64;

/// What decoding one step gave.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Frame(Frame),
    Invalid(String),
    Fatal(String),
}

/// Decodes `stream`, fed `chunk` bytes at a time.
fn decode_all(stream: &[u8], chunk: usize) -> Vec<Step> {
    let mut dec = FrameDecoder::new(MAX_FRAME, MAX_HEADERS);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => out.push(Step::Frame(f)),
                Ok(None) => break,
                Err(e) if e.is_fatal() => {
                    out.push(Step::Fatal(e.to_string()));
                    return out;
                }
                Err(e) => out.push(Step::Invalid(e.to_string())),
            }
        }
    }
    out
}

/// Every decoded frame encodes, and decodes back to itself; one encoder
/// and one decoder carry the whole sequence, as a connection does.
fn round_trip(steps: &[Step]) {
    let mut enc = FrameEncoder::new();
    let mut dec = FrameDecoder::new(MAX_FRAME, MAX_HEADERS);
    for step in steps {
        let Step::Frame(frame) = step else {
            continue;
        };
        let mut wire = BytesMut::new();
        if let Err(e) = enc.encode(frame.clone(), &mut wire) {
            panic!("decoded frame {frame:?} does not encode: {e}");
        }
        match dec.decode(&mut wire) {
            Ok(Some(again)) => assert_eq!(&again, frame, "frame changed in a round trip"),
            other => panic!("re-encoded {frame:?} decodes to {other:?}"),
        }
        assert!(wire.is_empty(), "re-encoded frame left bytes behind");
    }
}

/// Builds a stream of frames from the input, header blocks compressed
/// by stored deflate blocks.
fn build(input: &mut Input) -> Vec<u8> {
    let mut out = BytesMut::new();
    let mut zlib_started = false;
    let use_dictionary = input.bool();
    let mut records = 0;
    while !input.is_empty() && records < MAX_RECORDS {
        records += 1;
        match input.u8() % 4 {
            0 | 1 => {
                let kind = input.pick(&[1u16, 2, 8]).unwrap_or(1);
                let flags = input.u8();
                let id = stream_id(input);
                let mut fixed = Vec::new();
                fixed.put_u32(id);
                if kind == 1 {
                    fixed.put_u32(stream_id(input));
                    fixed.put_u8(input.u8());
                    fixed.put_u8(0);
                }
                let raw = header_block(input);
                let mut block = Vec::new();
                if !zlib_started {
                    zlib_started = true;
                    if use_dictionary {
                        // CMF 0x78, FLG with FDICT and a valid check, then the ID.
                        block.extend_from_slice(&[0x78, 0xbb]);
                        block.put_u32(DICTIONARY_ID);
                    } else {
                        block.extend_from_slice(&[0x78, 0x01]);
                    }
                }
                for part in raw.chunks(0xffff) {
                    stored(&mut block, part);
                }
                // The sync flush a peer ends each block with.
                stored(&mut block, &[]);
                control(&mut out, kind, flags, &[&fixed, &block]);
            }
            2 => {
                let kind = input.u16();
                let flags = input.u8();
                let payload = input.short_bytes();
                control(&mut out, kind, flags, &[payload]);
            }
            _ => {
                let id = input.u32() & 0x7fff_ffff;
                let flags = input.u8();
                let payload = input.short_bytes();
                out.put_u32(id);
                out.put_u32(u32::from(flags) << 24 | len24(payload.len()));
                out.put_slice(payload);
            }
        }
    }
    out.to_vec()
}

fn stream_id(input: &mut Input) -> u32 {
    let b = input.u8();
    if b & 0x80 == 0 {
        u32::from(b)
    } else {
        input.u32()
    }
}

fn len24(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX) & 0xff_ffff
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.put_u16(0x8003);
    out.put_u16(kind);
    out.put_u32(u32::from(flags) << 24 | len24(len));
    for p in parts {
        out.put_slice(p);
    }
}

/// A non-final stored deflate block holding `data` (at most 65535 bytes).
fn stored(out: &mut Vec<u8>, data: &[u8]) {
    let len = u16::try_from(data.len()).expect("split into 64 KiB parts");
    out.push(0);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
}

/// An uncompressed header block: mostly well-formed, any part may lie.
fn header_block(input: &mut Input) -> Vec<u8> {
    const NAMES: &[&[u8]] = &[
        b":method",
        b"streamtype",
        b"port",
        b"requestid",
        b"x-stream-protocol-version",
        b"Upper",
        b"",
        b"dup",
    ];
    let ctl = input.u8();
    if ctl & 0x80 != 0 {
        return input.short_bytes().to_vec();
    }
    let pairs = usize::from(ctl & 7);
    let mut raw = Vec::new();
    raw.put_u32(if ctl & 8 == 0 {
        u32::try_from(pairs).expect("under 8")
    } else {
        input.u32()
    });
    for _ in 0..pairs {
        let sel = input.u8();
        let name = if sel & 0x80 == 0 {
            input.pick(NAMES).unwrap_or(b"dup")
        } else {
            input.short_bytes()
        };
        let value = input.short_bytes();
        for s in [name, value] {
            let len = if sel & 0x40 == 0 {
                u32::try_from(s.len()).expect("short")
            } else {
                input.u32()
            };
            raw.put_u32(len);
            raw.put_slice(s);
        }
    }
    if ctl & 0x10 != 0 {
        raw.extend_from_slice(input.short_bytes());
    }
    raw
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let chunk = 1 + usize::from(input.u8());
    let stream = if mode & 1 == 0 {
        input.rest().to_vec()
    } else {
        build(&mut input)
    };
    let whole = decode_all(&stream, stream.len());
    let chunked = decode_all(&stream, chunk);
    assert_eq!(whole, chunked, "decoding depends on how the bytes arrive");
    round_trip(&whole);
}
