//! Pagination: a page request (`Page`) and its answer (`Paged`). Keyset
//! cursors make deep pages cost what shallow ones do; offsets remain for
//! callers that need page numbers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The most items one page may hold; larger limits are capped to it.
pub const MAX_PAGE_LIMIT: u32 = 100;

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PageStart {
    /// At the first item.
    #[default]
    First,
    /// After the last item of the page that returned this cursor.
    After(Cursor),
    /// After skipping this many items (costs more the deeper it goes).
    Offset(u64),
}

/// A page request.
///
/// ```
/// use dployr_domain::{Page, MAX_PAGE_LIMIT};
/// let page = Page::first(20);
/// assert_eq!(page.limit(), 20);
/// assert_eq!(Page::first(10_000).limit(), MAX_PAGE_LIMIT);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    limit: u32,
    /// Where it starts.
    pub start: PageStart,
}

impl Page {
    /// The first `limit` items (capped to [`MAX_PAGE_LIMIT`], at least 1).
    pub fn first(limit: u32) -> Self {
        Self { limit: limit.clamp(1, MAX_PAGE_LIMIT), start: PageStart::First }
    }

    /// The `limit` items after `cursor`.
    pub fn after(cursor: Cursor, limit: u32) -> Self {
        Self { start: PageStart::After(cursor), ..Self::first(limit) }
    }

    /// The `limit` items after skipping `offset`.
    pub fn offset(offset: u64, limit: u32) -> Self {
        Self { start: PageStart::Offset(offset), ..Self::first(limit) }
    }

    /// How many items at most.
    pub fn limit(&self) -> u32 {
        self.limit
    }
}

impl Default for Page {
    fn default() -> Self {
        Self::first(20)
    }
}

/// An opaque position in a listing, handed out by [`Paged::next`]. Its
/// content is the store's business; one that does not decode, or that
/// another listing handed out (another cluster's members, or its
/// invitations), is refused with `Invalid`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(String);

impl Cursor {
    /// Wraps the text of a cursor (as received from a client).
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// Its text, to hand to a client.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cursor({})", self.0)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paged<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// How many items the whole listing has.
    pub total: u64,
    /// The cursor of the next page; `None` on the last one.
    pub next: Option<Cursor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_request_starts_where_it_was_asked_to_with_its_limit_kept_within_bounds() {
        let cursor = Cursor::new("bWVtYmVycw");
        assert_eq!(Page::after(cursor.clone(), 5), Page { limit: 5, start: PageStart::After(cursor) });
        assert_eq!(Page::offset(40, 500), Page { limit: MAX_PAGE_LIMIT, start: PageStart::Offset(40) });
        assert_eq!(Page::first(0), Page { limit: 1, start: PageStart::First });
        assert_eq!(Page::first(20).limit(), 20);
        assert_eq!(Page::default(), Page::first(20));
    }

    #[test]
    fn a_cursor_shows_and_serializes_as_the_text_it_was_made_from() {
        let cursor = Cursor::new("bWVtYmVycw");
        assert_eq!(cursor.as_str(), "bWVtYmVycw");
        assert_eq!(cursor.to_string(), "bWVtYmVycw");
        assert_eq!(format!("{cursor:?}"), "Cursor(bWVtYmVycw)");
        assert_eq!(serde_json::to_string(&cursor).unwrap(), "\"bWVtYmVycw\"");
    }
}
