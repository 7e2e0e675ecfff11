//! Which mock registry: its name on the command line, its default provider
//! subsystem and its gRPC service and methods.

use std::{fmt, str::FromStr};

use crate::proto::kz::{income::v1 as income, population::v1 as population, realty::v1 as realty};

/// One of the three mock registries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum RegistryKind {
    /// The population register of the Ministry of Justice.
    Population,
    /// The declared-income register of the State Revenue Committee.
    Income,
    /// The real-estate register of the Ministry of Justice.
    Realty,
}

/// A registry kind name that is not `population`, `income` or `realty`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown registry {0:?}: expected population, income or realty")]
pub struct UnknownRegistryKind(pub String);

impl RegistryKind {
    /// Every kind, in a fixed order.
    pub(crate) const ALL: [RegistryKind; 3] = [Self::Population, Self::Income, Self::Realty];

    /// The lower-case name: `population`, `income`, `realty`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Population => "population",
            Self::Income => "income",
            Self::Realty => "realty",
        }
    }

    /// The provider subsystem that serves this registry by default, e.g.
    /// `KZ/GOV/MOJ/population` (parse it into a `SubsystemId` where needed).
    pub const fn default_service_id(self) -> &'static str {
        match self {
            Self::Population => "KZ/GOV/MOJ/population",
            Self::Income => "KZ/GOV/SRC/income",
            Self::Realty => "KZ/GOV/MOJ/realty",
        }
    }

    /// The fully qualified gRPC service name, e.g.
    /// `kz.population.v1.PopulationRegistry`.
    pub(crate) fn grpc_service_name(self) -> &'static str {
        match self {
            Self::Population => population::population_registry_server::SERVICE_NAME,
            Self::Income => income::income_registry_server::SERVICE_NAME,
            Self::Realty => realty::realty_registry_server::SERVICE_NAME,
        }
    }

    /// The service's method names (all of them concern personal data).
    #[cfg(test)]
    pub(crate) fn methods(self) -> &'static [&'static str] {
        match self {
            Self::Population => &["GetPerson", "ListChildren"],
            Self::Income => &["GetDeclaredIncome"],
            Self::Realty => &["ListProperties"],
        }
    }

    /// The gRPC paths of the service's methods, e.g.
    /// `/kz.population.v1.PopulationRegistry/GetPerson`.
    #[cfg(test)]
    pub(crate) fn method_paths(self) -> Vec<String> {
        self.methods()
            .iter()
            .map(|m| format!("/{}/{m}", self.grpc_service_name()))
            .collect()
    }
}

impl fmt::Display for RegistryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RegistryKind {
    type Err = UnknownRegistryKind;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| UnknownRegistryKind(text.chars().take(80).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kopir_core::id::SubsystemId;

    #[test]
    fn names_round_trip_and_ids_parse() {
        for kind in RegistryKind::ALL {
            assert_eq!(kind.to_string().parse::<RegistryKind>(), Ok(kind));
            let value = clap::ValueEnum::to_possible_value(&kind).map(|v| v.get_name().to_owned());
            assert_eq!(value.as_deref(), Some(kind.as_str()));
            let id: SubsystemId = kind.default_service_id().parse().unwrap();
            assert_eq!(id.code(), kind.as_str());
        }
        assert!("tax".parse::<RegistryKind>().is_err());
        assert_eq!(
            RegistryKind::Population.method_paths(),
            [
                "/kz.population.v1.PopulationRegistry/GetPerson",
                "/kz.population.v1.PopulationRegistry/ListChildren"
            ]
        );
    }
}
