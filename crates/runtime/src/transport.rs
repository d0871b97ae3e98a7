//! Wire format of a request and its response stream over NATS.
//!
//! A request is a NATS request to the instance's subject. Its payload is the caller's body,
//! untouched; control data travels in headers: the request id, the subject the response frames
//! go to, and whatever trace headers the caller passed (`traceparent`, `tracestate`,
//! `x-request-id`). The instance acknowledges at once with an empty reply (or a rejection), so
//! a caller learns within milliseconds whether anyone took the request, and "no responders"
//! from NATS means the instance is gone.
//!
//! While a request runs, the caller may publish to the instance's cancel subject: without a
//! kind, the request is cancelled; with kind `control`, the payload goes to the handler. A
//! NATS request there with kind `ping` is the caller's probe of the instance: the instance
//! answers `1` when the request named by the request id header still runs there (or when no
//! id is given) and `0` when it does not (it ended, or was stopped, and its last frames were
//! lost — e.g. across a NATS restart); NATS answers "no responders" once the instance's
//! connection is gone. So a caller learns within a second that a stream will never finish.
//!
//! Responses are messages on the reply subject, each with a frame kind and, for data, batch
//! and final frames, a sequence number starting at 0 (frames are numbered, not payloads). The
//! kind and number lead the message's payload ([`encode_frame`]: one kind byte, then for
//! numbered kinds the number as u64 little-endian, then the body), not NATS headers: a
//! message with headers costs a header map built, serialized and parsed again for every token
//! on the worker, the NATS server and the caller. A `batch` frame carries several payloads
//! that were ready together — a handler that streams faster than NATS takes its frames sends
//! what piled up in one message instead of one each ([`encode_batch`]: each payload after its
//! length, u32 little-endian). `final` ends a successful stream; `error` ends a failed one
//! with a [`crate::RemoteError`] (JSON code and message) as body; an instance that refuses a
//! request answers the request itself with an `error` frame instead of the empty
//! acknowledgement. `ping` frames are the handler's liveness probes: the caller answers them,
//! and their arrival also tells the caller that a slow handler is still alive.

use async_nats::HeaderMap;
use bytes::Bytes;

pub const HDR_REQUEST_ID: &str = "tandem-request-id";
pub const HDR_REPLY_TO: &str = "tandem-reply-to";
/// Kind of a message on the cancel subject (`control`, `ping`); response frames carry theirs
/// in the payload.
pub const HDR_KIND: &str = "tandem-kind";
/// Headers a caller's tracing context and request ids travel in. `traceparent` / `tracestate`
/// are rewritten by the client to its own `client_request` span when tracing is installed.
pub const PASSTHROUGH_HEADERS: [&str; 4] = [
    "traceparent",
    "tracestate",
    "x-request-id",
    "x-dynamo-request-id",
];

/// Queue group every endpoint subscribes in, so one instance gets each request.
pub const QUEUE_GROUP: &str = "q";

/// `tandem-kind` of a message on the cancel subject that is a control message for the
/// request, not its cancellation.
pub const CONTROL: &str = "control";

/// `tandem-kind` of a caller's liveness probe of an instance, on its cancel subject.
pub const PING: &str = "ping";
/// A probe's answer: the request runs here.
pub const RUNNING: &[u8] = b"1";
/// A probe's answer: the instance is up, the request does not run here.
pub const NOT_RUNNING: &[u8] = b"0";

/// Subject where an instance listens for cancellations of its in-flight requests (no
/// `tandem-kind`) and control messages to them (`tandem-kind: control`, payload for the
/// handler).
pub fn cancel_subject(instance_id: u64) -> String {
    format!("_tandem.cancel.{instance_id:x}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Data,
    /// Several payloads in one frame ([`encode_batch`]).
    Batch,
    Final,
    Error,
    Ping,
}

impl FrameKind {
    /// The frame's first byte.
    fn code(self) -> u8 {
        match self {
            Self::Data => b'd',
            Self::Batch => b'b',
            Self::Final => b'f',
            Self::Error => b'e',
            Self::Ping => b'p',
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            b'd' => Self::Data,
            b'b' => Self::Batch,
            b'f' => Self::Final,
            b'e' => Self::Error,
            b'p' => Self::Ping,
            _ => return None,
        })
    }

    /// Data, batch and final frames are numbered; error and ping frames are not.
    fn numbered(self) -> bool {
        matches!(self, Self::Data | Self::Batch | Self::Final)
    }
}

