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
/// so diesel prepares it once per connection.
macro_rules! hand_written_statement {
    ($name:ident) => {
        $crate::statement::static_query_id!($name);

        impl diesel::query_builder::Query for $name<'_> {
            type SqlType = diesel::sql_types::Untyped;
        }

        impl diesel::query_dsl::RunQueryDsl<diesel::PgConnection> for $name<'_> {}
    };
}

pub(crate) use {hand_written_statement, static_query_id};

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
        .position(|line| line.trim_start().trim_start_matches("pub(crate) ").starts_with(&declaration))
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
