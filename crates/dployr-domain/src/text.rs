//! The rules for free text (names, tags, addresses, nonces), in one place,
//! and the validated types that carry them ([`Tag`], [`Address`], [`Nonce`],
//! [`ClusterName`], [`DisplayName`]), so a store takes a value that was
//! checked once at the edge and cannot forget to check it.
//!
//! Two kinds of text, two rules:
//!
//! - **Identifiers** (tags, addresses, nonces) are compared byte for byte and
//!   looked up: they are brought to Unicode NFC and trimmed, and refused when
//!   empty, too long, holding whitespace, a control or format character
//!   (zero-width space, byte-order mark, bidi overrides: `Cc`, `Cf`), any other
//!   default-ignorable code point, a character that renders blank (U+2800
//!   braille blank, U+1D159 null notehead), an unassigned one (`Cn`: its
//!   normal form could change with a later Unicode), or starting with a
//!   combining mark. Two spellings that NFC makes one (`é` composed or
//!   not) are then the same bytes, and nothing invisible tells two values
//!   apart. **Look-alikes are not refused**: what is left is compared byte
//!   for byte, so compatibility characters (`ﬁles` and `files`, `web-Ⅸ`
//!   and `web-IX`, full-width letters, `µ` and `μ`), a dot above an `i`
//!   that shows one already (`i` + U+0307), and case (`HOST.example:22`
//!   and `host.example:22`: an address may be a URL, whose path is
//!   case-sensitive) make distinct values. Refusing compatibility
//!   characters, as e-mail local parts do, would also refuse everyday
//!   words (Thai `น้ำ`, Armenian `և`, `1º`, `№5`) and make tags stored before
//!   unreachable by their tag; a control plane that shows tags side by side
//!   should bring them to one form it chooses (lower case, NFKC) before it
//!   creates them.
//! - **Display text** (user and cluster names) is shown to people: brought to
//!   NFC and trimmed, it must hold at least one visible character (not one
//!   of the invisible or blank-rendering characters above), and is refused
//!   with a control character, a line or paragraph separator, or a format
//!   character other than the zero-width (non-)joiner (U+200C/U+200D, which
//!   Persian, Indic scripts and emoji sequences need). Bidi overrides
//!   and isolates are format characters: refused, so a name cannot reorder
//!   the text around it.
//!
//! The Unicode data (general categories, default-ignorable code points, NFC)
//! comes from ICU4X (`icu_properties`, `icu_normalizer`), the crates `idna`
//! uses too, so every rule of the data layer reads one Unicode version.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use icu_normalizer::ComposingNormalizerBorrowed;
use icu_properties::props::{DefaultIgnorableCodePoint, GeneralCategory, SoftDotted};
use icu_properties::{CodePointMapData, CodePointSetData};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{MAX_ADDRESS_BYTES, MAX_CLUSTER_NAME_BYTES, MAX_TAG_BYTES, MAX_USER_TEXT_BYTES, StoreError};

/// Whether an empty (or all-whitespace) value is acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blank {
    /// Refuse it.
    Refused,
    /// Accept it.
    Allowed,
}

