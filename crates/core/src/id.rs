//! Identifiers of the federation: members, subsystems (services and clients),
//! security servers, purposes, request ids and data subjects.
//!
//! Every identifier is parsed once, at the edge, into a typed value; the rest of
//! the code never sees an unchecked string. Identifier parts are
//! `[A-Za-z0-9._-]{1,64}` (design.md); a bad id is `INVALID_ARGUMENT` with the
//! reason `metadata.invalid`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an identifier was refused; the message names the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id does not have the expected number of `/`-separated parts.
    #[error("{kind} {text:?} must have the form {form}")]
    Shape {
        /// What was being parsed ("member id", "subsystem id"...).
        kind: &'static str,
        /// The offending input (cut to a readable length).
        text: String,
        /// The expected form.
        form: &'static str,
    },
    /// One part has a character outside `[A-Za-z0-9._-]`, is empty or too long.
    #[error("{kind} {text:?}: part {part:?} must be 1-64 characters of A-Z a-z 0-9 . _ -")]
    Part {
        /// What was being parsed.
        kind: &'static str,
        /// The offending input.
        text: String,
        /// The bad part.
        part: String,
    },
    /// A subject is not `scheme:value` or its scheme is unknown.
    #[error("subject {0:?} must be scheme:value with a known scheme (iin)")]
    SubjectScheme(String),
    /// An IIN is not 12 digits, has an impossible date or a wrong check digit.
    #[error("IIN {iin:?} is not valid: {why}")]
    Iin {
        /// The offending IIN.
        iin: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

const PART_MAX: usize = 64;

fn shown(text: &str) -> String {
    text.chars().take(80).collect()
}

fn check_part(kind: &'static str, text: &str, part: &str) -> Result<(), IdError> {
    let ok = !part.is_empty()
        && part.len() <= PART_MAX
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(IdError::Part {
            kind,
            text: shown(text),
            part: shown(part),
        })
    }
}

fn split_parts<'a, const N: usize>(
    kind: &'static str,
    form: &'static str,
    text: &'a str,
) -> Result<[&'a str; N], IdError> {
    let shape = || IdError::Shape {
        kind,
        text: shown(text),
        form,
    };
    let parts: Vec<&str> = text.split('/').collect();
    let parts: [&str; N] = parts.try_into().map_err(|_| shape())?;
    for part in parts {
        check_part(kind, text, part)?;
    }
    Ok(parts)
}

/// Implements `Display`, `FromStr` and string (de)serialisation for an id type
/// whose canonical text is produced by `Display`.
macro_rules! string_id {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A member (an organisation): `INSTANCE/CLASS/CODE`, e.g. `KZ/GOV/MOJ`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberId {
    /// The federation instance, e.g. `KZ`.
    pub instance: String,
    /// The member class, e.g. `GOV`.
    pub class: String,
    /// The member code, e.g. `MOJ`.
    pub code: String,
}

impl FromStr for MemberId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        let [instance, class, code] = split_parts::<3>("member id", "INSTANCE/CLASS/CODE", text)?;
        Ok(Self {
            instance: instance.into(),
            class: class.into(),
            code: code.into(),
        })
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.instance, self.class, self.code)
    }
}
string_id!(MemberId);

/// Something a member owns and names with one more part: a subsystem
/// (`KZ/GOV/MOJ/population`) or a security server (`KZ/GOV/MOJ/ss1`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberPart {
    /// The owning member.
    pub member: MemberId,
    /// The last part: subsystem or server code.
    pub code: String,
}

impl MemberPart {
    fn parse(kind: &'static str, text: &str) -> Result<Self, IdError> {
        let [instance, class, member, code] =
            split_parts::<4>(kind, "INSTANCE/CLASS/CODE/NAME", text)?;
        Ok(Self {
            member: MemberId {
                instance: instance.into(),
                class: class.into(),
                code: member.into(),
            },
            code: code.into(),
        })
    }
}

impl fmt::Display for MemberPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.member, self.code)
    }
}

/// An information system of a member, `INSTANCE/CLASS/CODE/SUBSYSTEM`. As a
/// client it calls services; as a service it is what `kopir-service` names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubsystemId(pub MemberPart);

