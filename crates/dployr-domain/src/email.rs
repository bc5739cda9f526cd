//! `Email`: an e-mail address as the data layer stores it, so that one
//! person is one address: `A@x.io` and `a@x.io`, `café@x.io` spelt with a
//! precomposed or a combining accent, `user@bücher.de` and
//! `user@xn--bcher-kva.de`, `dot@x.io.` and `dot@x.io` are each one user,
//! and an address with invisible characters (`admin\u{200b}@x.io`) or a
//! bidi override is refused rather than stored as a look-alike. It is
//! checked once at the edge (sign-in, invitations, one-time codes) instead
//! of in every store. The rule and its reasons are in `docs/EMAIL.md`.

use std::fmt;
use std::str::FromStr;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};
use serde::{Deserialize, Deserializer, Serialize};

use crate::StoreError;
use crate::text::{DOTTED_TWICE, dots_a_dotted_letter, identifier_refuses, is_mark, nfc, nfkc_stable};

/// The most bytes an address may have (RFC 5321's path limit).
pub const MAX_EMAIL_BYTES: usize = 254;

/// The most bytes of the part before the `@` (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART_BYTES: usize = 64;

/// ASCII characters a local part may hold besides letters and digits: RFC
/// 5322's `atext` and the dot of a dot-atom. Quoted local parts
/// (`"john doe"@x.io`) are not accepted.
const LOCAL_PART_ASCII_SYMBOLS: &str = "!#$%&'*+-/=?^_`{|}~.";

/// A normalised e-mail address: the identity of a user.
///
/// The rule, applied by [`Email::parse`] in this order:
///
/// 1. Surrounding whitespace is trimmed; the text is brought to Unicode NFC;
///    the local part is then lower-cased and brought to NFC again
///    (lower-casing can undo it), while the domain is left to IDNA (rule 4),
///    which case-maps it itself (a capital sigma is `σ` there, never the
///    final `ς` that `to_lowercase` would make of one ending a word). NFC
///    makes canonically equivalent spellings one address (`é` precomposed
///    or as `e` + U+0301; the Kelvin sign U+212A is `K`), which is what RFC
///    6532 asks of senders. NFKC is *not* applied: it would merge addresses
///    that mail servers deliver to different mailboxes (`ﬁx` and `fix`), so
///    one person could sign in as another; instead a local part that NFKC
///    would change (full-width letters, ligatures, superscripts) is refused.
/// 2. No whitespace, control, format (`Cf`: zero-width characters, bidi
///    overrides and isolates, byte-order mark), other default-ignorable or
///    blank-rendering (U+2800 braille blank, ...) character anywhere: they
///    make an address look like another one.
/// 3. Exactly one `@`. The local part: 1 to 64 bytes, a dot-atom (no dot
///    first, last or twice in a row; ASCII limited to letters, digits and
///    `!#$%&'*+-/=?^_`{|}~`), not starting with a combining mark.
///    `+tags` are kept: providers differ on what they mean.
/// 4. The domain: one trailing dot (the DNS root) is removed; it is mapped
///    by IDNA (UTS 46, non-transitional, STD3 rules) to its ASCII form, so
///    `bücher.de` is stored as `xn--bcher-kva.de`; it must then be a host
///    name of at least two labels, each 1 to 63 bytes, letters, digits and
///    inner hyphens, the last not all digits (no IP addresses).
/// 5. At most 254 bytes in all.
///
/// The stored form is a fixed point: parsing it again gives it back.
///
/// ```
/// use dployr_domain::Email;
/// let email = Email::parse("  Ada@Example.IO ").unwrap();
/// assert_eq!(email.as_str(), "ada@example.io");
/// assert_eq!(email.local_part(), "ada");
/// assert_eq!(Email::parse("user@Bücher.de.").unwrap().as_str(), "user@xn--bcher-kva.de");
/// assert_eq!(Email::parse("cafe\u{301}@x.io").unwrap(), Email::parse("caf\u{e9}@x.io").unwrap());
/// assert!(Email::parse("admin\u{200b}@x.io").is_err());
/// assert!(Email::parse("no-at-sign").is_err());
/// assert!(Email::parse("a@b@c.io").is_err());
/// assert!(Email::parse("a@b").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Email(String);

