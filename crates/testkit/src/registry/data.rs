//! The mock registries' data model and its queries: persons and their family
//! links, income declarations and real property, held in memory and indexed by
//! IIN. The data is made by [`Dataset::generate`] (see `synth`); this module only
//! stores and answers.

use std::{collections::BTreeMap, fmt, ops::RangeInclusive};

use time::{Date, macros::date};

use kopir_core::id::Iin;

/// The registers' "today": no one is born, files a declaration or acquires a
/// property after this date. Fixed, so that the data never depends on the clock.
pub const REFERENCE_DATE: Date = date!(2026 - 11 - 01);

/// Tax years for which the income register holds declarations.
pub const INCOME_YEARS: RangeInclusive<i32> = 2022..=2025;

/// The last closed tax year: the "previous year" a benefit application asks about.
pub const LAST_TAX_YEAR: i32 = *INCOME_YEARS.end();

/// Tax years that may be asked about at all. Outside this range a request is
/// malformed (`INVALID_ARGUMENT`); inside it a missing declaration is `NOT_FOUND`.
pub const ASKABLE_TAX_YEARS: RangeInclusive<i32> = 1995..=LAST_TAX_YEAR;

/// A child born on or after this date is a "young child" (one for whom a
/// child-birth benefit may still be claimed).
pub const YOUNG_CHILD_BORN_FROM: Date = date!(2023 - 01 - 01);

/// The seed of the demo data set.
pub const DEFAULT_SEED: u64 = 2026;

/// The number of families in the demo data set (about 5,000 persons).
pub const DEFAULT_FAMILIES: usize = 1_375;

/// Sex as recorded in the population register (and encoded in the IIN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sex {
    /// Male.
    Male,
    /// Female.
    Female,
}

/// A registered address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Region or city of republican significance, e.g. "Karaganda Region".
    pub region: String,
    /// City, town or village.
    pub city: String,
    /// Street with its kind, e.g. "Abai avenue".
    pub street: String,
    /// Building number, e.g. "12" or "45/2".
    pub building: String,
    /// Apartment number, for apartment buildings.
    pub apartment: Option<String>,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, {}, {} {}",
            self.region, self.city, self.street, self.building
        )?;
        if let Some(apartment) = &self.apartment {
            write!(f, ", apt. {apartment}")?;
        }
        Ok(())
    }
}

/// One person of the population register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    /// Individual identification number; its date and sex match the fields below.
    pub iin: Iin,
    /// Surname, in the form for the person's sex ("Akhmetov" / "Akhmetova").
    pub surname: String,
    /// Given name.
    pub given_name: String,
    /// Patronymic ("Nurlanovich", "Nurlanovna", "Nurlanuly", "Nurlankyzy").
    pub patronymic: String,
    /// Date of birth.
    pub birth_date: Date,
    /// Sex as recorded in the register.
    pub sex: Sex,
    /// ISO 3166-1 alpha-3 citizenship, almost always "KAZ".
    pub citizenship: String,
    /// Registered (permanent) address.
    pub address: Address,
    /// Mother, when known to the register.
    pub mother: Option<Iin>,
    /// Father, when known to the register.
    pub father: Option<Iin>,
    /// Children registered to this person, youngest first.
    pub children: Vec<Iin>,
}

impl Person {
    /// Age in whole years on `on`.
    pub(crate) fn age_on(&self, on: Date) -> i32 {
        let had_birthday = (u8::from(on.month()), on.day())
            >= (u8::from(self.birth_date.month()), self.birth_date.day());
        on.year() - self.birth_date.year() - i32::from(!had_birthday)
    }
}

/// What kind of income a source paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IncomeKind {
    /// Wages from an employer.
    Salary,
    /// Income of an individual entrepreneur (paid "by" the person's own IIN).
    Entrepreneurship,
    /// Rent of property.
    Rent,
    /// State pension.
    Pension,
    /// State benefit (e.g. the one-off child-birth benefit); no payer BIN.
    Benefit,
}

/// One line of a declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomeSource {
    /// The payer's 12-digit BIN (an entrepreneur's own IIN); empty when the payer
    /// has none (state benefits, private tenants).
    pub payer_bin: String,
    /// The payer's name.
    pub payer_name: String,
    /// Kind of income.
    pub kind: IncomeKind,
    /// Amount in tiyn (1/100 tenge).
    pub amount_tiyn: i64,
}

/// A person's income declaration for one tax year.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    /// The declarant.
    pub iin: Iin,
    /// Tax year.
    pub year: i32,
    /// Income lines; empty for a nil declaration.
    pub sources: Vec<IncomeSource>,
    /// Sum of the sources' amounts, in tiyn.
    pub total_tiyn: i64,
    /// Date of filing.
    pub filed_on: Date,
}

impl Declaration {
    /// A declaration whose total is the sum of `sources`.
    pub(crate) fn new(iin: Iin, year: i32, sources: Vec<IncomeSource>, filed_on: Date) -> Self {
        let total_tiyn = sources.iter().map(|s| s.amount_tiyn).sum();
        Self {
            iin,
            year,
            sources,
            total_tiyn,
            filed_on,
        }
    }
}

/// Kind of real property.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyKind {
    /// Apartment.
    Apartment,
    /// Individual house.
    House,
    /// Land plot.
    Land,
    /// Garage.
    Garage,
    /// Commercial premises.
    Commercial,
}

/// A right of one person to a share of a property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The owner.
    pub owner: Iin,
    /// Share numerator.
    pub share_numerator: u32,
    /// Share denominator.
    pub share_denominator: u32,
    /// Date on which the right was registered.
    pub acquired_on: Date,
}