impl SubsystemId {
    /// The member that owns this subsystem.
    pub fn member(&self) -> &MemberId {
        &self.0.member
    }
    /// The subsystem code (last part).
    pub fn code(&self) -> &str {
        &self.0.code
    }
}

impl FromStr for SubsystemId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        MemberPart::parse("subsystem id", text).map(Self)
    }
}

impl fmt::Display for SubsystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
string_id!(SubsystemId);

/// A security server of a member, `INSTANCE/CLASS/CODE/SERVER`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub MemberPart);

impl ServerId {
    /// The member that runs this server.
    pub fn member(&self) -> &MemberId {
        &self.0.member
    }
}

impl FromStr for ServerId {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        MemberPart::parse("server id", text).map(Self)
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
string_id!(ServerId);

/// A single-part code: a purpose code or a request id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Code(String);

impl Code {
    /// Parses one identifier part, naming `kind` in the error.
    pub fn parse(kind: &'static str, text: &str) -> Result<Self, IdError> {
        check_part(kind, text, text)?;
        Ok(Self(text.to_owned()))
    }
    /// The code as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Code {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        Self::parse("code", text)
    }
}
string_id!(Code);

/// A data subject, `scheme:value`. Only `iin:` (Kazakhstan's individual
/// identification number, checksum included) is known today.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    /// A natural person by IIN.
    Iin(Iin),
}

impl FromStr for Subject {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        match text.split_once(':') {
            Some(("iin", value)) => value.parse().map(Subject::Iin),
            _ => Err(IdError::SubjectScheme(shown(text))),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Iin(iin) => write!(f, "iin:{iin}"),
        }
    }
}
string_id!(Subject);

/// A valid 12-digit IIN: `YYMMDD`, a century-and-sex digit, a 4-digit serial
/// and a check digit computed with the two-pass mod-11 rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Iin([u8; 12]);

const IIN_WEIGHTS_1: [u32; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
const IIN_WEIGHTS_2: [u32; 11] = [3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2];

impl Iin {
    /// The check digit for the first eleven digits, or `None` when both passes
    /// give 10 (such numbers are never issued).
    pub fn check_digit(first11: &[u8; 11]) -> Option<u8> {
        let pass = |weights: &[u32; 11]| {
            first11
                .iter()
                .zip(weights)
                .map(|(d, w)| u32::from(*d) * w)
                .sum::<u32>()
                % 11
        };
        match pass(&IIN_WEIGHTS_1) {
            10 => match pass(&IIN_WEIGHTS_2) {
                10 => None,
                d => Some(d as u8),
            },
            d => Some(d as u8),
        }
    }

    /// Builds an IIN from birth date, sex and serial, computing its check digit.
    /// `None` if the date is impossible or the serial has no valid check digit.
    pub fn from_parts(year: i32, month: u8, day: u8, female: bool, serial: u16) -> Option<Self> {
        let century = match year {
            1800..=1899 => 1,
            1900..=1999 => 3,
            2000..=2099 => 5,
            _ => return None,
        } + u8::from(female);
        if serial > 9999 || !date_ok(year, month, day) {
            return None;
        }
        let yy = (year % 100) as u8;
        let mut d = [0u8; 12];
        d[..6].copy_from_slice(&[yy / 10, yy % 10, month / 10, month % 10, day / 10, day % 10]);
        d[6] = century;
        for (i, slot) in d[7..11].iter_mut().enumerate() {
            *slot = ((serial / 10u16.pow(3 - i as u32)) % 10) as u8;
        }
        let first11: [u8; 11] = d[..11].try_into().ok()?;
        d[11] = Self::check_digit(&first11)?;
        Some(Self(d))
    }

    /// Year, month and day of birth encoded in the IIN.
    pub fn birth_date(&self) -> (i32, u8, u8) {
        let d = &self.0;
        let base = match d[6] {
            1 | 2 => 1800,
            3 | 4 => 1900,
            _ => 2000,
        };
        (
            base + i32::from(d[0] * 10 + d[1]),
            d[2] * 10 + d[3],
            d[4] * 10 + d[5],
        )
    }

    /// True if the century-and-sex digit marks a woman.
    pub fn is_female(&self) -> bool {
        self.0[6].is_multiple_of(2)
    }
}

fn date_ok(year: i32, month: u8, day: u8) -> bool {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day)
}

