//! Hand-written statements: the few a store writes as a type of its own,
//! where diesel's builder cannot express the statement, so that diesel still
//! prepares each once per connection (a static query id). Each such type
//! holds its SQL whole in its doc comment, and a unit test compares that text
//! with what the type sends ([`assert_documented`]), so the comment, which is
//! what a reader reads, cannot drift from the code.

/// Gives a hand-written statement type (or part of one; one lifetime
/// parameter) a static query id: its SQL text never changes, so diesel may
/// prepare it once per connection.
macro_rules! static_query_id {
    ($name:ident) => {
        impl diesel::query_builder::QueryId for $name<'_> {
            type QueryId = $name<'static>;
            const HAS_STATIC_QUERY_ID: bool = true;
        }
    };
}

/// Makes a hand-written statement type (one lifetime parameter; its
/// `QueryFragment` is its SQL) a query diesel can run, with a static query id
/// so diesel prepares it once per connection. With the SQL types of its
/// columns, its rows decode by position (`Queryable`); without, by name
/// (`QueryableByName`, or nothing to decode).
macro_rules! hand_written_statement {
    ($name:ident) => {
        $crate::statement::hand_written_statement!($name, diesel::sql_types::Untyped);
    };
    ($name:ident, $columns:ty) => {
        $crate::statement::static_query_id!($name);

        impl diesel::query_builder::Query for $name<'_> {
            type SqlType = $columns;
        }

        impl diesel::query_dsl::RunQueryDsl<diesel::PgConnection> for $name<'_> {}
    };
}

pub(crate) use {hand_written_statement, static_query_id};

/// Every row of `query`, decoded into a vector allocated once for the rows
/// the server sent. diesel's `load` collects through a fallible iterator
/// that hides the row count, so its vector grows and is copied as rows come
/// (about 12 000 instructions of `clusters.get`'s 51 rows, callgrind).
pub(crate) fn load_all<'conn, 'query: 'conn, Q, U>(
    query: Q,
    conn: &'conn mut diesel::PgConnection,
) -> diesel::QueryResult<Vec<U>>
where
    Q: diesel::RunQueryDsl<diesel::PgConnection>
        + diesel::query_dsl::LoadQuery<'query, diesel::PgConnection, U, diesel::connection::DefaultLoadingMode>
        + 'conn,
    U: 'conn,
{
    let rows = query.load_iter::<U, diesel::connection::DefaultLoadingMode>(conn)?;
    let mut all = Vec::with_capacity(rows.size_hint().0);
    for row in rows {
        all.push(row?);
    }
    Ok(all)
}

/// A statement diesel sends unprepared, so that PostgreSQL plans it with its
/// bound values on every run (an unnamed statement gets a custom plan).
///
/// For the few statements on one cluster that also take a list of users
/// (`cluster_id = $1 AND user_id = ANY($2)`): a database of many small
/// clusters makes the generic plan of a prepared statement expect a handful
/// of rows per cluster and read the cluster's index, which for a cluster of
/// 100 000 members reads them all, where a plan made for the bound values
/// probes the primary key once per user; and `clusters.update`'s
/// `user_id <> ALL($2)`, whose list PostgreSQL hashes only as a constant
/// (a custom plan's), so that a generic plan compares every member with
/// every listed user. They are writes, whose
/// transaction costs more than planning; the reads are written so that
/// their generic plan is right (see `memberships_of`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlannedEachRun<Q>(pub(crate) Q);

impl<Q> diesel::query_builder::QueryId for PlannedEachRun<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: diesel::query_builder::QueryFragment<diesel::pg::Pg>> diesel::query_builder::QueryFragment<diesel::pg::Pg>
    for PlannedEachRun<Q>
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        out.unsafe_to_cache_prepared();
        self.0.walk_ast(out)
    }
}

impl<Q: diesel::query_builder::Query> diesel::query_builder::Query for PlannedEachRun<Q> {
    type SqlType = Q::SqlType;
}

impl<Q> diesel::query_dsl::RunQueryDsl<diesel::PgConnection> for PlannedEachRun<Q> {}

/// Asserts that `statement` sends the SQL in the ```` ```sql ```` block of
/// the doc comment of `struct type_name` in `source` (the file's text),
/// ignoring layout and `--` comments.
#[cfg(test)]
pub(crate) fn assert_documented(
    source: &str,
    type_name: &str,
    statement: &impl diesel::query_builder::QueryFragment<diesel::pg::Pg>,
) {
    let sent = diesel::debug_query::<diesel::pg::Pg, _>(statement).to_string();
    let sent = sent.split(" -- binds: ").next().unwrap_or_default();
    let documented = documented_sql(source, type_name);
    assert_eq!(normalized(&documented), normalized(sent), "the doc comment of {type_name} is not what it sends");
}

/// The ```` ```sql ```` block of the doc comment right above `struct type_name`.
#[cfg(test)]
fn documented_sql(source: &str, type_name: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let declaration = format!("struct {type_name}");
    let at = lines
        .iter()
        .position(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("pub(crate) ").or_else(|| line.strip_prefix("pub(super) ")).unwrap_or(line);
            line.starts_with(&declaration)
        })
        .unwrap_or_else(|| panic!("no {declaration} in the source"));
    let mut doc: Vec<&str> = lines[..at]
        .iter()
        .rev()
        .skip_while(|line| line.trim_start().starts_with("#["))
        .take_while(|line| line.trim_start().starts_with("///"))
        .map(|line| line.trim_start().trim_start_matches("///"))
        .collect();
    doc.reverse();
    let start = doc.iter().position(|line| line.trim() == "```sql").unwrap_or_else(|| panic!("{type_name}: no ```sql"));
    doc[start + 1..].iter().take_while(|line| line.trim() != "```").copied().collect::<Vec<_>>().join("\n")
}

/// `sql` without `--` comments, its words separated by single spaces.
#[cfg(test)]
fn normalized(sql: &str) -> String {
    sql.lines()
        .map(|line| line.split(" --").next().unwrap_or_default())
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}