impl Email {
    /// Normalises and checks `text` (see [`Email`] for the rule).
    ///
    /// # Errors
    /// [`StoreError::Invalid`] (field `email`) saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let invalid = |reason: &'static str| StoreError::invalid("email", reason);
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(invalid("is empty"));
        }
        // Bound the work before normalising: nothing this long can pass.
        if trimmed.len() > 4 * MAX_EMAIL_BYTES {
            return Err(invalid("is longer than 254 bytes"));
        }
        let normal = nfc(trimmed);
        if let Some(reason) = normal.chars().find_map(identifier_refuses) {
            return Err(invalid(reason));
        }
        let Some((local, domain)) = normal.split_once('@') else {
            return Err(invalid("has no @"));
        };
        if domain.contains('@') {
            return Err(invalid("has more than one @"));
        }
        // Only the local part is lower-cased here. The domain is case-mapped
        // by UTS 46 in `ascii_domain`, which maps a capital sigma to `σ`
        // everywhere; `to_lowercase` would first make one that ends a word
        // `ς`, which UTS 46 keeps: another label, so one domain spelt in
        // capitals and in small letters would be two users and the wrong host.
        // `İ` lower-cases to `i` + U+0307 by Unicode's default mapping,
        // which keeps its dot as a mark: a look-alike of `i` (refused by
        // `check_local_part`) and no mailbox anyone meant. It is Turkish
        // capital i (`ilker` auto-capitalised on a Turkish keyboard), whose
        // Turkish lower case is `i`: read as that.
        let local = nfc(&local.replace('\u{130}', "i").to_lowercase()).into_owned();
        check_local_part(&local)?;
        let domain = ascii_domain(domain)?;
        let email = format!("{local}@{domain}");
        if email.len() > MAX_EMAIL_BYTES {
            return Err(invalid("is longer than 254 bytes"));
        }
        Ok(Self(email))
    }

    /// An address read back from the database, which only stores addresses
    /// normalised when they were written. It is not checked again: an
    /// address stored under an older rule must still be readable (a member
    /// listing must not fail because of one old row), even if it could not
    /// be signed in with today.
    pub fn from_stored(stored: String) -> Self {
        Self(stored)
    }

    /// Deserializes an address a store returned, as [`Email::from_stored`]
    /// reads it, for `#[serde(deserialize_with = ...)]` on the records
    /// stores return: a [`crate::User`] or [`crate::Member`] with an
    /// address stored under an older rule serializes, so it must
    /// deserialize back. [`Email`]'s own `Deserialize`, for addresses that
    /// come in, checks today's rule.
    ///
    /// # Errors
    /// The deserializer's, when the value is not a string.
    pub fn deserialize_stored<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Self::from_stored)
    }

    /// Refuses an address that [`Email::parse`] would not give back as it
    /// is: one made by [`Email::from_stored`] (or deserialized as a stored
    /// record) skipped today's rule, and a write must not store it (a
    /// second account beside the normalised one, an address nobody can
    /// sign in with). Writes check every address they take.
    ///
    /// ```
    /// use dployr_domain::Email;
    /// assert!(Email::parse("Ada@Example.io").unwrap().check().is_ok());
    /// assert!(Email::from_stored("ada@example.io".into()).check().is_ok());
    /// assert!(Email::from_stored("Ada@example.io".into()).check().is_err());
    /// assert!(Email::from_stored("ad\u{200b}a@example.io".into()).check().is_err());
    /// ```
    ///
    /// # Errors
    /// [`StoreError::Invalid`] on field `email`.
    pub fn check(&self) -> Result<(), StoreError> {
        match Self::parse(&self.0) {
            Ok(parsed) if parsed == *self => Ok(()),
            Ok(parsed) => Err(StoreError::invalid(
                "email",
                format!("is not in its normal form ({parsed}): an address made without Email::parse"),
            )),
            Err(refused) => Err(refused),
        }
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the `@`: the default name of a user and of their cluster.
    pub fn local_part(&self) -> &str {
        self.0.split_once('@').map_or(self.0.as_str(), |(local, _)| local)
    }

    /// The domain, in its ASCII (IDNA) form.
    pub fn domain(&self) -> &str {
        self.0.split_once('@').map_or("", |(_, domain)| domain)
    }
}

fn check_local_part(local: &str) -> Result<(), StoreError> {
    let invalid = |reason: &'static str| StoreError::invalid("email", reason);
    if local.is_empty() {
        return Err(invalid("needs text before the @"));
    }
    if local.len() > MAX_LOCAL_PART_BYTES {
        return Err(invalid("has more than 64 bytes before the @"));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(invalid("has a dot first, last or twice in a row before the @"));
    }
    if local.chars().any(|c| c.is_ascii() && !c.is_ascii_alphanumeric() && !LOCAL_PART_ASCII_SYMBOLS.contains(c)) {
        return Err(invalid("has a character before the @ that needs quoting"));
    }
    if local.starts_with(is_mark) {
        return Err(invalid("starts with a combining mark"));
    }
    if !nfkc_stable(local) {
        return Err(invalid("has a compatibility character (full-width letter, ligature, ...) before the @"));
    }
    if dots_a_dotted_letter(local) {
        return Err(invalid(DOTTED_TWICE));
    }
    Ok(())
}