/// One real property and its owners (shares sum to one).
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// Cadastral number, `RR-DDD-QQQ-PPP`, unique in the data set.
    pub cadastral_number: String,
    /// What kind of property it is.
    pub kind: PropertyKind,
    /// Address as one line.
    pub address: String,
    /// Area in square metres (one decimal).
    pub area_m2: f64,
    /// Owners and their shares.
    pub owners: Vec<Ownership>,
}

/// The whole synthetic data set behind the three mock registries.
///
/// Built once (see [`Dataset::generate`]) and then shared read-only, typically as
/// an `Arc<Dataset>`. Two data sets generated with the same seed and size are
/// equal.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    seed: u64,
    persons: Vec<Person>,
    by_iin: BTreeMap<Iin, usize>,
    declarations: BTreeMap<(Iin, i32), Declaration>,
    properties: Vec<Property>,
    holdings: BTreeMap<Iin, Vec<usize>>,
}

impl Dataset {
    /// Assembles a data set and its indexes; sorts each person's children
    /// youngest first.
    pub(crate) fn from_parts(
        seed: u64,
        mut persons: Vec<Person>,
        declarations: Vec<Declaration>,
        properties: Vec<Property>,
    ) -> Self {
        let by_iin: BTreeMap<Iin, usize> = persons
            .iter()
            .enumerate()
            .map(|(i, p)| (p.iin, i))
            .collect();
        let births: BTreeMap<Iin, Date> = persons.iter().map(|p| (p.iin, p.birth_date)).collect();
        for person in &mut persons {
            // Youngest first; the IIN breaks ties between twins.
            person
                .children
                .sort_by_key(|c| (std::cmp::Reverse(births.get(c).copied()), *c));
        }
        let declarations = declarations
            .into_iter()
            .map(|d| ((d.iin, d.year), d))
            .collect();
        let mut holdings: BTreeMap<Iin, Vec<usize>> = BTreeMap::new();
        for (i, property) in properties.iter().enumerate() {
            for owner in &property.owners {
                holdings.entry(owner.owner).or_default().push(i);
            }
        }
        Self {
            seed,
            persons,
            by_iin,
            declarations,
            properties,
            holdings,
        }
    }

    /// The demo data set: [`DEFAULT_SEED`] and [`DEFAULT_FAMILIES`].
    pub(crate) fn demo() -> Self {
        Self::generate(DEFAULT_SEED, DEFAULT_FAMILIES)
    }

    /// The seed this data set was generated from.
    #[cfg(test)]
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// Every person, in generation order (family by family).
    pub fn persons(&self) -> &[Person] {
        &self.persons
    }

    /// One person by IIN.
    pub(crate) fn person(&self, iin: &Iin) -> Option<&Person> {
        self.by_iin.get(iin).and_then(|&i| self.persons.get(i))
    }

    /// The children of a person, youngest first; `None` if the person is unknown.
    pub(crate) fn children(&self, iin: &Iin) -> Option<Vec<&Person>> {
        let parent = self.person(iin)?;
        Some(
            parent
                .children
                .iter()
                .filter_map(|c| self.person(c))
                .collect(),
        )
    }

    /// The declaration of a person for a tax year.
    pub(crate) fn declaration(&self, iin: &Iin, year: i32) -> Option<&Declaration> {
        self.declarations.get(&(*iin, year))
    }

    /// Every declaration, ordered by IIN then year.
    #[cfg(test)]
    pub(crate) fn declarations(&self) -> impl Iterator<Item = &Declaration> {
        self.declarations.values()
    }

    /// Every property.
    #[cfg(test)]
    pub(crate) fn properties(&self) -> &[Property] {
        &self.properties
    }

    /// The properties in which a person holds a share, with that share; empty if
    /// none (or if the person is unknown).
    pub(crate) fn holdings(&self, iin: &Iin) -> Vec<(&Property, &Ownership)> {
        let Some(indexes) = self.holdings.get(iin) else {
            return Vec::new();
        };
        indexes
            .iter()
            .filter_map(|&i| self.properties.get(i))
            .filter_map(|p| p.owners.iter().find(|o| o.owner == *iin).map(|o| (p, o)))
            .collect()
    }

    /// True if `iin` suits the child-birth-benefit demo: a parent with a child
    /// born on or after [`YOUNG_CHILD_BORN_FROM`], a declaration with non-zero
    /// income for [`LAST_TAX_YEAR`], and at least one property.
    pub(crate) fn is_demo_parent(&self, iin: &Iin) -> bool {
        let Some(children) = self.children(iin) else {
            return false;
        };
        let young_child = children
            .iter()
            .any(|c| c.birth_date >= YOUNG_CHILD_BORN_FROM);
        let income = self
            .declaration(iin, LAST_TAX_YEAR)
            .is_some_and(|d| d.total_tiyn > 0);
        young_child && income && !self.holdings(iin).is_empty()
    }

    /// Up to `n` parents for the demo (see [`Dataset::is_demo_parent`]), at most
    /// one per family, in a fixed order: the same data set always gives the same
    /// list, and a longer list starts with the shorter one.
    pub fn sample_parents(&self, n: usize) -> Vec<Iin> {
        let mut taken_children = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for person in &self.persons {
            if out.len() >= n {
                break;
            }
            let Some(youngest) = person.children.first() else {
                continue;
            };
            if taken_children.contains(youngest) || !self.is_demo_parent(&person.iin) {
                continue;
            }
            taken_children.extend(person.children.iter().copied());
            out.push(person.iin);
        }
        out
    }
}
