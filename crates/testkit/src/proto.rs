//! The mock registries' APIs, generated from `proto/kz` (see `build.rs`).

/// Registries of the Republic of Kazakhstan, as the mocks model them.
pub mod kz {
    /// Population register.
    pub mod population {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub)]
            tonic::include_proto!("kz.population.v1");
        }
    }
    /// Declared-income register.
    pub mod income {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub)]
            tonic::include_proto!("kz.income.v1");
        }
    }
    /// Real-estate register.
    pub mod realty {
        /// Version 1.
        pub mod v1 {
            #![allow(missing_docs, unreachable_pub)]
            tonic::include_proto!("kz.realty.v1");
        }
    }
}