impl FromStr for Iin {
    type Err = IdError;
    fn from_str(text: &str) -> Result<Self, IdError> {
        let bad = |why| IdError::Iin {
            iin: shown(text),
            why,
        };
        let bytes = text.as_bytes();
        if bytes.len() != 12 || !bytes.iter().all(u8::is_ascii_digit) {
            return Err(bad("it must be exactly 12 digits"));
        }
        let mut d = [0u8; 12];
        for (slot, b) in d.iter_mut().zip(bytes) {
            *slot = b - b'0';
        }
        if !(1..=6).contains(&d[6]) {
            return Err(bad("the 7th digit (century and sex) must be 1-6"));
        }
        let iin = Self(d);
        let (y, m, day) = iin.birth_date();
        if !date_ok(y, m, day) {
            return Err(bad("the first six digits are not a date of birth YYMMDD"));
        }
        let first11: [u8; 11] = d[..11].try_into().map_err(|_| bad("internal"))?;
        if Self::check_digit(&first11) != Some(d[11]) {
            return Err(bad("the check digit does not match"));
        }
        Ok(iin)
    }
}

impl fmt::Display for Iin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.0 {
            write!(f, "{d}")?;
        }
        Ok(())
    }
}
string_id!(Iin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_and_subsystem_round_trip() {
        let m: MemberId = "KZ/GOV/MOJ".parse().unwrap();
        assert_eq!(m.to_string(), "KZ/GOV/MOJ");
        let s: SubsystemId = "KZ/GOV/MOJ/population".parse().unwrap();
        assert_eq!(s.member(), &m);
        assert_eq!(s.code(), "population");
    }

    #[test]
    fn bad_ids_are_refused_with_the_part_named() {
        for bad in [
            "KZ/GOV",
            "KZ/GOV/MOJ/x/y",
            "KZ//MOJ/x",
            "KZ/GOV/M J/x",
            "KZ/GOV/MOJ/ä",
        ] {
            assert!(bad.parse::<SubsystemId>().is_err(), "{bad} accepted");
        }
        let long = format!("KZ/GOV/{}", "a".repeat(65));
        let err = long.parse::<MemberId>().unwrap_err();
        assert!(matches!(err, IdError::Part { .. }), "{err}");
    }

    #[test]
    fn iin_checksum_first_pass() {
        // 9*1+0+0+1*4+0+1*6+3*7+0+0+1*10+2*11 = 72; 72 mod 11 = 6
        assert!("900101300126".parse::<Iin>().is_ok());
        let err = "900101300123".parse::<Iin>().unwrap_err();
        assert!(err.to_string().contains("check digit"), "{err}");
    }

    #[test]
    fn iin_checksum_second_pass_and_generation() {
        // Every generated IIN parses back, whichever pass produced its check digit.
        let mut second_pass = 0;
        for serial in 0..200u16 {
            if let Some(iin) = Iin::from_parts(1987, 6, 15, serial % 2 == 0, serial) {
                let text = iin.to_string();
                assert_eq!(text.parse::<Iin>().unwrap(), iin);
                let first11: [u8; 11] = iin.0[..11].try_into().unwrap();
                let p1: u32 = first11
                    .iter()
                    .zip(IIN_WEIGHTS_1)
                    .map(|(d, w)| u32::from(*d) * w)
                    .sum();
                if p1 % 11 == 10 {
                    second_pass += 1;
                }
                assert_eq!(iin.birth_date(), (1987, 6, 15));
                assert_eq!(iin.is_female(), serial % 2 == 0);
            }
        }
        assert!(second_pass > 0, "no serial exercised the second pass");
    }

    #[test]
    fn iin_rejects_impossible_dates_and_shapes() {
        for bad in [
            "90010130012",
            "9001013001234",
            "90010130012a",
            "901301300126",
            "900230300120",
            "900101700126",
        ] {
            assert!(bad.parse::<Iin>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn subject_schemes() {
        assert!("iin:900101300126".parse::<Subject>().is_ok());
        assert!("bin:900101300126".parse::<Subject>().is_err());
        assert!("900101300126".parse::<Subject>().is_err());
    }
}