/// Checks a free-text value that is stored as given (a picture URL, a
/// GitHub login id): at most `max_bytes` bytes, no NUL or other control
/// character, and not blank ([`is_blank`]) unless allowed.
///
/// ```
/// use dployr_domain::text::{check, Blank};
/// assert!(check("picture", "https://x.io/a.png", 255, Blank::Refused).is_ok());
/// assert!(check("picture", "  ", 255, Blank::Refused).is_err());
/// assert!(check("picture", "a\u{0}b", 255, Blank::Refused).is_err());
/// ```
///
/// # Errors
/// [`StoreError::Invalid`] naming `field`.
pub fn check(field: &'static str, value: &str, max_bytes: usize, blank: Blank) -> Result<(), StoreError> {
    if blank == Blank::Refused && is_blank(value) {
        return Err(StoreError::invalid(field, "is empty"));
    }
    if value.len() > max_bytes {
        return Err(StoreError::invalid(field, format!("is longer than {max_bytes} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(StoreError::invalid(field, "contains a control character"));
    }
    Ok(())
}

/// Whether `value` shows nothing: empty, or only whitespace, marks and
/// invisible or blank-rendering characters (zero-width space U+200B, the
/// byte-order mark, braille blank U+2800, Hangul filler U+3164, ...). Such a
/// value is as blank as an empty one: a picture of it is none.
///
/// ```
/// use dployr_domain::text::is_blank;
/// assert!(is_blank(" \u{200b}\u{feff} ") && is_blank("\u{2800}") && is_blank(""));
/// assert!(!is_blank("https://x.io/a.png"));
/// ```
pub fn is_blank(value: &str) -> bool {
    !value.chars().any(is_visible)
}

/// The Unicode general category of `c`.
pub(crate) fn category(c: char) -> GeneralCategory {
    CodePointMapData::<GeneralCategory>::new().get(c)
}

/// Whether `c` is a default-ignorable code point: rendered as nothing when
/// not supported (zero-width space, joiners, variation selectors, the
/// Hangul filler, ...).
pub(crate) fn is_default_ignorable(c: char) -> bool {
    CodePointSetData::new::<DefaultIgnorableCodePoint>().contains(c)
}

/// Whether `text` (in NFC) ends a letter's marks with U+0307 COMBINING DOT
/// ABOVE on a letter that shows a dot already (`Soft_Dotted`: `i`, `j`,
/// `ị`, Cyrillic `і`, ...), whose own dot it then replaces, or on a
/// dotless `ı` or `ȷ`: either way it looks like the plain letter, and no
/// normal form folds it into one (`İ` lower-cases to `i` + U+0307, so
/// `ADMİN` would be a second "admin"). Marks before the dot (a dot below)
/// count as part of the letter; a mark above after it is Lithuanian
/// spelling (`i̇́`: the dot kept under an accent), which shows both.
pub(crate) fn dots_a_dotted_letter(text: &str) -> bool {
    let soft_dotted = CodePointSetData::new::<SoftDotted>();
    let mut letter = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{307}' {
            let last_of_its_marks = !chars.peek().is_some_and(|&next| is_mark(next));
            if last_of_its_marks && letter.is_some_and(|base| base == 'ı' || base == 'ȷ' || soft_dotted.contains(base))
            {
                return true;
            }
        } else if !is_mark(c) {
            letter = Some(c);
        }
    }
    false
}

/// What an e-mail's local part is told when it dots a dotted letter
/// ([`dots_a_dotted_letter`]).
pub(crate) const DOTTED_TWICE: &str = "has a dot above an i or j that has one already, or above a dotless ı or ȷ (U+0307), before the @: it looks \
     like the plain letter, a second spelling of one address";

/// Whether NFKC leaves `text` as it is: no full-width letter, ligature,
/// superscript, Roman numeral, micro sign, ... that looks like (or is
/// read as) another character another value holds.
pub(crate) fn nfkc_stable(text: &str) -> bool {
    ComposingNormalizerBorrowed::new_nfkc().is_normalized(text)
}

/// `text` in Unicode Normalization Form C.
pub(crate) fn nfc(text: &str) -> Cow<'_, str> {
    ComposingNormalizerBorrowed::new_nfc().normalize(text)
}

/// Whether `c` is a combining mark (`Mn`, `Mc`, `Me`): it attaches to the
/// character before it, so it must not start a value.
pub(crate) fn is_mark(c: char) -> bool {
    matches!(
        category(c),
        GeneralCategory::NonspacingMark | GeneralCategory::SpacingMark | GeneralCategory::EnclosingMark
    )
}

/// Characters that render as blank space yet are neither whitespace, nor
/// format characters, nor default-ignorable, so no property check catches
/// them: U+2800 BRAILLE PATTERN BLANK and U+1D159 MUSICAL SYMBOL NULL
/// NOTEHEAD (both `So`). No Unicode property says "renders blank", so they
/// are listed. The other usual blanks are default-ignorable and refused as
/// such: the Hangul fillers U+115F, U+1160, U+3164 and U+FFA0 (letters),
/// and the musical formatting controls U+1D173..U+1D17A (format characters).
const RENDERS_BLANK: [char; 2] = ['\u{2800}', '\u{1d159}'];

