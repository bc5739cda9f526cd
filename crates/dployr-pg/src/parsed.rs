//! [`Parsed`]: a text column read straight into the domain type it holds.

use std::str::FromStr;

use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::Text;

/// A text column (an id, a role, a provider) parsed into `T` as the row is
/// decoded, from the text in the result, with no `String` allocated and
/// dropped on the way: per member of `clusters.get`, two of its five
/// allocations. A stored value that does not parse fails the decoding, as
/// any malformed column does (`StoreError::Backend`): it is the database's
/// content that is wrong, not the caller's input.
#[derive(Debug, Clone, Copy, diesel::deserialize::FromSqlRow)]
pub(crate) struct Parsed<T>(pub(crate) T);

impl<T> FromSql<Text, Pg> for Parsed<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let text = std::str::from_utf8(value.as_bytes())?;
        Ok(Self(text.parse()?))
    }
}

#[cfg(test)]
mod tests {
    use diesel::dsl::sql;
    use diesel::sql_types::Text;
    use diesel::{Connection, PgConnection, RunQueryDsl, select};
    use dployr_domain::{Role, UserId};

    use super::Parsed;

    #[test]
    fn a_stored_value_parses_and_one_that_does_not_fails_the_row() {
        let db = dployr_testkit::database();
        let mut conn = PgConnection::establish(db.url()).unwrap();
        let id = UserId::generate();
        let parsed: (Parsed<UserId>, Parsed<Role>) =
            select((sql::<Text>(&format!("'{id}'")), sql::<Text>("'developer'"))).get_result(&mut conn).unwrap();
        assert_eq!((parsed.0.0, parsed.1.0), (id, Role::Developer));
        let error = select(sql::<Text>("'not a ulid'")).get_result::<Parsed<UserId>>(&mut conn).unwrap_err();
        assert!(matches!(error, diesel::result::Error::DeserializationError(_)), "{error}");
        let error = select(sql::<Text>("'emperor'")).get_result::<Parsed<Role>>(&mut conn).unwrap_err();
        assert!(matches!(error, diesel::result::Error::DeserializationError(_)), "{error}");
    }
}
