//! Where each read of the stores may go: a replica, or only the primary.
//! This is the one place the choice is made; a store names its read
//! (`self.pool.read(Read::ClustersMembers)`, which opens the operation named and routed by it) and the table below
//! says where it runs. `docs/ARCHITECTURE.md` ("Read routing") has the same
//! table with the reason per row, and a test compares the two, so the
//! document cannot drift from the code.
//!
//! The rule: a read may go to a replica when a few seconds of staleness can
//! neither grant access nor lose a write (listings and lookups shown to a
//! person). Everything that authorizes, every one-time record, every read
//! the sign-in path makes right after its own write, and every read inside a
//! write stays on the primary. A read that follows a write in the same
//! request is the caller's to mark: [`PgPool::reads_after`] (read your
//! writes) or [`PgPool::reads_on_primary`].
//!
//! [`PgPool::reads_after`]: crate::PgPool::reads_after
//! [`PgPool::reads_on_primary`]: crate::PgPool::reads_on_primary

/// Which servers may answer a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A replica within the lag bound, else the primary.
    Replica,
    /// The primary, always.
    Primary,
}

impl Route {
    /// The word the architecture document uses: `replica` or `primary`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replica => "replica",
            Self::Primary => "primary",
        }
    }
}

macro_rules! reads {
    ($($variant:ident => $name:literal, $route:ident, $reason:literal;)*) => {
        /// Every read operation of the PostgreSQL stores (a store method
        /// that writes nothing), named as its `tracing` span is.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Read {
            $(
                #[doc = concat!("`", $name, "`: ", $reason)]
                $variant,
            )*
        }

        impl Read {
            /// Every read, in the order of the document's table.
            pub const ALL: &'static [Read] = &[$(Read::$variant),*];

            /// The operation's name (its span's `op`), e.g. `clusters.members`.
            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $name),* }
            }

            /// Where it may run.
            pub fn route(self) -> Route {
                match self { $(Self::$variant => Route::$route),* }
            }

            /// Why it may (or may not) be a few seconds stale.
            pub fn reason(self) -> &'static str {
                match self { $(Self::$variant => $reason),* }
            }
        }
    };
}

reads! {
    UsersGet => "users.get", Replica,
        "a profile looked up by id for display; a stale name or picture grants nothing";
    UsersGetByEmail => "users.get_by_email", Primary,
        "on the sign-in path: it decides who is signing in, right after users.upsert may have created them";
    UsersMissing => "users.missing", Primary,
        "which of a list of accounts are gone, asked right after a delete";
    UsersSessionsToEnd => "users.sessions_to_end", Primary,
        "decides whose sessions DataLayer::remove_users and delete_user end, right after they deleted accounts";
    ClustersGet => "clusters.get", Replica,
        "a cluster with its members, for display; every permission is checked by role_of or can_* on the primary";
    ClustersMembers => "clusters.members", Replica,
        "a page of members; a member added a second ago shows on the next page load";
    ClustersInvites => "clusters.invites", Replica,
        "a page of invitations, for display";
    ClustersUserClusters => "clusters.user_clusters", Primary,
        "what a session carries: the sign-in stores it in the session for its lifetime, right after create_for_owner or accept_invite; a stale answer would be kept for days";
    ClustersPendingInvites => "clusters.pending_invites", Replica,
        "a user's invitations, for display; accepting one is a write that finds it gone if it was withdrawn";
    ClustersOwner => "clusters.owner", Replica,
        "the owner shown beside a cluster; deciding whether someone is the owner is is_owner";
    ClustersUsersWithRole => "clusters.users_with_role", Replica,
        "a listing of members by role, for display";
    ClustersOwnedCluster => "clusters.owned_cluster", Primary,
        "on the sign-in path, right after create_for_owner: a stale miss would show a new user no cluster";
    ClustersRoleOf => "clusters.role_of", Primary,
        "authorizes: a removed or demoted member must lose access at once";
    ClustersCanRead => "clusters.can_read", Primary,
        "authorizes";
    ClustersCanWrite => "clusters.can_write", Primary,
        "authorizes";
    ClustersIsAdmin => "clusters.is_admin", Primary,
        "authorizes";
    ClustersIsOwner => "clusters.is_owner", Primary,
        "authorizes";
    ClustersIntegrations => "clusters.integrations", Primary,
        "the GitHub installation the cluster acts through; a replaced installation must stop being used at once";
    InstancesGet => "instances.get", Replica,
        "an instance for display";
    InstancesGetByTag => "instances.get_by_tag", Primary,
        "an instance's agent looks itself up by tag right after it was registered";
    InstancesListByCluster => "instances.list_by_cluster", Replica,
        "a page of instances; one registered a second ago shows on the next page load";
    BootstrapTokensIsUsed => "bootstrap_tokens.is_used", Primary,
        "a one-time record: a stale false would let a used token bootstrap again";
}