/// Whether `c` is one of [`RENDERS_BLANK`].
fn renders_blank(c: char) -> bool {
    RENDERS_BLANK.contains(&c)
}

/// Why `c` may not appear in an identifier (or an e-mail address), if it may not.
pub(crate) fn identifier_refuses(c: char) -> Option<&'static str> {
    if c.is_whitespace() {
        return Some("contains whitespace");
    }
    match category(c) {
        GeneralCategory::Control => Some("contains a control character"),
        GeneralCategory::Format => Some("contains an invisible format character (zero-width, bidi or the like)"),
        GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => Some("contains a line separator"),
        // Its case and normal form are those of no character yet, and may
        // change with a later Unicode: one value could become two.
        GeneralCategory::Unassigned => Some("contains an unassigned code point"),
        _ if is_default_ignorable(c) || renders_blank(c) => Some("contains an invisible character"),
        _ => None,
    }
}

/// Why `c` may not appear in display text, if it may not.
fn display_refuses(c: char) -> Option<&'static str> {
    match category(c) {
        GeneralCategory::Control => Some("contains a control character (line breaks and tabs included)"),
        GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator => Some("contains a line separator"),
        GeneralCategory::Format if c != '\u{200c}' && c != '\u{200d}' => {
            Some("contains an invisible format character (zero-width, bidi or the like)")
        }
        _ => None,
    }
}

/// Whether `c` shows something: not whitespace, not a mark, not a control,
/// format, separator, default-ignorable or blank-rendering code point.
fn is_visible(c: char) -> bool {
    !c.is_whitespace()
        && !is_mark(c)
        && !is_default_ignorable(c)
        && !renders_blank(c)
        && !matches!(
            category(c),
            GeneralCategory::Control
                | GeneralCategory::Format
                | GeneralCategory::SpaceSeparator
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
                | GeneralCategory::Unassigned
        )
}

/// Normalises and checks an identifier; see the module documentation.
fn identifier(field: &'static str, raw: &str, max_bytes: usize) -> Result<String, StoreError> {
    let normal = nfc(raw);
    let value = normal.trim();
    if value.is_empty() {
        return Err(StoreError::invalid(field, "is empty"));
    }
    if value.len() > max_bytes {
        return Err(StoreError::invalid(field, format!("is longer than {max_bytes} bytes")));
    }
    if let Some(reason) = value.chars().find_map(identifier_refuses) {
        return Err(StoreError::invalid(field, reason));
    }
    if value.starts_with(is_mark) {
        return Err(StoreError::invalid(field, "starts with a combining mark"));
    }
    Ok(value.to_owned())
}

/// Normalises and checks display text; see the module documentation.
fn display(field: &'static str, raw: &str, max_bytes: usize) -> Result<String, StoreError> {
    let normal = nfc(raw);
    let value = normal.trim();
    if let Some(reason) = value.chars().find_map(display_refuses) {
        return Err(StoreError::invalid(field, reason));
    }
    if !value.chars().any(is_visible) {
        return Err(StoreError::invalid(field, "has no visible character"));
    }
    if value.starts_with(is_mark) {
        return Err(StoreError::invalid(field, "starts with a combining mark"));
    }
    if value.len() > max_bytes {
        return Err(StoreError::invalid(field, format!("is longer than {max_bytes} bytes")));
    }
    Ok(value.to_owned())
}

