//! Deterministic synthetic data: [`Dataset::generate`] builds families,
//! declarations and properties from a seed.
//!
//! Every random choice is drawn from a `ChaCha8Rng` stream through the small
//! [`Dice`] helper (multiply-shift on `next_u64`), not through `rand`'s
//! distributions, so the output depends only on the seed and this file: the
//! ChaCha stream is portable, and no library upgrade changes who the demo
//! citizens are.

use std::collections::HashSet;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use time::{Date, Duration, Month, macros::date};

use super::data::{
    Address, Dataset, Declaration, INCOME_YEARS, IncomeKind, IncomeSource, Ownership, Person,
    Property, PropertyKind, REFERENCE_DATE, Sex, YOUNG_CHILD_BORN_FROM,
};
use super::lexicon::{
    COMPANY_TRADES, COMPANY_WORDS, GARDEN_PARTNERSHIPS, KAZAKH_FEMALE, KAZAKH_MALE,
    KAZAKH_SURNAMES, PUBLIC_BODIES, REGIONS, RUSSIAN_FEMALE, RUSSIAN_MALE, RUSSIAN_SURNAMES,
    Region, STREETS,
};
use kopir_core::id::Iin;

/// Monthly calculation index (MCI) in tenge by year, the unit of state benefits.
fn mci(year: i32) -> i64 {
    match year {
        ..=2022 => 3_063,
        2023 => 3_450,
        2024 => 3_692,
        _ => 3_932,
    }
}

/// Random choices from a seeded ChaCha8 stream, with value-stable helpers.
struct Dice(ChaCha8Rng);

impl Dice {
    fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in `0..n` (`n > 0`); the bias of multiply-shift is below 2^-40
    /// for the sizes used here.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.0.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`; `lo` when the range is empty.
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi.abs_diff(lo) + 1) as i64
    }

    /// True with probability `p` percent.
    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// One item of a non-empty list.
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        debug_assert!(!items.is_empty());
        items[self.below(items.len() as u64) as usize]
    }

    /// One item of a non-empty list of `(item, weight)`.
    fn weighted<T: Copy>(&mut self, items: &[(T, u64)]) -> T {
        let total: u64 = items.iter().map(|(_, w)| w).sum();
        let mut roll = self.below(total.max(1));
        for &(item, weight) in items {
            if roll < weight {
                return item;
            }
            roll -= weight;
        }
        items[items.len() - 1].0
    }

    /// A date in `from..=to`; `from` when the range is empty.
    fn date(&mut self, from: Date, to: Date) -> Date {
        let day = self.between(
            i64::from(from.to_julian_day()),
            i64::from(to.to_julian_day()),
        );
        i32::try_from(day)
            .ok()
            .and_then(|d| Date::from_julian_day(d).ok())
            .unwrap_or(from)
    }
}

/// `date` moved by whole years, 28 February standing in for 29 February.
fn plus_years(date: Date, years: i32) -> Date {
    let year = date.year() + years;
    Date::from_calendar_date(year, date.month(), date.day())
        .or_else(|_| Date::from_calendar_date(year, date.month(), 28))
        .unwrap_or(date)
}

fn ymd(year: i32, month: u8, day: u8) -> Date {
    Month::try_from(month)
        .ok()
        .and_then(|m| Date::from_calendar_date(year, m, day).ok())
        .unwrap_or(REFERENCE_DATE)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ethnicity {
    Kazakh,
    Russian,
}

impl Ethnicity {
    fn surnames(self) -> &'static [&'static str] {
        match self {
            Self::Kazakh => KAZAKH_SURNAMES,
            Self::Russian => RUSSIAN_SURNAMES,
        }
    }
    fn given_names(self, sex: Sex) -> &'static [&'static str] {
        match (self, sex) {
            (Self::Kazakh, Sex::Male) => KAZAKH_MALE,
            (Self::Kazakh, Sex::Female) => KAZAKH_FEMALE,
            (Self::Russian, Sex::Male) => RUSSIAN_MALE,
            (Self::Russian, Sex::Female) => RUSSIAN_FEMALE,
        }
    }
}

