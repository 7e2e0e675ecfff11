//! kopir's own gRPC APIs, generated from `proto/kopir/v1` (see `build.rs`):
//! the exchange between security servers, the audit and access-report
//! services, and the consent authority; and the encoded descriptor set that
//! the reflection service serves.

/// Version 1 of kopir's APIs (`package kopir.v1`).
pub mod v1 {
    #![allow(missing_docs, unreachable_pub)]
    tonic::include_proto!("kopir.v1");
}

/// Encoded `FileDescriptorSet` of `proto/kopir/v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kopir_descriptor.bin"));
