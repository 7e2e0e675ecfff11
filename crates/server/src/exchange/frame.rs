//! The gRPC wire format of one unary call, for the pass-through on the client
//! port: the request body is read (within the size limit) and unframed without
//! decoding the message, and the answer is framed back with its trailers. The
//! gateway needs no compiled-in knowledge of registry APIs.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::{BodyExt, Limited, StreamBody};

use kopir_core::error::{REQUEST_ID_KEY, Reason, Refusal};

/// Length of the gRPC message prefix: a compression flag and a 4-byte length.
const PREFIX: usize = 5;

/// Reads a unary gRPC request body and returns the one message it holds.
pub(crate) async fn read_unary<B>(body: B, limit: usize) -> Result<Bytes, Refusal>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let collected = Limited::new(body, limit + PREFIX)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal::new(
                    Reason::BodyTooLarge,
                    format!("the request body exceeds this server's limit of {limit} bytes"),
                )
            } else {
                Refusal::new(
                    Reason::MetadataInvalid,
                    format!("the request body could not be read: {e}"),
                )
            }
        })?;
    unframe(collected.to_bytes(), limit)
}

/// Splits one framed gRPC message from `data`.
pub fn unframe(mut data: Bytes, limit: usize) -> Result<Bytes, Refusal> {
    if data.len() < PREFIX {
        return Err(Refusal::new(
            Reason::MethodUnsupported,
            "the request holds no gRPC message (kopir passes unary calls only)",
        ));
    }
    let compressed = data.get_u8();
    let len = data.get_u32() as usize;
    if compressed != 0 {
        return Err(Refusal::new(
            Reason::MethodUnsupported,
            "compressed requests are not supported; send the message uncompressed",
        ));
    }
    if len > limit {
        return Err(Refusal::new(
            Reason::BodyTooLarge,
            format!(
                "the request message of {len} bytes exceeds this server's limit of {limit} bytes"
            ),
        ));
    }
    if data.len() != len {
        return Err(Refusal::new(
            Reason::MethodUnsupported,
            "the request is not exactly one gRPC message (kopir passes unary calls only)",
        ));
    }
    Ok(data)
}

/// Frames one message.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(PREFIX + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// A successful unary response: the framed message, then `grpc-status: 0` and
/// the request id in the trailers.
pub(crate) fn ok_response(message: &[u8], request_id: &str) -> Response<axum::body::Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        trailers.insert(REQUEST_ID_KEY, v);
    }
    let frames = [
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(frame(message))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut response = Response::new(axum::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// An error response (trailers-only) for `status`.
pub(crate) fn status_response(status: tonic::Status) -> Response<axum::body::Body> {
    status.into_http::<axum::body::Body>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let framed = frame(b"hello");
        assert_eq!(unframe(framed, 10).unwrap(), Bytes::from_static(b"hello"));
    }

    #[test]
    fn refuses_compressed_partial_and_oversized() {
        let mut compressed = BytesMut::from(&frame(b"x")[..]);
        compressed[0] = 1;
        assert_eq!(
            unframe(compressed.freeze(), 10).unwrap_err().reason,
            Reason::MethodUnsupported
        );
        let two = [frame(b"a"), frame(b"b")].concat();
        assert_eq!(
            unframe(two.into(), 10).unwrap_err().reason,
            Reason::MethodUnsupported
        );
        assert_eq!(
            unframe(frame(&[0; 11]), 10).unwrap_err().reason,
            Reason::BodyTooLarge
        );
        assert_eq!(
            unframe(Bytes::from_static(b"\0\0"), 10).unwrap_err().reason,
            Reason::MethodUnsupported
        );
    }

    #[tokio::test]
    async fn read_stops_at_the_limit() {
        let body = http_body_util::Full::new(frame(&[7; 100]));
        let err = read_unary(body, 50).await.unwrap_err();
        assert_eq!(err.reason, Reason::BodyTooLarge);
    }
}