/// The domain in its ASCII form, checked as a host name.
fn ascii_domain(domain: &str) -> Result<String, StoreError> {
    let invalid = |reason: &'static str| StoreError::invalid("email", reason);
    // The root's dot, in any of the four forms UTS 46 maps to `.`.
    let domain = domain.strip_suffix(['.', '\u{3002}', '\u{ff0e}', '\u{ff61}']).unwrap_or(domain);
    if domain.is_empty() {
        return Err(invalid("needs a domain after the @"));
    }
    // UTS 46 with STD3 rules (letters, digits, hyphens) and DNS lengths, and
    // hyphens refused first and last in a label only: `domain_to_ascii_strict`
    // also refuses them third and fourth, which host names in use have
    // (`r3---sn-abc.googlevideo.com`) and the host-name rules allow; a
    // Punycode label (`xn--`) is checked as such either way.
    let ascii = Uts46::new()
        .to_ascii(domain.as_bytes(), AsciiDenyList::STD3, Hyphens::CheckFirstLast, DnsLength::Verify)
        .map_err(|_| invalid("has a domain that is not a valid host name"))?
        .into_owned();
    let labels: Vec<&str> = ascii.split('.').collect();
    if labels.len() < 2 {
        return Err(invalid("has a domain of one label; a host name needs at least two"));
    }
    if labels.iter().any(|label| label.is_empty() || label.len() > 63) {
        return Err(invalid("has a domain label that is empty or longer than 63 bytes"));
    }
    // A last label of digits, or `0x` and hex digits, makes the whole host
    // an IPv4 address to `inet_aton` and to URL parsers (WHATWG's "ends in
    // a number"): `a@127.0.0.0x1` and `a@1.0x7f` are loopback addresses.
    let numeric = |label: &str| {
        label.bytes().all(|b| b.is_ascii_digit())
            || label.strip_prefix("0x").is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    if labels.last().is_some_and(|tld| numeric(tld)) {
        return Err(invalid("has an IP address or a numeric top-level domain"));
    }
    Ok(ascii)
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({})", self.0)
    }
}

impl FromStr for Email {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        Self::parse(text)
    }
}

impl AsRef<str> for Email {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Email {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<String> {
        Email::parse(text).ok().map(|email| email.as_str().to_owned())
    }

    /// Each row: spellings that must be one user, and the stored form.
    #[test]
    fn spellings_of_one_address_are_one_user() {
        let cases: &[(&[&str], &str)] = &[
            (&["A@x.io", "a@x.io", " a@X.IO\t"], "a@x.io"),
            (&["caf\u{e9}@x.io", "cafe\u{301}@x.io", "CAF\u{c9}@x.io"], "caf\u{e9}@x.io"),
            (&["user@b\u{fc}cher.de", "user@xn--bcher-kva.de", "user@B\u{dc}CHER.DE"], "user@xn--bcher-kva.de"),
            (&["dot@x.io.", "dot@x.io", "dot@x.io\u{3002}", "dot@x\u{3002}io\u{ff0e}"], "dot@x.io"),
            // Hyphens third and fourth in a label: host names in use.
            (&["a@ab--cd.example.com", "a@AB--CD.example.com"], "a@ab--cd.example.com"),
            (&["v@r3---sn-abc.googlevideo.com"], "v@r3---sn-abc.googlevideo.com"),
            (&["\u{212a}im@x.io", "kim@x.io", "Kim@x.io"], "kim@x.io"),
            (&["user@\u{ff58}.io"], "user@x.io"),
            // Turkish capital i is read as Turkish lower case: `i`.
            (&["ADM\u{130}N@x.io", "admin@x.io"], "admin@x.io"),
            (&["\u{130}lker@x.io", "ilker@x.io", "ILKER@x.io"], "ilker@x.io"),
            // Lithuanian keeps the dot of an i under an accent: both show.
            (&["ki\u{307}\u{301}tas@x.lt"], "ki\u{307}\u{301}tas@x.lt"),
        ];
        for (spellings, stored) in cases {
            for spelling in *spellings {
                assert_eq!(parse(spelling).as_deref(), Some(*stored), "{spelling:?}");
            }
        }
    }

