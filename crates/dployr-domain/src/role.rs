//! Roles in a cluster and sign-in providers: closed sets, so a store can
//! never write a value the schema's CHECK would refuse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// A member's role in a cluster. The derived order is the rank order:
/// `Invited < Viewer < Developer < Admin < Owner`.
///
/// ```
/// use dployr_domain::Role;
/// assert!(Role::Owner > Role::Admin && Role::Viewer > Role::Invited);
/// assert_eq!("developer".parse::<Role>().unwrap(), Role::Developer);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Asked to join; no access until the invitation is accepted.
    Invited,
    /// Reads.
    Viewer,
    /// Reads and writes.
    Developer,
    /// Manages members and settings.
    Admin,
    /// The one owner of the cluster.
    Owner,
}

impl Role {
    /// Every role, lowest rank first.
    pub const ALL: [Role; 5] = [Role::Invited, Role::Viewer, Role::Developer, Role::Admin, Role::Owner];

    /// The text stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Invited => "invited",
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// The rank: 0 for `Invited` up to 4 for `Owner`. The database's
    /// generated column `user_clusters.role_order` holds `4 - rank` (0 for
    /// the owner), so that listings sort by it ascending.
    pub fn rank(self) -> i16 {
        match self {
            Role::Invited => 0,
            Role::Viewer => 1,
            Role::Developer => 2,
            Role::Admin => 3,
            Role::Owner => 4,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| StoreError::invalid("role", format!("unknown role {text:?}")))
    }
}

/// How a user signs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Google OAuth.
    Google,
    /// GitHub OAuth.
    Github,
    /// Microsoft OAuth.
    Microsoft,
    /// E-mail one-time code; also the provider of invitees who never signed
    /// in (told apart by whether the account signed in since, which
    /// `ClusterStore::remove_users` asks before deleting one).
    Email,
}

impl Provider {
    /// Every provider.
    pub const ALL: [Provider; 4] = [Provider::Google, Provider::Github, Provider::Microsoft, Provider::Email];

    /// The text stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Google => "google",
            Provider::Github => "github",
            Provider::Microsoft => "microsoft",
            Provider::Email => "email",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, StoreError> {
        Provider::ALL
            .into_iter()
            .find(|provider| provider.as_str() == text)
            .ok_or_else(|| StoreError::invalid("provider", format!("unknown provider {text:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored text is what the schema's CHECKs list; `rank` is what
    /// `user_clusters.role_order` is generated from (`4 - rank`).
    #[test]
    fn roles_and_providers_read_back_from_the_text_the_schema_stores() {
        let roles = Role::ALL.map(Role::as_str);
        assert_eq!(roles, ["invited", "viewer", "developer", "admin", "owner"]);
        assert_eq!(Role::ALL.map(Role::rank), [0, 1, 2, 3, 4]);
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(role.to_string(), role.as_str());
            assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{role}\""));
        }
        assert_eq!(Provider::ALL.map(Provider::as_str), ["google", "github", "microsoft", "email"]);
        for provider in Provider::ALL {
            assert_eq!(provider.as_str().parse::<Provider>().unwrap(), provider);
            assert_eq!(provider.to_string(), provider.as_str());
            assert_eq!(serde_json::to_string(&provider).unwrap(), format!("\"{provider}\""));
        }
        assert!(matches!("Owner".parse::<Role>(), Err(StoreError::Invalid { field: "role", .. })));
        assert!(matches!("gitlab".parse::<Provider>(), Err(StoreError::Invalid { field: "provider", .. })));
    }
}
