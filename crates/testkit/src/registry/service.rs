//! The three mock registries as tonic services over a shared [`Dataset`]:
//! requests are checked at the boundary (`INVALID_ARGUMENT` for a malformed IIN
//! or year), unknown persons and declarations are `NOT_FOUND`, and domain types
//! are converted to the generated protobuf messages here.

use std::sync::Arc;

use time::Date;
use tonic::{Request, Response, Status};

use super::data::{
    ASKABLE_TAX_YEARS, Address, Dataset, Declaration, IncomeKind, IncomeSource, Ownership, Person,
    Property, PropertyKind, Sex,
};
use crate::proto::kz::{income::v1 as income, population::v1 as population, realty::v1 as realty};
use kopir_core::id::Iin;

/// `YYYY-MM-DD`.
fn iso(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// The request's IIN, or `INVALID_ARGUMENT` naming what is wrong with it.
fn parse_iin(text: &str) -> Result<Iin, Status> {
    text.parse::<Iin>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

fn not_found_person(iin: &Iin) -> Status {
    Status::not_found(format!(
        "no person with IIN {iin} in the population register"
    ))
}

impl From<&Address> for population::Address {
    fn from(a: &Address) -> Self {
        Self {
            region: a.region.clone(),
            city: a.city.clone(),
            street: a.street.clone(),
            building: a.building.clone(),
            apartment: a.apartment.clone().unwrap_or_default(),
        }
    }
}

impl From<&Person> for population::Person {
    fn from(p: &Person) -> Self {
        let sex = match p.sex {
            Sex::Male => population::Sex::Male,
            Sex::Female => population::Sex::Female,
        };
        Self {
            iin: p.iin.to_string(),
            surname: p.surname.clone(),
            given_name: p.given_name.clone(),
            patronymic: p.patronymic.clone(),
            birth_date: iso(p.birth_date),
            sex: sex.into(),
            citizenship: p.citizenship.clone(),
            registered_address: Some((&p.address).into()),
            mother_iin: p.mother.map(|i| i.to_string()).unwrap_or_default(),
            father_iin: p.father.map(|i| i.to_string()).unwrap_or_default(),
        }
    }
}

impl From<&IncomeSource> for income::IncomeSource {
    fn from(s: &IncomeSource) -> Self {
        let kind = match s.kind {
            IncomeKind::Salary => income::IncomeKind::Salary,
            IncomeKind::Entrepreneurship => income::IncomeKind::Entrepreneurship,
            IncomeKind::Rent => income::IncomeKind::Rent,
            IncomeKind::Pension => income::IncomeKind::Pension,
            IncomeKind::Benefit => income::IncomeKind::Benefit,
        };
        Self {
            payer_bin: s.payer_bin.clone(),
            payer_name: s.payer_name.clone(),
            kind: kind.into(),
            amount_tiyn: s.amount_tiyn,
        }
    }
}

impl From<&Declaration> for income::DeclaredIncome {
    fn from(d: &Declaration) -> Self {
        Self {
            iin: d.iin.to_string(),
            year: d.year,
            sources: d.sources.iter().map(Into::into).collect(),
            total_tiyn: d.total_tiyn,
            filed_on: iso(d.filed_on),
        }
    }
}

fn property_message(p: &Property, o: &Ownership) -> realty::Property {
    let kind = match p.kind {
        PropertyKind::Apartment => realty::PropertyKind::Apartment,
        PropertyKind::House => realty::PropertyKind::House,
        PropertyKind::Land => realty::PropertyKind::Land,
        PropertyKind::Garage => realty::PropertyKind::Garage,
        PropertyKind::Commercial => realty::PropertyKind::Commercial,
    };
    realty::Property {
        cadastral_number: p.cadastral_number.clone(),
        kind: kind.into(),
        address: p.address.clone(),
        area_m2: p.area_m2,
        share_numerator: o.share_numerator,
        share_denominator: o.share_denominator,
        acquired_on: iso(o.acquired_on),
    }
}

/// The population register (`kz.population.v1.PopulationRegistry`).
#[derive(Debug, Clone)]
pub struct PopulationRegistry {
    data: Arc<Dataset>,
}

impl PopulationRegistry {
    /// A register answering from `data`.
    pub(crate) fn new(data: Arc<Dataset>) -> Self {
        Self { data }
    }

    /// The tonic service to add to a server.
    pub(crate) fn into_server(
        self,
    ) -> population::population_registry_server::PopulationRegistryServer<Self> {
        population::population_registry_server::PopulationRegistryServer::new(self)
    }
}

#[tonic::async_trait]
impl population::population_registry_server::PopulationRegistry for PopulationRegistry {
    async fn get_person(
        &self,
        request: Request<population::GetPersonRequest>,
    ) -> Result<Response<population::Person>, Status> {
        let iin = parse_iin(&request.get_ref().iin)?;
        let person = self
            .data
            .person(&iin)
            .ok_or_else(|| not_found_person(&iin))?;
        Ok(Response::new(person.into()))
    }

    async fn list_children(
        &self,
        request: Request<population::ListChildrenRequest>,
    ) -> Result<Response<population::ListChildrenResponse>, Status> {
        let iin = parse_iin(&request.get_ref().iin)?;
        let children = self
            .data
            .children(&iin)
            .ok_or_else(|| not_found_person(&iin))?;
        Ok(Response::new(population::ListChildrenResponse {
            children: children.into_iter().map(Into::into).collect(),
        }))
    }
}

/// The declared-income register (`kz.income.v1.IncomeRegistry`).
#[derive(Debug, Clone)]
pub struct IncomeRegistry {
    data: Arc<Dataset>,
}

impl IncomeRegistry {
    /// A register answering from `data`.
    pub(crate) fn new(data: Arc<Dataset>) -> Self {
        Self { data }
    }

    /// The tonic service to add to a server.
    pub(crate) fn into_server(self) -> income::income_registry_server::IncomeRegistryServer<Self> {
        income::income_registry_server::IncomeRegistryServer::new(self)
    }
}

#[tonic::async_trait]
impl income::income_registry_server::IncomeRegistry for IncomeRegistry {
    async fn get_declared_income(
        &self,
        request: Request<income::GetDeclaredIncomeRequest>,
    ) -> Result<Response<income::DeclaredIncome>, Status> {
        let req = request.get_ref();
        let iin = parse_iin(&req.iin)?;
        if !ASKABLE_TAX_YEARS.contains(&req.year) {
            return Err(Status::invalid_argument(format!(
                "tax year {} is out of range: declarations exist for closed years {}-{}",
                req.year,
                ASKABLE_TAX_YEARS.start(),
                ASKABLE_TAX_YEARS.end()
            )));
        }
        let declaration = self.data.declaration(&iin, req.year).ok_or_else(|| {
            Status::not_found(format!(
                "no income declaration of IIN {iin} for tax year {}",
                req.year
            ))
        })?;
        Ok(Response::new(declaration.into()))
    }
}

/// The real-estate register (`kz.realty.v1.RealtyRegistry`).
#[derive(Debug, Clone)]
pub struct RealtyRegistry {
    data: Arc<Dataset>,
}

impl RealtyRegistry {
    /// A register answering from `data`.
    pub(crate) fn new(data: Arc<Dataset>) -> Self {
        Self { data }
    }

    /// The tonic service to add to a server.
    pub(crate) fn into_server(self) -> realty::realty_registry_server::RealtyRegistryServer<Self> {
        realty::realty_registry_server::RealtyRegistryServer::new(self)
    }
}

#[tonic::async_trait]
impl realty::realty_registry_server::RealtyRegistry for RealtyRegistry {
    /// Every property in which the person holds a share. A valid IIN with no
    /// property (or unknown to the register) gets an empty list: the register
    /// of rights knows rights, not persons.
    async fn list_properties(
        &self,
        request: Request<realty::ListPropertiesRequest>,
    ) -> Result<Response<realty::ListPropertiesResponse>, Status> {
        let iin = parse_iin(&request.get_ref().iin)?;
        let properties = self
            .data
            .holdings(&iin)
            .into_iter()
            .map(|(p, o)| property_message(p, o))
            .collect();
        Ok(Response::new(realty::ListPropertiesResponse { properties }))
    }
}
