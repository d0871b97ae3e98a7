//! The request plane with types: serde in one place.
//!
//! [`Endpoint::serve_typed`] decodes each request body into `Req` (a body that does not
//! decode is refused as `invalid_request`) and encodes each `Resp` the handler streams.
//! [`Client::call`] encodes the request and returns a [`TypedStream`] that decodes each
//! response frame; a frame that does not decode ends the stream with
//! [`RuntimeError::Decode`]. Errors keep their class both ways ([`RemoteError`]). JSON is the
//! encoding, as for every other message tandem and Dynamo put on NATS.

use crate::client::{Client, RequestOptions, ResponseStream, RouterMode};
use crate::distributed::Endpoint;
use crate::endpoint::RequestContext;
use crate::error::{ErrorCode, RemoteError, RuntimeError};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

/// What a typed handler streams back.
pub type TypedHandlerStream<Resp> = BoxStream<'static, Result<Resp, RemoteError>>;

fn encode<T: Serialize>(value: &T) -> Result<Bytes, RemoteError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| RemoteError::internal(format!("cannot encode: {e}")))
}

impl Endpoint {
    /// Serves `handler`, which takes decoded requests and streams responses.
    pub async fn serve_typed<Req, Resp, F, Fut>(&self, handler: F) -> Result<(), RuntimeError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Req, RequestContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<TypedHandlerStream<Resp>, RemoteError>> + Send + 'static,
    {
        let handler = std::sync::Arc::new(handler);
        self.serve(move |body: Bytes, ctx: RequestContext| {
            let handler = handler.clone();
            async move {
                let request: Req = serde_json::from_slice(&body).map_err(|e| {
                    RemoteError::new(ErrorCode::InvalidRequest, format!("cannot decode: {e}"))
                })?;
                let responses = handler(request, ctx).await?;
                Ok(responses.map(|r| r.and_then(|v| encode(&v))).boxed())
            }
        })
        .await
    }
}

impl Client {
    /// Sends `request` to the instance `mode` picks; responses arrive decoded as `Resp`.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        mode: RouterMode,
        request: &Req,
        opts: RequestOptions,
    ) -> Result<TypedStream<Resp>, RuntimeError> {
        let body = serde_json::to_vec(request).map_err(RuntimeError::from)?;
        let inner = self.generate(mode, Bytes::from(body), opts).await?;
        Ok(TypedStream {
            inner,
            _resp: PhantomData,
        })
    }
}

/// A response stream whose frames are decoded as `Resp`. Dropping it cancels the request,
/// as with [`ResponseStream`].
pub struct TypedStream<Resp> {
    inner: ResponseStream,
    _resp: PhantomData<fn() -> Resp>,
}

impl<Resp> TypedStream<Resp> {
    pub fn request_id(&self) -> &str {
        self.inner.request_id()
    }

    pub fn instance_id(&self) -> u64 {
        self.inner.instance_id()
    }

    /// Sends a control message to the handler (see [`RequestContext::take_controls`]).
    pub async fn control<C: Serialize>(&self, message: &C) -> bool {
        match serde_json::to_vec(message) {
            Ok(b) => self.inner.control(Bytes::from(b)).await,
            Err(_) => false,
        }
    }

    pub async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

impl<Resp: DeserializeOwned> Stream for TypedStream<Resp> {
    type Item = Result<Resp, RuntimeError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx).map(|item| {
            item.map(|frame| {
                frame.and_then(|bytes| {
                    serde_json::from_slice(&bytes).map_err(|e| RuntimeError::Decode(e.to_string()))
                })
            })
        })
    }
}

/// Reads a control message a caller sent with [`TypedStream::control`].
pub fn decode_control<C: DeserializeOwned>(payload: &[u8]) -> Result<C, RemoteError> {
    serde_json::from_slice(payload).map_err(|e| {
        RemoteError::new(
            ErrorCode::InvalidRequest,
            format!("cannot decode control: {e}"),
        )
    })
}
