//! Calling a registry with the request's message bytes as they came, and
//! returning its answer's bytes untouched (a pass-through codec over tonic's
//! client).

use std::{str::FromStr, time::Duration};

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tonic::{
    Status,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel, Endpoint},
};

use kopir_core::error::{Reason, Refusal};

/// A codec whose messages are their own encoded bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The outcome of calling a registry: its status and, when OK, its message.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    /// gRPC code (0 = OK).
    pub code: i32,
    /// Status message.
    pub message: String,
    /// The response message bytes (empty unless OK).
    pub body: Bytes,
}

/// A connection to one registry (plain HTTP/2; the registry sits beside its
/// security server, as X-Road's information systems do).
#[derive(Debug, Clone)]
pub(crate) struct Registry {
    channel: Channel,
    address: String,
    max_message: usize,
}

impl Registry {
    /// Prepares a lazily connected channel to `url` (e.g. `http://127.0.0.1:7001`).
    pub(crate) fn new(
        url: &str,
        connect_timeout: Duration,
        max_message: usize,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_str(url)?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            channel,
            address: url.to_owned(),
            max_message,
        })
    }

    /// Calls `method` with `body`, giving up after `timeout`. A registry that
    /// cannot be reached is `registry.unavailable`; one that is too slow is
    /// `deadline.exceeded`; any status the registry itself returns is an
    /// [`Answer`].
    pub(crate) async fn call(
        &self,
        method: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, Refusal> {
        let path = PathAndQuery::from_str(method).map_err(|_| {
            Refusal::new(
                Reason::MethodUnsupported,
                format!("{method:?} is not a method path"),
            )
        })?;
        let mut grpc = Grpc::new(self.channel.clone())
            .max_decoding_message_size(self.max_message)
            .max_encoding_message_size(self.max_message);
        let mut request = tonic::Request::new(body);
        request.set_timeout(timeout);
        let call = async {
            grpc.ready().await.map_err(|e| {
                Refusal::new(
                    Reason::RegistryUnavailable,
                    format!("the registry at {} cannot be reached: {e}", self.address),
                )
            })?;
            Ok::<_, Refusal>(grpc.unary(request, path, RawCodec).await)
        };
        let result = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                return Err(Refusal::new(
                    Reason::DeadlineExceeded,
                    format!(
                        "the registry did not answer within {} ms",
                        timeout.as_millis()
                    ),
                ));
            }
            Ok(r) => r?,
        };
        match result {
            Ok(response) => Ok(Answer {
                code: 0,
                message: String::new(),
                body: response.into_inner(),
            }),
            // An error raised by the transport, not returned by the registry.
            Err(status)
                if std::error::Error::source(&status).is_some()
                    && status.code() == tonic::Code::Unavailable =>
            {
                Err(Refusal::new(
                    Reason::RegistryUnavailable,
                    format!(
                        "the registry at {} cannot be reached: {}",
                        self.address,
                        status.message()
                    ),
                ))
            }
            Err(status)
                if status.code() == tonic::Code::Cancelled
                    || status.code() == tonic::Code::DeadlineExceeded =>
            {
                Err(Refusal::new(
                    Reason::DeadlineExceeded,
                    format!(
                        "the registry did not answer within {} ms",
                        timeout.as_millis()
                    ),
                ))
            }
            Err(status) => Ok(Answer {
                code: status.code() as i32,
                message: status.message().to_owned(),
                body: Bytes::new(),
            }),
        }
    }
}
