//! [`NewInvitees`]: the users `add_users` creates for e-mails that have never
//! signed in, in one statement whatever their number.

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, QueryFragment};
use diesel::sql_types::{Array, Text};
use dployr_domain::{Provider, UserId};

use crate::statement::hand_written_statement;

/// Users of provider `email` for the invited addresses that have none, one
/// array per column:
///
/// ```sql
/// INSERT INTO users (id, email, name, provider)
/// SELECT invitee.id, invitee.email, invitee.name, $1
///   FROM unnest($2, $3, $4) AS invitee (id, email, name)
/// ON CONFLICT (email) DO NOTHING
/// ```
///
/// Arrays, not a row of parameters per address: PostgreSQL's protocol
/// counts a statement's parameters in 16 bits, so a `VALUES` list of four
/// per address stopped working past 16 383 addresses (the server closed the
/// connection, which read as the database being unavailable). The rows go in
/// the order of the addresses, which every caller sorts, so two invitations
/// of the same new addresses wait on each other's rows in one order and
/// cannot deadlock.
pub(super) struct NewInvitees<'a> {
    ids: Vec<String>,
    emails: &'a [&'a str],
    names: Vec<&'a str>,
}

impl<'a> NewInvitees<'a> {
    /// The invitees of `emails` (sorted, normalised addresses), each with a
    /// new id and their address's local part as their name.
    pub(super) fn new(emails: &'a [&'a str]) -> Self {
        Self {
            ids: emails.iter().map(|_| UserId::generate().to_string()).collect(),
            emails,
            names: emails.iter().map(|email| email.split_once('@').map_or(*email, |(local, _)| local)).collect(),
        }
    }
}

impl QueryFragment<Pg> for NewInvitees<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_sql(
            "INSERT INTO users (id, email, name, provider)\n\
             SELECT invitee.id, invitee.email, invitee.name, ",
        );
        out.push_bind_param::<Text, _>(Provider::Email.as_str())?;
        out.push_sql("\n  FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.emails)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.names)?;
        out.push_sql(") AS invitee (id, email, name)\nON CONFLICT (email) DO NOTHING");
        Ok(())
    }
}

hand_written_statement!(NewInvitees);

#[cfg(test)]
mod tests {
    use super::NewInvitees;

    #[test]
    fn the_doc_comment_holds_the_statement_sent() {
        let statement = NewInvitees::new(&["a@x.io", "b@x.io"]);
        crate::statement::assert_documented(include_str!("invitees.rs"), "NewInvitees", &statement);
    }
}
