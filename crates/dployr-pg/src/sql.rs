//! SQL functions diesel does not ship, declared once for every store.

use diesel::sql_types::{Nullable, Text, Timestamptz};

diesel::define_sql_function! {
    /// `coalesce(a, b)` for text: `a` unless it is NULL.
    fn coalesce(a: Nullable<Text>, b: Text) -> Text;
}

diesel::define_sql_function! {
    /// `coalesce(a, b)` for nullable text.
    #[sql_name = "coalesce"]
    fn coalesce_nullable(a: Nullable<Text>, b: Nullable<Text>) -> Nullable<Text>;
}

diesel::define_sql_function! {
    /// `coalesce(a, b)` for a time: `a` unless it is NULL.
    #[sql_name = "coalesce"]
    fn coalesce_time(a: Nullable<Timestamptz>, b: Timestamptz) -> Nullable<Timestamptz>;
}

diesel::define_sql_function! {
    /// `greatest(a, b)` for times.
    fn greatest(a: Timestamptz, b: Timestamptz) -> Timestamptz;
}

diesel::define_sql_function! {
    /// `nullif(a, b)` for text: NULL where `a` equals `b`, else `a`.
    fn nullif(a: Nullable<Text>, b: Text) -> Nullable<Text>;
}
