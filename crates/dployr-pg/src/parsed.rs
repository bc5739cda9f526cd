//! [`Parsed`]: a text column read straight into the domain type it holds;
//! [`Timestamp`]: a `timestamptz` read in one step.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use diesel::deserialize::{self, FromSql};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::{Text, Timestamptz};

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

/// A `timestamptz` column, decoded from PostgreSQL's binary form (signed
/// microseconds since 2000-01-01 UTC) with one shift and chrono's
/// `from_timestamp_micros`. diesel's decoder adds a `Duration` to the 2000
/// epoch, which walks the calendar: about 275 instructions a value, a
/// twentieth of `clusters.get`'s client work for its 51 rows (callgrind),
/// against about a third of that here. The same values (test below);
/// `infinity` and years chrono cannot hold fail the row, as with diesel.
#[derive(Debug, Clone, Copy, diesel::deserialize::FromSqlRow)]
pub(crate) struct Timestamp(pub(crate) DateTime<Utc>);

/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl FromSql<Timestamptz, Pg> for Timestamp {
    fn from_sql(value: PgValue<'_>) -> deserialize::Result<Self> {
        let bytes: [u8; 8] = value
            .as_bytes()
            .try_into()
            .map_err(|_| format!("a timestamptz of {} bytes, not 8", value.as_bytes().len()))?;
        i64::from_be_bytes(bytes)
            .checked_add(POSTGRES_EPOCH_MICROS)
            .and_then(DateTime::from_timestamp_micros)
            .map(Self)
            .ok_or_else(|| "a timestamptz out of chrono's range (infinity?)".into())
    }
}

#[cfg(test)]
mod tests {
    use diesel::dsl::sql;
    use diesel::sql_types::Text;
    use diesel::{Connection, PgConnection, RunQueryDsl, select};
    use dployr_domain::{Role, UserId};

    use super::{Parsed, Timestamp};

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

    #[test]
    fn timestamps_decode_as_diesel_decodes_them_and_infinity_fails_the_row() {
        use chrono::{DateTime, Utc};
        use diesel::sql_types::Timestamptz;
        let db = dployr_testkit::database();
        let mut conn = PgConnection::establish(db.url()).unwrap();
        // Both sides of both epochs, leap days, the microsecond edges, the
        // ends of what chrono holds, and ten thousand spread over 1900-2200.
        let mut values: Vec<String> = [
            "2000-01-01 00:00:00+00",
            "1999-12-31 23:59:59.999999+00",
            "1970-01-01 00:00:00+00",
            "1969-12-31 23:59:59.999999+00",
            "2000-02-29 12:00:00.000001+00",
            "2024-02-29 23:59:59.5+00",
            "1900-03-01 00:00:00+00",
            "0001-01-01 00:00:00+00",
            "262142-12-31 23:59:59.999999+00",
            "4713-11-24 00:00:00+00 BC",
            "2026-11-28 12:34:56.789012+05:30",
        ]
        .iter()
        .map(|text| format!("'{text}'::timestamptz"))
        .collect();
        values.push("'1900-01-01'::timestamptz + n * interval '3 days 1 hour 7 minutes 13.123457 seconds'".into());
        for value in &values {
            let series = if value.contains(" n ") { "generate_series(0, 9999) n" } else { "(SELECT 1) n" };
            let query = format!("SELECT {value} AS at FROM {series}");
            let ours: Vec<Timestamp> = diesel::sql_query(&query)
                .load::<TimestampRow>(&mut conn)
                .unwrap()
                .into_iter()
                .map(|row| row.at)
                .collect();
            let diesels: Vec<DieselsRow> = diesel::sql_query(&query).load(&mut conn).unwrap();
            assert_eq!(ours.len(), diesels.len());
            for (ours, diesels) in ours.iter().zip(&diesels) {
                assert_eq!(ours.0, diesels.at, "{value}");
            }
        }
        for beyond in ["'infinity'", "'-infinity'", "'294276-12-31 23:59:59+00'"] {
            let error = select(sql::<Timestamptz>(&format!("{beyond}::timestamptz")))
                .get_result::<Timestamp>(&mut conn)
                .unwrap_err();
            assert!(matches!(error, diesel::result::Error::DeserializationError(_)), "{beyond}: {error}");
        }

        #[derive(diesel::QueryableByName)]
        struct TimestampRow {
            #[diesel(sql_type = Timestamptz)]
            at: Timestamp,
        }
        #[derive(diesel::QueryableByName)]
        struct DieselsRow {
            #[diesel(sql_type = Timestamptz)]
            at: DateTime<Utc>,
        }
    }
}
