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
//! and final frames, a sequence number starting at 0 (frames are numbered, not payloads). A
//! `batch` frame carries several payloads that were ready together — a handler that streams
//! faster than NATS takes its frames sends what piled up in one message instead of one each
//! ([`encode_batch`]: each payload after its length, u32 little-endian). `final` ends a successful stream; `error`
//! ends a failed one with a [`crate::RemoteError`] (JSON code and message) as payload. `ping` frames are the handler's liveness
//! probes: the caller answers them, and their arrival also tells the caller that a slow
//! handler is still alive.

use async_nats::HeaderMap;
use bytes::Bytes;

pub const HDR_REQUEST_ID: &str = "tandem-request-id";
pub const HDR_REPLY_TO: &str = "tandem-reply-to";
pub const HDR_KIND: &str = "tandem-kind";
pub const HDR_SEQ: &str = "tandem-seq";
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
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Batch => "batch",
            Self::Final => "final",
            Self::Error => "error",
            Self::Ping => "ping",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "data" => Self::Data,
            "batch" => Self::Batch,
            "final" => Self::Final,
            "error" => Self::Error,
            "ping" => Self::Ping,
            _ => return None,
        })
    }
}

/// One decoded response frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub seq: Option<u64>,
    pub payload: Bytes,
}

/// One `batch` frame's payload: each of `items` after its length (u32 little-endian).
pub fn encode_batch(items: &[Bytes]) -> Bytes {
    let mut out = Vec::with_capacity(items.iter().map(|b| b.len() + 4).sum());
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

pub fn frame_headers(kind: FrameKind, seq: Option<u64>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HDR_KIND, kind.as_str());
    if let Some(seq) = seq {
        h.insert(HDR_SEQ, seq.to_string().as_str());
    }
    h
}

pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// Decodes a message received on a reply subject; `None` for anything that is not a frame.
pub fn decode_frame(headers: Option<&HeaderMap>, payload: Bytes) -> Option<Frame> {
    let kind = FrameKind::parse(header(headers, HDR_KIND)?)?;
    let seq = match header(headers, HDR_SEQ) {
        Some(s) => Some(s.parse().ok()?),
        None => None,
    };
    Some(Frame { kind, seq, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_headers() {
        for (kind, seq) in [
            (FrameKind::Data, Some(7)),
            (FrameKind::Batch, Some(9)),
            (FrameKind::Final, Some(8)),
            (FrameKind::Error, None),
            (FrameKind::Ping, None),
        ] {
            let h = frame_headers(kind, seq);
            let f = decode_frame(Some(&h), Bytes::from_static(b"x")).unwrap();
            assert_eq!(f.kind, kind);
            assert_eq!(f.seq, seq);
        }
    }

    #[test]
    fn non_frames_are_rejected() {
        assert!(decode_frame(None, Bytes::new()).is_none());
        let mut h = HeaderMap::new();
        h.insert(HDR_KIND, "bogus");
        assert!(decode_frame(Some(&h), Bytes::new()).is_none());
        let mut h = frame_headers(FrameKind::Data, None);
        h.insert(HDR_SEQ, "not-a-number");
        assert!(decode_frame(Some(&h), Bytes::new()).is_none());
    }

    #[test]
    fn batches_round_trip_and_malformed_ones_are_refused() {
        let items = vec![
            Bytes::from_static(b"{\"a\":1}"),
            Bytes::new(),
            Bytes::from_static(b"xyz"),
        ];
        assert_eq!(decode_batch(encode_batch(&items)), Some(items));
        assert_eq!(decode_batch(Bytes::new()), Some(vec![]));
        assert_eq!(decode_batch(Bytes::from_static(&[5, 0, 0, 0, b'a'])), None);
        assert_eq!(decode_batch(Bytes::from_static(&[1, 0])), None);
    }
}