macro_rules! validated_text {
    // `secret`: a value that grants something (a bootstrap token's nonce):
    // its `Debug` says only that it is there, so that a `{:?}` in a log does
    // not hand it out (`Display` and `as_str` still give it).
    (@debug $self:ident, $f:ident, $name:ident) => {
        write!($f, concat!(stringify!($name), "({:?})"), $self.0)
    };
    (@debug $self:ident, $f:ident, $name:ident, secret) => {
        $f.write_str(concat!(stringify!($name), "(<redacted>)"))
    };
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $rule:ident $(, $secret:ident)?) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The most bytes a value may have, once normalised.
            pub const MAX_BYTES: usize = $max;

            /// Normalises (NFC, trimmed) and checks `text`.
            ///
            /// # Errors
            #[doc = concat!("[`StoreError::Invalid`] (field `", $field, "`) saying what is wrong.")]
            pub fn parse(text: &str) -> Result<Self, StoreError> {
                $rule($field, text, $max).map(Self)
            }

            /// The value.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The value, consuming it.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                validated_text!(@debug self, f, $name $(, $secret)?)
            }
        }

        impl FromStr for $name {
            type Err = StoreError;

            fn from_str(text: &str) -> Result<Self, StoreError> {
                Self::parse(text)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = StoreError;

            fn try_from(text: &str) -> Result<Self, StoreError> {
                Self::parse(text)
            }
        }

        impl TryFrom<String> for $name {
            type Error = StoreError;

            fn try_from(text: String) -> Result<Self, StoreError> {
                Self::parse(&text)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_text! {
    /// An instance's tag: its short, unique name. An identifier (see the
    /// [module documentation](self)): NFC, trimmed, at most 255 bytes, no
    /// whitespace or invisible character.
    ///
    /// ```
    /// use dployr_domain::Tag;
    /// assert_eq!(Tag::parse(" web-1 ")?.as_str(), "web-1");
    /// assert!(Tag::parse("web 1").is_err());
    /// assert!(Tag::parse("web\u{200b}1").is_err()); // zero-width space
    /// assert!(Tag::parse("\u{301}").is_err()); // a lone combining accent
    /// # Ok::<(), dployr_domain::StoreError>(())
    /// ```
    Tag, "tag", MAX_TAG_BYTES, identifier
}

validated_text! {
    /// Where an instance is reached (a host name, an IP address and port, a
    /// URL); unique. An identifier (see the [module documentation](self)):
    /// NFC, trimmed, at most 1024 bytes, no whitespace or invisible character.
    ///
    /// ```
    /// use dployr_domain::Address;
    /// assert_eq!(Address::parse("10.0.0.1:22\n")?.as_str(), "10.0.0.1:22");
    /// assert!(Address::parse("\u{feff}").is_err());
    /// # Ok::<(), dployr_domain::StoreError>(())
    /// ```
    Address, "address", MAX_ADDRESS_BYTES, identifier
}

validated_text! {
    /// The nonce of a bootstrap token: an identifier (see the [module
    /// documentation](self)): NFC, trimmed, at most 255 bytes, no whitespace
    /// or invisible character. A nonce that breaks the rule cannot have been
    /// issued, so lookups refuse it too. It lets an instance bootstrap, so
    /// its `Debug` hides it.
    ///
    /// ```
    /// use dployr_domain::Nonce;
    /// assert!(Nonce::parse("8f2c1e").is_ok());
    /// assert!(Nonce::parse("8f2c\u{0}1e").is_err());
    /// assert_eq!(format!("{:?}", Nonce::parse("8f2c1e")?), "Nonce(<redacted>)");
    /// # Ok::<(), dployr_domain::StoreError>(())
    /// ```
    Nonce, "nonce", MAX_TAG_BYTES, identifier, secret
}

validated_text! {
    /// A user's display name: display text (see the [module
    /// documentation](self)): NFC, trimmed, at most 1024 bytes, at least one
    /// visible character, no control, line-separator or bidi character.
    ///
    /// ```
    /// use dployr_domain::DisplayName;
    /// assert_eq!(DisplayName::parse("  Ada Lovelace ")?.as_str(), "Ada Lovelace");
    /// assert!(DisplayName::parse("\u{200b}").is_err()); // nothing visible
    /// assert!(DisplayName::parse("\u{202e}nimda").is_err()); // right-to-left override
    /// assert!(DisplayName::parse("Ada\nLovelace").is_err());
    /// # Ok::<(), dployr_domain::StoreError>(())
    /// ```
    DisplayName, "name", MAX_USER_TEXT_BYTES, display
}

validated_text! {
    /// A cluster's name: display text (see the [module documentation](self)):
    /// NFC, trimmed, at most 1024 bytes, at least one visible character, no
    /// control, line-separator or bidi character.
    ///
    /// ```
    /// use dployr_domain::ClusterName;
    /// assert_eq!(ClusterName::parse("Acme 🚀")?.as_str(), "Acme 🚀");
    /// assert!(ClusterName::parse(" \u{301} ").is_err());
    /// # Ok::<(), dployr_domain::StoreError>(())
    /// ```
    ClusterName, "name", MAX_CLUSTER_NAME_BYTES, display
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Letters and symbols that render as blank space (Hangul fillers,
    /// braille blank, a null notehead): not whitespace, not format characters.
    pub(crate) fn blank_letters_and_symbols() -> Vec<char> {
        vec!['\u{2800}', '\u{3164}', '\u{ffa0}', '\u{115f}', '\u{1160}', '\u{1d159}']
    }

    /// The musical formatting controls U+1D173..U+1D17A: format characters
    /// that render as nothing.
    pub(crate) fn blank_format_controls() -> Vec<char> {
        ('\u{1d173}'..='\u{1d17a}').collect()
    }

    /// Every character of both lists above.
    pub(crate) fn blank_rendering_characters() -> Vec<char> {
        [blank_letters_and_symbols(), blank_format_controls()].concat()
    }

    /// The `(field, reason)` of an `Invalid` error, to compare errors by value.
    pub(crate) fn invalid_reason<T: fmt::Debug>(result: Result<T, StoreError>) -> (&'static str, String) {
        match result {
            Err(StoreError::Invalid { field, reason }) => (field, reason.into_owned()),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn identifiers_that_look_alike_are_the_same_bytes() {
        assert_eq!(Tag::parse("caf\u{e9}").unwrap(), Tag::parse(" cafe\u{301}\t").unwrap());
    }

    /// Look-alikes that NFC does not fold are distinct identifiers (the
    /// module documentation says so); everyday words in other scripts pass.
    #[test]
    fn identifiers_keep_compatibility_characters_and_dotted_letters_as_written() {
        for written in
            ["\u{fb01}les", "web-\u{2168}", "admi\u{307}n", "\u{e19}\u{e49}\u{e33}", "\u{587}", "1\u{ba}", "\u{2116}5"]
        {
            assert_eq!(Tag::parse(written).unwrap().as_str(), written, "{written:?}");
        }
        assert_ne!(Tag::parse("\u{fb01}les").unwrap(), Tag::parse("files").unwrap());
    }

    #[test]
    fn a_dot_above_ends_a_look_alike_only_when_it_is_the_letters_last_mark() {
        for look_alike in ["admi\u{307}n", "adm\u{131}\u{307}n", "\u{237}\u{307}", "\u{456}\u{307}", "\u{1ecb}\u{307}"]
        {
            assert!(dots_a_dotted_letter(look_alike), "{look_alike:?}");
        }
        for distinct in
            ["admin", "\u{131}", "\u{e0}\u{307}", "ki\u{307}\u{301}tas", "\u{12f}\u{307}\u{303}", "a\u{307}"]
        {
            assert!(!dots_a_dotted_letter(distinct), "{distinct:?}");
        }
    }

    #[test]
    fn invisible_characters_are_refused_in_identifiers_and_names() {
        for invisible in ["\u{200b}", "\u{feff}", "\u{2060}", "\u{3164}", "\u{00ad}", "\u{202e}", "\u{2066}"] {
            assert!(Tag::parse(&format!("a{invisible}b")).is_err(), "{invisible:?}");
            assert!(DisplayName::parse(invisible).is_err(), "{invisible:?}");
        }
    }

    #[test]
    fn blank_rendering_characters_are_refused_as_invisible_in_identifiers_and_names() {
        let identifier_reasons = [
            invalid_reason(Tag::parse("web-1\u{200b}")),
            invalid_reason(Tag::parse("web-1\u{2060}")),
            invalid_reason(Tag::parse("web-1\u{34f}")),
        ];
        let name_reasons =
            [invalid_reason(DisplayName::parse("\u{200b}")), invalid_reason(DisplayName::parse("\u{34f}"))];
        for blank in blank_rendering_characters() {
            for tag in [format!("web-1{blank}"), format!("web{blank}1"), format!("{blank}web-1")] {
                assert!(identifier_reasons.contains(&invalid_reason(Tag::parse(&tag))), "{tag:?}");
            }
            let alone = blank.to_string();
            assert!(name_reasons.contains(&invalid_reason(DisplayName::parse(&alone))), "{alone:?}");
            let cluster_reason = invalid_reason(ClusterName::parse(&format!(" {alone} ")));
            assert!(name_reasons.contains(&cluster_reason), "{alone:?}");
        }
    }

    /// A blank letter or symbol next to visible ones is kept, as the Hangul
    /// filler U+3164 always was (it is not counted as visible, and a name
    /// has no rule against invisible letters); a blank format control is
    /// refused, as the zero-width space is.
    #[test]
    fn a_name_with_a_blank_and_a_visible_character_keeps_its_behaviour() {
        for blank in blank_letters_and_symbols() {
            let name = format!("Ada{blank}Lovelace");
            assert_eq!(DisplayName::parse(&name).unwrap().as_str(), name);
        }
        let format_reason = invalid_reason(DisplayName::parse("Ada\u{200b}Lovelace"));
        for blank in blank_format_controls() {
            assert_eq!(invalid_reason(DisplayName::parse(&format!("Ada{blank}Lovelace"))), format_reason);
        }
    }

    #[test]
    fn names_keep_joiners_that_scripts_and_emoji_need() {
        let family = "\u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467}";
        assert_eq!(DisplayName::parse(family).unwrap().as_str(), family);
        assert!(DisplayName::parse("\u{645}\u{6cc}\u{200c}\u{62e}\u{648}\u{627}\u{647}\u{645}").is_ok());
    }

    /// Format characters that are not default-ignorable (the Arabic number
    /// sign U+0600, the interlinear annotation anchor U+FFF9) are refused
    /// by their category, as the zero-width ones are: no other rule
    /// catches them.
    #[test]
    fn format_characters_that_are_not_default_ignorable_are_refused_in_identifiers() {
        let format_reason = invalid_reason(Tag::parse("web\u{200b}1"));
        for format in ['\u{600}', '\u{fff9}'] {
            assert!(!is_default_ignorable(format), "{format:?}");
            assert_eq!(invalid_reason(Tag::parse(&format!("web{format}1"))), format_reason, "{format:?}");
            let email_reason = invalid_reason(crate::Email::parse(&format!("ad{format}min@x.io")));
            assert_eq!(email_reason.1, format_reason.1, "{format:?}");
        }
    }

    #[test]
    fn a_line_or_paragraph_separator_inside_a_name_is_refused() {
        for separator in ['\u{2028}', '\u{2029}'] {
            let name = format!("Ada{separator}Lovelace");
            assert_eq!(invalid_reason(DisplayName::parse(&name)), ("name", "contains a line separator".to_owned()));
            assert!(ClusterName::parse(&name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn a_name_at_its_byte_limit_is_kept_and_one_byte_longer_is_refused() {
        let at_limit = "n".repeat(MAX_USER_TEXT_BYTES);
        assert_eq!(DisplayName::parse(&format!(" {at_limit} ")).unwrap().as_str(), at_limit);
        let longer = format!("{at_limit}n");
        let reason = format!("is longer than {MAX_USER_TEXT_BYTES} bytes");
        assert_eq!(invalid_reason(DisplayName::parse(&longer)), ("name", reason));
        assert!(ClusterName::parse(&"c".repeat(MAX_CLUSTER_NAME_BYTES)).is_ok());
        assert!(ClusterName::parse(&"c".repeat(MAX_CLUSTER_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn free_text_of_exactly_max_bytes_is_accepted_and_one_byte_more_refused() {
        assert!(check("picture", &"p".repeat(255), 255, Blank::Refused).is_ok());
        let refused = invalid_reason(check("picture", &"p".repeat(256), 255, Blank::Refused));
        assert_eq!(refused, ("picture", "is longer than 255 bytes".to_owned()));
    }

    #[test]
    fn the_byte_limit_applies_after_normalisation() {
        let at_limit = "a".repeat(MAX_TAG_BYTES);
        assert!(Tag::parse(&format!("  {at_limit}  ")).is_ok());
        assert!(Tag::parse(&format!("{at_limit}a")).is_err());
    }
}