/// One decoded response frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub seq: Option<u64>,
    pub payload: Bytes,
}

/// Bytes before a frame's body: the kind, and the number for numbered kinds.
const HEADER_LEN: usize = 1 + 8;

/// A frame's start: its kind byte and, for numbered kinds, `seq`.
fn frame_start(kind: FrameKind, seq: Option<u64>, body_len: usize) -> Vec<u8> {
    debug_assert_eq!(
        kind.numbered(),
        seq.is_some(),
        "{kind:?} frame numbered {seq:?}"
    );
    let mut out = Vec::with_capacity(HEADER_LEN + body_len);
    out.push(kind.code());
    if kind.numbered() {
        out.extend_from_slice(&seq.unwrap_or(0).to_le_bytes());
    }
    out
}

/// A message's payload for one frame: kind, number (numbered kinds), `body`.
pub fn encode_frame(kind: FrameKind, seq: Option<u64>, body: &[u8]) -> Bytes {
    let mut out = frame_start(kind, seq, body.len());
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// A `batch` frame numbered `seq`: each of `items` after its length (u32 little-endian).
pub fn encode_batch(seq: u64, items: &[Bytes]) -> Bytes {
    let len = items.iter().map(|b| b.len() + 4).sum();
    let mut out = frame_start(FrameKind::Batch, Some(seq), len);
    for item in items {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
    Bytes::from(out)
}

/// The payloads of a `batch` frame; `None` when it is malformed.
pub fn decode_batch(mut payload: Bytes) -> Option<Vec<Bytes>> {
    let mut items = Vec::new();
    while !payload.is_empty() {
        let len_bytes: [u8; 4] = payload.get(..4)?.try_into().ok()?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        if payload.len() < 4 + len {
            return None;
        }
        let _ = payload.split_to(4);
        items.push(payload.split_to(len));
    }
    Some(items)
}

pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// Decodes a message received on a reply subject (or a request's answer); `None` for
/// anything that is not a frame, such as the empty acknowledgement.
pub fn decode_frame(mut payload: Bytes) -> Option<Frame> {
    let kind = FrameKind::from_code(*payload.first()?)?;
    let seq = if kind.numbered() {
        let n: [u8; 8] = payload.get(1..HEADER_LEN)?.try_into().ok()?;
        let _ = payload.split_to(HEADER_LEN);
        Some(u64::from_le_bytes(n))
    } else {
        let _ = payload.split_to(1);
        None
    };
    Some(Frame { kind, seq, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for (kind, seq) in [
            (FrameKind::Data, Some(7)),
            (FrameKind::Batch, Some(9)),
            (FrameKind::Final, Some(u64::MAX)),
            (FrameKind::Error, None),
            (FrameKind::Ping, None),
        ] {
            let f = decode_frame(encode_frame(kind, seq, b"x{}")).unwrap();
            assert_eq!((f.kind, f.seq, &f.payload[..]), (kind, seq, &b"x{}"[..]));
        }
        let f = decode_frame(encode_frame(FrameKind::Final, Some(3), b"")).unwrap();
        assert!(f.payload.is_empty());
    }

    #[test]
    fn non_frames_are_rejected() {
        assert!(decode_frame(Bytes::new()).is_none(), "the empty ack");
        assert!(decode_frame(Bytes::from_static(b"{\"a\":1}")).is_none());
        assert!(
            decode_frame(Bytes::from_static(b"d\x01\x00")).is_none(),
            "short number"
        );
    }

    #[test]
    fn batches_round_trip_and_malformed_ones_are_refused() {
        let items = vec![
            Bytes::from_static(b"{\"a\":1}"),
            Bytes::new(),
            Bytes::from_static(b"xyz"),
        ];
        let frame = decode_frame(encode_batch(4, &items)).unwrap();
        assert_eq!((frame.kind, frame.seq), (FrameKind::Batch, Some(4)));
        assert_eq!(decode_batch(frame.payload), Some(items));
        assert_eq!(decode_batch(Bytes::new()), Some(vec![]));
        assert_eq!(decode_batch(Bytes::from_static(&[5, 0, 0, 0, b'a'])), None);
        assert_eq!(decode_batch(Bytes::from_static(&[1, 0])), None);
    }
}