    #[test]
    fn plus_tags_stay_distinct_users() {
        assert_ne!(parse("ada+work@x.io"), parse("ada@x.io"));
        assert_eq!(parse("ada+work@x.io").as_deref(), Some("ada+work@x.io"));
    }

    #[test]
    fn invisible_degenerate_and_oversized_addresses_are_refused() {
        let long_label = "l".repeat(64);
        let cases = [
            "admin\u{200b}@x.io".to_owned(),
            "\u{202e}nimda@x.io".to_owned(),
            "ad\u{feff}min@x.io".to_owned(),
            "admin@x\u{200d}.io".to_owned(),
            format!("{}@x.io", "a".repeat(65)),
            format!("a@{long_label}.io"),
            "a@b".to_owned(),
            ".@.".to_owned(),
            "do..uble@x.io".to_owned(),
            ".dot@x.io".to_owned(),
            "dot.@x.io".to_owned(),
            "dot@x.io..".to_owned(),
            "a@127.0.0.1".to_owned(),
            "a@[127.0.0.1]".to_owned(),
            "\"john doe\"@x.io".to_owned(),
            "\u{301}@x.io".to_owned(),
            "\u{fb01}x@x.io".to_owned(),
            "admi\u{307}n@x.io".to_owned(),
            "adm\u{131}\u{307}n@x.io".to_owned(),
            "a@127.0.0.0x1".to_owned(),
            "a@1.0x7f".to_owned(),
            "a@x.0x".to_owned(),
            "a@0x7f.0X1".to_owned(),
            "a@-x.io".to_owned(),
            "a@x-.io".to_owned(),
            "a@x.io-".to_owned(),
            "a@xn--a.io".to_owned(),
            "a@x.io\u{3002}\u{3002}".to_owned(),
            "a@x_y.io".to_owned(),
            "a@@x.io".to_owned(),
            // Unassigned: no character yet, so its case and normal form
            // could change with a later Unicode, and one address with them.
            "\u{50000}@x.io".to_owned(),
            "a\u{0378}b@x.io".to_owned(),
        ];
        for case in &cases {
            assert_eq!(parse(case), None, "{case:?} was accepted");
        }
    }

    #[test]
    fn blank_rendering_characters_in_the_local_part_are_refused_as_invisible() {
        use crate::text::tests::{blank_rendering_characters, invalid_reason};
        let invisible_reasons =
            [invalid_reason(Email::parse("admin\u{200b}@x.io")), invalid_reason(Email::parse("admin\u{34f}@x.io"))];
        for blank in blank_rendering_characters() {
            for address in [format!("admin{blank}@x.io"), format!("ad{blank}min@x.io")] {
                assert!(invisible_reasons.contains(&invalid_reason(Email::parse(&address))), "{address:?}");
            }
        }
    }

    #[test]
    fn limits_hold_exactly_at_their_boundary() {
        assert!(parse(&format!("{}@x.io", "a".repeat(64))).is_some());
        assert!(parse(&format!("a@{}.io", "l".repeat(63))).is_some());
        let label = "l".repeat(63);
        // 1 + 1 + 63*3 + 3 dots + 57 + ... = a domain of 252 bytes: a@ + 252 = 254.
        let domain = format!("{label}.{label}.{label}.{}", "m".repeat(252 - 3 * 64));
        assert_eq!(domain.len(), 252);
        assert!(parse(&format!("a@{domain}")).is_some());
        assert!(parse(&format!("ab@{domain}")).is_none());
    }

    /// Lower-casing is Unicode's, with its one rule of context: a capital
    /// sigma that ends a word becomes the final form. So an address typed in
    /// capitals is the one written in small letters with its final sigma,
    /// as ICU, Java and Python lower-case it; `ασ@` (a medial sigma at the
    /// end) stays apart, as mail systems that lower-case the same way keep
    /// it (docs/EMAIL.md, rule 1).
    #[test]
    fn a_capital_sigma_that_ends_the_local_part_is_the_final_sigma() {
        assert_eq!(parse("\u{391}\u{3a3}@x.gr").as_deref(), Some("\u{3b1}\u{3c2}@x.gr"));
        assert_eq!(parse("\u{391}\u{3c2}@x.gr"), parse("\u{3b1}\u{3c2}@x.gr"));
        assert_eq!(parse("\u{391}\u{3a3}\u{391}@x.gr").as_deref(), Some("\u{3b1}\u{3c3}\u{3b1}@x.gr"));
        assert_ne!(parse("\u{3b1}\u{3c3}@x.gr"), parse("\u{3b1}\u{3c2}@x.gr"));
    }