/// The store operations that write (each one transaction, or one statement,
/// on the primary; the reads inside them too), named as their spans are.
pub const WRITES: &[&str] = &[
    "users.upsert",
    "users.update",
    "users.delete",
    "users.sessions_ended",
    "users.forget_sessions_to_end",
    "clusters.create_for_owner",
    "clusters.update",
    "clusters.delete",
    "clusters.install_github_integration",
    "clusters.add_users",
    "clusters.remove_users",
    "clusters.accept_invite",
    "clusters.decline_invite",
    "clusters.transfer_ownership",
    "instances.create",
    "instances.update_metadata",
    "instances.delete",
    "bootstrap_tokens.create",
    "bootstrap_tokens.mark_used",
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const ARCHITECTURE: &str = include_str!("../../../docs/ARCHITECTURE.md");
    const STORES: [&str; 4] = [
        include_str!("users.rs"),
        include_str!("clusters/mod.rs"),
        include_str!("instances.rs"),
        include_str!("bootstrap_tokens.rs"),
    ];

    /// The rows `| \`op\` | route | reason |` of the document's routing table.
    fn document_rows() -> Vec<(String, String)> {
        let section = ARCHITECTURE.split("## Read routing").nth(1).unwrap_or_default();
        section
            .lines()
            .take_while(|line| !line.starts_with("## "))
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let op = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((op.to_owned(), (*cells.get(2)?).to_owned()))
            })
            .collect()
    }

    #[test]
    fn the_architecture_table_names_every_read_with_the_route_the_code_takes() {
        let documented = document_rows();
        let code: Vec<(String, String)> =
            Read::ALL.iter().map(|read| (read.name().to_owned(), read.route().as_str().to_owned())).collect();
        let documented_reads: Vec<(String, String)> =
            documented.into_iter().filter(|(op, _)| !WRITES.contains(&op.as_str())).collect();
        assert_eq!(documented_reads, code, "docs/ARCHITECTURE.md, \"Read routing\", must list Read::ALL in order");
    }

    /// The variants of `Read` the stores open their reads with
    /// (`self.pool.read(Read::X)`), by name.
    fn opened_reads() -> BTreeSet<&'static str> {
        STORES
            .iter()
            .flat_map(|source| source.split(".read(Read::").skip(1))
            .filter_map(|rest| rest.split(|c: char| !c.is_ascii_alphanumeric()).next())
            .filter_map(|variant| Read::ALL.iter().find(|read| format!("{read:?}") == variant).map(|read| read.name()))
            .collect()
    }

    /// The operations the stores open by a typed name (`operation("x")`).
    fn named_operations() -> BTreeSet<&'static str> {
        STORES
            .iter()
            .flat_map(|source| source.split(".operation(\"").skip(1))
            .filter_map(|rest| rest.split('"').next())
            .collect()
    }

    #[test]
    fn every_store_operation_is_either_a_classified_read_or_a_write() {
        let spans: BTreeSet<&str> = opened_reads().union(&named_operations()).copied().collect();
        let classified: BTreeSet<&str> =
            Read::ALL.iter().map(|read| read.name()).chain(WRITES.iter().copied()).collect();
        assert_eq!(spans, classified);
    }

    #[test]
    fn every_read_is_opened_by_its_route_and_no_read_by_a_typed_name() {
        // A read opened as `self.pool.read(Read::X)` is named, and routed, by
        // `Read::X`; one opened as `operation("x")` would run on the primary
        // whatever the table says.
        let reads: BTreeSet<&str> = Read::ALL.iter().map(|read| read.name()).collect();
        assert_eq!(opened_reads(), reads, "every read is opened with pool.read(Read::..)");
        let typed: Vec<&str> = named_operations().intersection(&reads).copied().collect();
        assert!(typed.is_empty(), "reads opened by a typed name, so never routed: {typed:?}");
    }
}
