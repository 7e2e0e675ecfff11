//! Code generated from `proto/` (see `build.rs`), and the encoded descriptor set
//! that the reflection service serves.

/// kopir's own APIs.
pub mod kopir {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs)]
        tonic::include_proto!("kopir.v1");
    }
}

/// The mock registries' APIs.
pub mod kz {
    /// Population register.
    pub mod population {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs)]
            tonic::include_proto!("kz.population.v1");
        }
    }
    /// Declared-income register.
    pub mod income {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs)]
            tonic::include_proto!("kz.income.v1");
        }
    }
    /// Real-estate register.
    pub mod realty {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs)]
            tonic::include_proto!("kz.realty.v1");
        }
    }
}

/// Encoded `FileDescriptorSet` of every file in `proto/`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kopir_descriptor.bin"));