    /// The domain is case-mapped by UTS 46 alone, which maps a capital
    /// sigma to the medial `σ` wherever it stands; Rust's `to_lowercase`
    /// would make one that ends a word (before a hyphen, a digit or the end)
    /// the final `ς`, a different label and a different domain.
    #[test]
    fn a_capital_sigma_in_the_domain_is_mapped_as_uts_46_maps_it() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "a@\u{392}\u{38c}\u{39b}\u{39f}\u{3a3}-X.COM",
                    "a@\u{3b2}\u{3cc}\u{3bb}\u{3bf}\u{3c3}-x.com",
                    "a@xn---x-e9b0buy4d.com",
                ],
                "a@xn---x-e9b0buy4d.com",
            ),
            (&["a@\u{39f}\u{394}\u{39f}\u{3a3}.GR", "a@\u{3bf}\u{3b4}\u{3bf}\u{3c3}.gr"], "a@xn--pxavbq.gr"),
            (
                &[
                    "a@x.\u{39f}\u{394}\u{39f}\u{3a3}",
                    "a@x.\u{39f}\u{394}\u{39f}\u{3a3}.",
                    "a@x.\u{3bf}\u{3b4}\u{3bf}\u{3c3}",
                ],
                "a@x.xn--pxavbq",
            ),
        ];
        for (spellings, stored) in cases {
            for spelling in *spellings {
                assert_eq!(parse(spelling).as_deref(), Some(*stored), "{spelling:?}");
            }
        }
        // A final sigma typed as one is its own label under UTS 46: another domain.
        assert_eq!(parse("a@x.\u{3bf}\u{3b4}\u{3bf}\u{3c2}").as_deref(), Some("a@x.xn--pxavbm"));
    }

    /// Normalising can shrink an address up to fourfold (a mathematical
    /// bold letter, 4 bytes, is `x` in a domain), so the bound on what is
    /// read before normalising is four times 254 bytes: what normalises to
    /// 254 bytes passes however long it was typed (here 1012 bytes), and
    /// what is longer than that bound is refused as too long before
    /// anything else is looked at.
    #[test]
    fn the_length_bound_before_normalising_is_four_times_the_stored_limit() {
        let label = |letters: usize| "\u{1d431}".repeat(letters);
        let dot = "\u{ff0e}";
        let typed = format!("\u{212a}@{}{dot}{}{dot}{}{dot}{}{dot}", label(63), label(63), label(63), label(60));
        assert_eq!(typed.len(), 1012);
        let stored = parse(&typed).unwrap_or_else(|| panic!("{typed:?} was refused"));
        assert_eq!(stored.len(), MAX_EMAIL_BYTES);
        assert!(stored.starts_with("k@xxx"), "{stored}");

        let too_long = format!("{}@x.io", "a".repeat(4 * MAX_EMAIL_BYTES + 1 - "@x.io".len()));
        assert_eq!(too_long.len(), 4 * MAX_EMAIL_BYTES + 1);
        let refused = crate::text::tests::invalid_reason(Email::parse(&too_long));
        assert_eq!(refused, ("email", "is longer than 254 bytes".to_owned()));
    }

    #[test]
    fn local_part_and_domain_are_the_two_sides_of_the_stored_form() {
        let email = Email::parse("Ada.L@B\u{fc}cher.DE").unwrap();
        assert_eq!((email.local_part(), email.domain()), ("ada.l", "xn--bcher-kva.de"));
        let without_at = Email::from_stored("no-at-sign".to_owned());
        assert_eq!((without_at.local_part(), without_at.domain()), ("no-at-sign", ""));
    }

    #[test]
    fn display_and_as_ref_give_the_stored_form() {
        let email = Email::parse(" Ada@X.io ").unwrap();
        assert_eq!(email.to_string(), "ada@x.io");
        assert_eq!(AsRef::<str>::as_ref(&email), "ada@x.io");
        assert!(format!("{email:?}").contains("ada@x.io"), "{email:?}");
    }

    #[test]
    fn the_stored_form_parses_to_itself() {
        for spelling in
            ["caf\u{e9}@x.io", "user@b\u{fc}cher.de", "Ab+c@Sub.Example.COM.", "\u{3b1}\u{3c3}@x.gr", "a@ab--cd.x.io"]
        {
            let once = parse(spelling).unwrap();
            assert_eq!(parse(&once), Some(once.clone()));
        }
    }
}