/// The surname `base` (male form) in the form for `sex`: Akhmetov/Akhmetova,
/// Lebedev/Lebedeva, Nikitin/Nikitina.
fn surname_for(base: &str, sex: Sex) -> String {
    match sex {
        Sex::Male => base.to_owned(),
        Sex::Female => format!("{base}a"),
    }
}

/// A patronymic from the father's given name: Russian style (-ovich/-ovna) or
/// Kazakh style (-uly/-kyzy).
fn patronymic(father: &str, sex: Sex, kazakh_style: bool) -> String {
    let suffix = match (kazakh_style, sex) {
        (true, Sex::Male) => "uly",
        (true, Sex::Female) => "kyzy",
        (false, Sex::Male) => "ovich",
        (false, Sex::Female) => "ovna",
    };
    format!("{father}{suffix}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Parents born 1946-1968 with grown-up children.
    Elder,
    /// A couple born 1978-2003 with 0-4 children.
    Young,
    /// A mother alone, father unknown to the register.
    SingleMother,
}

/// An employer or other payer with a BIN.
#[derive(Debug, Clone)]
struct Payer {
    bin: String,
    name: String,
    /// The region of a local public body; `None` for nationwide companies.
    region: Option<&'static str>,
}

/// Rent received by an owner from a tenant, from a date on.
#[derive(Debug, Clone)]
struct Lease {
    owner: Iin,
    monthly_tenge: i64,
    from: Date,
    /// Index into the employers; `None` for a private tenant.
    tenant: Option<usize>,
}

/// The family members as generated, before they become [`Person`]s.
struct Member {
    birth: Date,
    sex: Sex,
    given: &'static str,
    surname: String,
    patronymic: String,
}

struct Synth {
    dice: Dice,
    iins: HashSet<Iin>,
    bins: HashSet<String>,
    cadastral: HashSet<String>,
    persons: Vec<Person>,
    properties: Vec<Property>,
    leases: Vec<Lease>,
    employers: Vec<Payer>,
    pension_payer: Payer,
}

impl Dataset {
    /// Generates a data set of `families` families (about 3.8 persons each)
    /// from `seed`. The same arguments always give an equal data set.
    pub fn generate(seed: u64, families: usize) -> Self {
        let mut synth = Synth::new(seed);
        synth.employers();
        for _ in 0..families {
            synth.family();
        }
        let declarations = synth.declarations();
        Dataset::from_parts(seed, synth.persons, declarations, synth.properties)
    }
}

impl Synth {
    fn new(seed: u64) -> Self {
        Self {
            dice: Dice::new(seed),
            iins: HashSet::new(),
            bins: HashSet::new(),
            cadastral: HashSet::new(),
            persons: Vec::new(),
            properties: Vec::new(),
            leases: Vec::new(),
            employers: Vec::new(),
            pension_payer: Payer {
                bin: String::new(),
                name: String::new(),
                region: None,
            },
        }
    }

    /// A fresh IIN for a birth date and sex.
    fn iin(&mut self, birth: Date, sex: Sex) -> Iin {
        loop {
            let serial = self.dice.below(10_000) as u16;
            if let Some(iin) = Iin::from_parts(
                birth.year(),
                u8::from(birth.month()),
                birth.day(),
                sex == Sex::Female,
                serial,
            ) && self.iins.insert(iin)
            {
                return iin;
            }
        }
    }

    /// A fresh BIN of a resident legal entity (head office) registered in
    /// 1995-2023: `YYMM`, `4`, `0`, five-digit serial, check digit (the IIN rule).
    fn bin(&mut self) -> String {
        loop {
            let year = self.dice.between(1995, 2023) as u8 % 100;
            let month = self.dice.between(1, 12) as u8;
            let serial = self.dice.below(100_000) as u32;
            let mut d = [
                year / 10,
                year % 10,
                month / 10,
                month % 10,
                4,
                0,
                0,
                0,
                0,
                0,
                0,
            ];
            for (i, slot) in d[6..].iter_mut().enumerate() {
                *slot = ((serial / 10u32.pow(4 - i as u32)) % 10) as u8;
            }
            let Some(check) = Iin::check_digit(&d) else {
                continue;
            };
            let bin: String = d
                .iter()
                .chain(std::iter::once(&check))
                .map(|digit| char::from(b'0' + digit))
                .collect();
            if self.bins.insert(bin.clone()) {
                return bin;
            }
        }
    }

    fn employers(&mut self) {
        let mut names = HashSet::new();
        while self.employers.len() < 60 {
            let word = self.dice.pick(COMPANY_WORDS);
            let trade = self.dice.pick(COMPANY_TRADES);
            let form = if self.dice.percent(80) { "LLP" } else { "JSC" };
            let name = format!("{word} {trade} {form}");
            if names.insert(name.clone()) {
                let bin = self.bin();
                self.employers.push(Payer {
                    bin,
                    name,
                    region: None,
                });
            }
        }
        while self.employers.len() < 120 {
            let body = self.dice.pick(PUBLIC_BODIES);
            let n = self.dice.between(1, 120);
            let region = self.region();
            let city = self.dice.pick(region.cities);
            let name = format!("{}, {city}", body.replace("{n}", &n.to_string()));
            if names.insert(name.clone()) {
                let bin = self.bin();
                self.employers.push(Payer {
                    bin,
                    name,
                    region: Some(region.name),
                });
            }
        }
        let bin = self.bin();
        self.pension_payer = Payer {
            bin,
            name: "Government for Citizens State Corporation".into(),
            region: None,
        };
    }

    /// An employer for someone living in `region`: half the time a local public
    /// body (when the region has one), otherwise any employer.
    fn employer(&mut self, region: &str) -> usize {
        let local: Vec<usize> = (0..self.employers.len())
            .filter(|&i| self.employers[i].region == Some(region))
            .collect();
        if !local.is_empty() && self.dice.percent(50) {
            self.dice.pick(&local)
        } else {
            self.dice.below(self.employers.len() as u64) as usize
        }
    }

    fn region(&mut self) -> &'static Region {
        let weights: Vec<(usize, u64)> = REGIONS.iter().map(|r| r.weight).enumerate().collect();
        let i = self.dice.weighted(&weights);
        &REGIONS[i]
    }

    /// An address in `region`, and whether it is an apartment.
    fn address(&mut self, region: &'static Region) -> Address {
        let main = region.cities.len() == 1 || self.dice.percent(60);
        let city = if main {
            region.cities[0]
        } else {
            self.dice.pick(&region.cities[1..])
        };
        let flat = self.dice.percent(if main { 80 } else { 35 });
        let mut building = self.dice.between(1, 180).to_string();
        if self.dice.percent(15) {
            building = format!("{building}/{}", self.dice.between(1, 5));
        }
        Address {
            region: region.name.into(),
            city: city.into(),
            street: self.dice.pick(STREETS).into(),
            building,
            apartment: flat.then(|| self.dice.between(1, 320).to_string()),
        }
    }

    fn cadastral_number(&mut self, region: &Region) -> String {
        loop {
            let number = format!(
                "{:02}-{:03}-{:03}-{:03}",
                region.cadastral_code,
                self.dice.between(1, 350),
                self.dice.between(1, 200),
                self.dice.between(1, 999)
            );
            if self.cadastral.insert(number.clone()) {
                return number;
            }
        }
    }

    /// Area in square metres with one decimal, in `lo..=hi` whole metres.
    fn area(&mut self, lo: i64, hi: i64) -> f64 {
        self.dice.between(lo * 10, hi * 10) as f64 / 10.0
    }

    /// Adds a person and returns their IIN.
    fn person(&mut self, m: Member, address: &Address, citizenship: &str) -> Iin {
        let iin = self.iin(m.birth, m.sex);
        self.persons.push(Person {
            iin,
            surname: m.surname,
            given_name: m.given.into(),
            patronymic: m.patronymic,
            birth_date: m.birth,
            sex: m.sex,
            citizenship: citizenship.into(),
            address: address.clone(),
            mother: None,
            father: None,
            children: Vec::new(),
        });
        iin
    }

    /// An adult of a parents' generation with an unknown (unregistered) father.
    fn adult(&mut self, ethnicity: Ethnicity, sex: Sex, surname_base: &str, birth: Date) -> Member {
        let kazakh_style = ethnicity == Ethnicity::Kazakh && self.dice.percent(40);
        let father = self.dice.pick(ethnicity.given_names(Sex::Male));
        Member {
            birth,
            sex,
            given: self.dice.pick(ethnicity.given_names(sex)),
            surname: surname_for(surname_base, sex),
            patronymic: patronymic(father, sex, kazakh_style),
        }
    }

    /// Birth dates of a family's children.
    fn child_births(&mut self, shape: Shape, mother_birth: Date) -> Vec<Date> {
        let adult_from = plus_years(mother_birth, 19);
        let count = match shape {
            Shape::Elder => self.dice.weighted(&[(1, 15), (2, 35), (3, 30), (4, 20)]),
            Shape::Young => self
                .dice
                .weighted(&[(0, 10), (1, 28), (2, 35), (3, 18), (4, 9)]),
            Shape::SingleMother => self.dice.weighted(&[(1, 55), (2, 35), (3, 10)]),
        };
        let recent = match shape {
            Shape::Elder => false,
            Shape::Young => self.dice.percent(45),
            Shape::SingleMother => self.dice.percent(50),
        };
        let mut births = Vec::new();
        if recent && count > 0 {
            // Backwards from a child born in the benefit window.
            let mut birth = self.dice.date(YOUNG_CHILD_BORN_FROM, REFERENCE_DATE);
            for _ in 0..count {
                if birth < adult_from {
                    break;
                }
                births.push(birth);
                birth -= Duration::days(self.dice.between(400, 1_900));
            }
        } else {
            let last = match shape {
                Shape::Elder => date!(2007 - 12 - 31),
                _ => REFERENCE_DATE,
            };
            let first_at = plus_years(mother_birth, self.dice.between(20, 30) as i32);
            let mut birth = first_at + Duration::days(self.dice.between(0, 364));
            for _ in 0..count {
                if birth > last {
                    break;
                }
                births.push(birth);
                birth += Duration::days(self.dice.between(400, 1_900));
            }
        }
        births
    }

    /// One family: parents, children, their home and other property.
    fn family(&mut self) {
        let region = self.region();
        let home = self.address(region);
        let ethnicity = if self.dice.percent(85) {
            Ethnicity::Kazakh
        } else {
            Ethnicity::Russian
        };
        let kazakh_style = ethnicity == Ethnicity::Kazakh && self.dice.percent(45);
        let shape = self.dice.weighted(&[
            (Shape::Elder, 18),
            (Shape::Young, 72),
            (Shape::SingleMother, 10),
        ]);
        let citizenship = if self.dice.percent(2) {
            self.dice.pick(&["RUS", "UZB", "KGZ"])
        } else {
            "KAZ"
        };

        // Parents.
        let family_surname = self.dice.pick(ethnicity.surnames());
        let (father_year, widowed) = match shape {
            Shape::Elder => (self.dice.between(1946, 1966), self.dice.percent(15)),
            _ => (self.dice.between(1978, 2001), false),
        };
        let father_birth = self.dice.date(
            ymd(father_year as i32, 1, 1),
            ymd(father_year as i32, 12, 31),
        );
        let mother_birth = match shape {
            Shape::SingleMother => self.dice.date(date!(1980 - 01 - 01), date!(2003 - 12 - 31)),
            _ => {
                let earliest = father_birth;
                let latest = (father_birth + Duration::days(6 * 365)).min(date!(2003 - 12 - 31));
                self.dice.date(earliest.min(latest), latest)
            }
        };
        let mother_surname = if shape != Shape::SingleMother && self.dice.percent(70) {
            family_surname
        } else {
            self.dice.pick(ethnicity.surnames())
        };
        let mother = self.adult(ethnicity, Sex::Female, mother_surname, mother_birth);
        let mother = self.person(mother, &home, citizenship);
        let father = match shape {
            Shape::SingleMother => None,
            _ if widowed => None,
            _ => {
                let m = self.adult(ethnicity, Sex::Male, family_surname, father_birth);
                let given = m.given;
                Some((self.person(m, &home, citizenship), given))
            }
        };
        let children_surname = if shape == Shape::SingleMother {
            mother_surname
        } else {
            family_surname
        };
        // The children's patronymic comes from the father's name, registered or not.
        let father_given = match &father {
            Some((_, given)) => *given,
            None => self.dice.pick(ethnicity.given_names(Sex::Male)),
        };

        // Children.
        let mut children = Vec::new();
        for birth in self.child_births(shape, mother_birth) {
            let sex = if self.dice.percent(51) {
                Sex::Male
            } else {
                Sex::Female
            };
            let member = Member {
                birth,
                sex,
                given: self.dice.pick(ethnicity.given_names(sex)),
                surname: surname_for(children_surname, sex),
                patronymic: patronymic(father_given, sex, kazakh_style),
            };
            // Grown-up children of elder families often live elsewhere.
            let address = if shape == Shape::Elder && self.dice.percent(55) {
                let region = if self.dice.percent(25) {
                    self.region()
                } else {
                    region
                };
                self.address(region)
            } else {
                home.clone()
            };
            let child = self.person(member, &address, "KAZ");
            if let Some(p) = self.persons.last_mut() {
                p.mother = Some(mother);
                p.father = father.as_ref().map(|(iin, _)| *iin);
            }
            children.push((child, birth, address));
        }
        let child_iins: Vec<Iin> = children.iter().map(|(c, _, _)| *c).collect();
        for parent in std::iter::once(mother).chain(father.as_ref().map(|(iin, _)| *iin)) {
            if let Some(p) = self.persons.iter_mut().rev().find(|p| p.iin == parent) {
                p.children = child_iins.clone();
            }
        }

        // Property.
        let father = father.map(|(iin, _)| iin);
        let parents: Vec<(Iin, Date)> = std::iter::once((mother, mother_birth))
            .chain(father.map(|f| (f, father_birth)))
            .collect();
        self.home(shape, region, &home, &parents, &children);
        self.extras(region, &home, &parents);
        for (child, birth, address) in &children {
            let birth = *birth;
            let own_home = *address != home;
            if own_home && plus_years(birth, 21) < REFERENCE_DATE && self.dice.percent(45) {
                let region = REGIONS
                    .iter()
                    .find(|r| r.name == address.region)
                    .unwrap_or(region);
                let kind = if address.apartment.is_some() {
                    PropertyKind::Apartment
                } else {
                    PropertyKind::House
                };
                let from = plus_years(birth, 21);
                self.property(region, kind, address.to_string(), &[(*child, from)], 1);
            }
        }
    }

    /// Adds a property owned in equal shares by `owners` (each with the
    /// earliest date they could have acquired it); the right is registered on a
    /// date after all of those.
    fn property(
        &mut self,
        region: &Region,
        kind: PropertyKind,
        address: String,
        owners: &[(Iin, Date)],
        shares: u32,
    ) -> Date {
        let from = owners
            .iter()
            .map(|(_, d)| *d)
            .max()
            .unwrap_or(REFERENCE_DATE)
            .max(date!(1993 - 01 - 01));
        let acquired_on = self.dice.date(from.min(REFERENCE_DATE), REFERENCE_DATE);
        self.property_on(region, kind, address, owners, shares, acquired_on);
        acquired_on
    }

    /// Adds a property owned in equal shares by `owners` since `acquired_on`.
    fn property_on(
        &mut self,
        region: &Region,
        kind: PropertyKind,
        address: String,
        owners: &[(Iin, Date)],
        shares: u32,
        acquired_on: Date,
    ) {
        let (lo, hi) = match kind {
            PropertyKind::Apartment => (32, 140),
            PropertyKind::House => (70, 260),
            PropertyKind::Land => (400, 1_500),
            PropertyKind::Garage => (16, 32),
            PropertyKind::Commercial => (40, 320),
        };
        let area_m2 = self.area(lo, hi);
        let cadastral_number = self.cadastral_number(region);
        self.properties.push(Property {
            cadastral_number,
            kind,
            address,
            area_m2,
            owners: owners
                .iter()
                .map(|(owner, _)| Ownership {
                    owner: *owner,
                    share_numerator: 1,
                    share_denominator: shares,
                    acquired_on,
                })
                .collect(),
        });
    }

    /// The family home (and the land under a house).
    fn home(
        &mut self,
        shape: Shape,
        region: &'static Region,
        home: &Address,
        parents: &[(Iin, Date)],
        children: &[(Iin, Date, Address)],
    ) {
        let owns = self.dice.percent(match shape {
            Shape::Elder => 85,
            Shape::Young => 65,
            Shape::SingleMother => 45,
        });
        if !owns {
            return;
        }
        let adult = |(iin, birth): &(Iin, Date)| (*iin, plus_years(*birth, 20));
        let mut owners: Vec<(Iin, Date)> = if parents.len() == 2 && self.dice.percent(60) {
            parents.iter().map(adult).collect()
        } else {
            vec![adult(
                &parents[self.dice.below(parents.len() as u64) as usize],
            )]
        };
        // A 1990s privatisation: every member of the household got an equal share.
        if shape == Shape::Elder && self.dice.percent(30) {
            owners = parents.iter().map(adult).collect();
            owners.extend(
                children
                    .iter()
                    .filter(|(_, birth, _)| *birth < date!(1999 - 01 - 01))
                    .map(|(child, birth, _)| (*child, *birth)),
            );
        }
        let shares = owners.len() as u32;
        let kind = if home.apartment.is_some() {
            PropertyKind::Apartment
        } else {
            PropertyKind::House
        };
        let acquired_on = self.property(region, kind, home.to_string(), &owners, shares);
        if kind == PropertyKind::House && self.dice.percent(60) {
            let address = home.to_string();
            self.property_on(
                region,
                PropertyKind::Land,
                address,
                &owners,
                shares,
                acquired_on,
            );
        }
    }

    /// A garage, a garden plot, a second apartment let to tenants, commercial
    /// premises: each for some families, owned by one parent.
    fn extras(&mut self, region: &'static Region, home: &Address, parents: &[(Iin, Date)]) {
        let owner = |synth: &mut Synth| {
            let (iin, birth) = parents[synth.dice.below(parents.len() as u64) as usize];
            (iin, plus_years(birth, 22))
        };
        if self.dice.percent(15) {
            let o = owner(self);
            let address = format!(
                "{}, {}, garage cooperative No. {}, box {}",
                home.region,
                home.city,
                self.dice.between(1, 90),
                self.dice.between(1, 400)
            );
            self.property(region, PropertyKind::Garage, address, &[o], 1);
        }
        if self.dice.percent(12) {
            let o = owner(self);
            let address = format!(
                "{}, {} district, gardening partnership \"{}\", plot {}",
                home.region,
                home.city,
                self.dice.pick(GARDEN_PARTNERSHIPS),
                self.dice.between(1, 600)
            );
            self.property(region, PropertyKind::Land, address, &[o], 1);
        }
        if self.dice.percent(10) {
            let o = owner(self);
            let mut address = self.address(region);
            address.apartment = Some(self.dice.between(1, 320).to_string());
            let acquired = self.property(
                region,
                PropertyKind::Apartment,
                address.to_string(),
                &[o],
                1,
            );
            if self.dice.percent(55) {
                let from = acquired + Duration::days(self.dice.between(30, 200));
                let monthly_tenge = self.dice.between(120, 350) * 1_000;
                self.leases.push(Lease {
                    owner: o.0,
                    monthly_tenge,
                    from,
                    tenant: None,
                });
            }
        }
        if self.dice.percent(4) {
            let o = owner(self);
            let address = self.address(region);
            let acquired = self.property(
                region,
                PropertyKind::Commercial,
                address.to_string(),
                &[o],
                1,
            );
            if self.dice.percent(60) {
                let from = acquired + Duration::days(self.dice.between(30, 200));
                let tenant = self.dice.below(self.employers.len() as u64) as usize;
                let monthly_tenge = self.dice.between(250, 1_500) * 1_000;
                self.leases.push(Lease {
                    owner: o.0,
                    monthly_tenge,
                    from,
                    tenant: Some(tenant),
                });
            }
        }
    }

    /// Declarations for every adult and every year in [`INCOME_YEARS`].
    fn declarations(&mut self) -> Vec<Declaration> {
        let births: std::collections::HashMap<Iin, Date> =
            self.persons.iter().map(|p| (p.iin, p.birth_date)).collect();
        let persons = std::mem::take(&mut self.persons);
        let mut out = Vec::new();
        for person in &persons {
            let child_births: Vec<Date> = if person.sex == Sex::Female {
                person
                    .children
                    .iter()
                    .filter_map(|c| births.get(c).copied())
                    .collect()
            } else {
                Vec::new()
            };
            self.person_declarations(person, &child_births, &mut out);
        }
        self.persons = persons;
        out
    }

    fn person_declarations(
        &mut self,
        person: &Person,
        child_births: &[Date],
        out: &mut Vec<Declaration>,
    ) {
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Work {
            Employee,
            Entrepreneur,
            Both,
            Idle,
        }
        let age_end_2025 = person.age_on(date!(2025 - 12 - 31));
        if age_end_2025 < 18 {
            return;
        }
        let mut work = self.dice.weighted(&[
            (Work::Employee, 68),
            (Work::Entrepreneur, 9),
            (Work::Both, 5),
            (Work::Idle, 18),
        ]);
        if age_end_2025 < 23 && self.dice.percent(60) {
            work = Work::Idle; // a student
        }
        let works_in_retirement = self.dice.percent(20);
        let files_nil = self.dice.percent(65);
        let monthly_base: i64 =
            120_000 + 35_000 * (0..4).map(|_| self.dice.below(6) as i64).sum::<i64>();
        let business_base: i64 = self.dice.between(1_500, 30_000) * 1_000;
        let pension_monthly: i64 = self.dice.between(85, 210) * 1_000;
        let region = person.address.region.as_str();
        let mut employer = self.employer(region);
        let second_job = self.dice.percent(8).then(|| self.employer(region));
        let retirement_age = match person.sex {
            Sex::Male => 63,
            Sex::Female => 61,
        };

        for year in INCOME_YEARS {
            let year_end = ymd(year, 12, 31);
            let age = person.age_on(year_end);
            if age < 18 {
                continue;
            }
            if self.dice.percent(10) {
                employer = self.employer(region);
            }
            let late = self.dice.percent(4);
            // Nine per cent a year, compounded from 2022.
            let growth =
                |amount: i64| (0..year - *INCOME_YEARS.start()).fold(amount, |a, _| a * 109 / 100);
            let mut sources = Vec::new();
            let retired = age >= retirement_age;
            if retired {
                let months = if age == retirement_age {
                    12 - i64::from(u8::from(person.birth_date.month()))
                } else {
                    12
                };
                if months > 0 {
                    sources.push(IncomeSource {
                        payer_bin: self.pension_payer.bin.clone(),
                        payer_name: self.pension_payer.name.clone(),
                        kind: IncomeKind::Pension,
                        amount_tiyn: growth(pension_monthly) * months * 100,
                    });
                }
            }
            let births_this_year = child_births.iter().filter(|b| b.year() == year).count() as i64;
            let working = !retired || works_in_retirement;
            if working && matches!(work, Work::Employee | Work::Both) {
                let leave = if births_this_year > 0 {
                    self.dice.between(3, 6)
                } else {
                    0
                };
                let months = 12 - leave;
                let second = second_job.filter(|&j| j != employer);
                for job in std::iter::once(employer).chain(second) {
                    let monthly = if job == employer {
                        monthly_base
                    } else {
                        monthly_base / 3
                    };
                    let payer = &self.employers[job];
                    sources.push(IncomeSource {
                        payer_bin: payer.bin.clone(),
                        payer_name: payer.name.clone(),
                        kind: IncomeKind::Salary,
                        amount_tiyn: growth(monthly) * months * 100 + self.dice.below(100) as i64,
                    });
                }
            }
            if working && matches!(work, Work::Entrepreneur | Work::Both) {
                let initial = person.given_name.chars().next().unwrap_or('X');
                let amount = growth(business_base) * self.dice.between(70, 130) / 100;
                sources.push(IncomeSource {
                    payer_bin: person.iin.to_string(),
                    payer_name: format!("IE {} {initial}.", person.surname),
                    kind: IncomeKind::Entrepreneurship,
                    amount_tiyn: amount * 100 + self.dice.below(100) as i64,
                });
            }
            if births_this_year > 0 {
                // One-off child-birth benefit: 38 MCI for a 1st-3rd child, 63 from the 4th.
                let order = child_births.iter().filter(|b| b.year() <= year).count();
                let mci_count = if order >= 4 { 63 } else { 38 };
                sources.push(IncomeSource {
                    payer_bin: String::new(),
                    payer_name: "State benefit for the birth of a child".into(),
                    kind: IncomeKind::Benefit,
                    amount_tiyn: mci(year) * mci_count * births_this_year * 100,
                });
            }
            for lease in self.leases.iter().filter(|l| l.owner == person.iin) {
                if lease.from > year_end {
                    continue;
                }
                let months = if lease.from.year() == year {
                    12 - i64::from(u8::from(lease.from.month()))
                } else {
                    12
                };
                if months == 0 {
                    continue;
                }
                let (payer_bin, payer_name) = match lease.tenant.and_then(|t| self.employers.get(t))
                {
                    Some(p) => (p.bin.clone(), p.name.clone()),
                    None => (String::new(), "Private tenant".to_owned()),
                };
                sources.push(IncomeSource {
                    payer_bin,
                    payer_name,
                    kind: IncomeKind::Rent,
                    amount_tiyn: growth(lease.monthly_tenge) * months * 100,
                });
            }
            if late || (sources.is_empty() && !files_nil) {
                continue;
            }
            let filed_on = self.dice.date(
                ymd(year + 1, 2, 1),
                ymd(year + 1, 9, 15).min(REFERENCE_DATE),
            );
            out.push(Declaration::new(person.iin, year, sources, filed_on));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_lists_fit_the_grammar() {
        for s in KAZAKH_SURNAMES.iter().chain(RUSSIAN_SURNAMES) {
            assert!(
                s.ends_with("ov") || s.ends_with("ev") || s.ends_with("in"),
                "{s}"
            );
        }
        for m in KAZAKH_MALE.iter().chain(RUSSIAN_MALE) {
            let last = m.chars().last().unwrap_or('a');
            assert!(!"aeiouy".contains(last), "{m}");
        }
        assert_eq!(patronymic("Nurlan", Sex::Female, true), "Nurlankyzy");
        assert_eq!(patronymic("Nurlan", Sex::Male, false), "Nurlanovich");
        assert_eq!(surname_for("Lebedev", Sex::Female), "Lebedeva");
    }

    #[test]
    fn dice_stays_in_range() {
        let mut dice = Dice::new(7);
        for _ in 0..10_000 {
            let v = dice.between(-3, 3);
            assert!((-3..=3).contains(&v));
            let d = dice.date(date!(2024 - 02 - 28), date!(2024 - 03 - 01));
            assert!(d >= date!(2024 - 02 - 28) && d <= date!(2024 - 03 - 01));
        }
        assert_eq!(dice.between(5, 5), 5);
        assert_eq!(dice.between(5, 1), 5);
    }

    #[test]
    fn bins_have_a_valid_check_digit() {
        let mut synth = Synth::new(11);
        for _ in 0..200 {
            let bin = synth.bin();
            assert_eq!(bin.len(), 12);
            let d: Vec<u8> = bin.bytes().map(|b| b - b'0').collect();
            let first11: [u8; 11] = d[..11].try_into().unwrap();
            assert_eq!(Iin::check_digit(&first11), Some(d[11]), "{bin}");
        }
    }
}
