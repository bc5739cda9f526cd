//! The integrations a cluster records in its metadata (top-level keys such
//! as `gitHub` or `slack`), read into typed groups; notification
//! integrations that name no events (no `events` list) get the default set.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Metadata;

/// The events a notification integration may be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NotificationEvent {
    /// `instance.created`
    #[serde(rename = "instance.created")]
    InstanceCreated,
    /// `instance.modified` (the original's code; `instance.updated`, its
    /// later name, is read as this too)
    #[serde(rename = "instance.modified", alias = "instance.updated")]
    InstanceModified,
    /// `instance.deleted`
    #[serde(rename = "instance.deleted")]
    InstanceDeleted,
    /// `cluster.invite_accepted`
    #[serde(rename = "cluster.invite_accepted")]
    ClusterInviteAccepted,
    /// `cluster.user_invited`
    #[serde(rename = "cluster.user_invited")]
    ClusterUserInvited,
    /// `cluster.removed_user` (the original's code; `cluster.user_removed`,
    /// which an earlier version of this crate wrote, is read as this too)
    #[serde(rename = "cluster.removed_user", alias = "cluster.user_removed")]
    ClusterUserRemoved,
    /// `cluster.user_role_changed`
    #[serde(rename = "cluster.user_role_changed")]
    ClusterUserRoleChanged,
}

impl NotificationEvent {
    /// The events of a notification integration that names none.
    pub const DEFAULTS: [NotificationEvent; 7] = [
        NotificationEvent::InstanceCreated,
        NotificationEvent::InstanceModified,
        NotificationEvent::InstanceDeleted,
        NotificationEvent::ClusterInviteAccepted,
        NotificationEvent::ClusterUserInvited,
        NotificationEvent::ClusterUserRemoved,
        NotificationEvent::ClusterUserRoleChanged,
    ];
}

/// A notification integration: its settings and the events it receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationIntegration {
    /// The stored object (webhook URL, channel, ...), as recorded.
    pub settings: Value,
    /// The events it receives; the defaults when the settings name none.
    pub events: Vec<NotificationEvent>,
}

/// Source-code hosts. Serialized with the metadata's keys (`gitHub`, ...).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteIntegrations {
    /// `metadata.gitHub`
    pub git_hub: Option<Value>,
    /// `metadata.gitLab`
    pub git_lab: Option<Value>,
    /// `metadata.bitBucket`
    pub bit_bucket: Option<Value>,
}

/// E-mail senders. Serialized with the metadata's keys (`resendMail`, ...).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmailIntegrations {
    /// `metadata.resendMail`
    pub resend_mail: Option<Value>,
    /// `metadata.zohoMail`
    pub zoho_mail: Option<Value>,
    /// `metadata.mailerSend`
    pub mailer_send: Option<Value>,
    /// `metadata.mailChimp`
    pub mail_chimp: Option<Value>,
}

/// Notification channels. Serialized with the metadata's keys (`slack`,
/// `customWebhook`, ...).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationIntegrations {
    /// `metadata.discord`
    pub discord: Option<NotificationIntegration>,
    /// `metadata.slack`
    pub slack: Option<NotificationIntegration>,
    /// `metadata.customWebhook`
    pub custom_webhook: Option<NotificationIntegration>,
    /// `metadata.emailNotification`
    pub email_notification: Option<NotificationIntegration>,
}

/// Every integration of a cluster.
///
/// ```
/// use dployr_domain::{Integrations, Metadata, NotificationEvent};
/// use serde_json::json;
///
/// let metadata = Metadata::try_from(json!({
///     "gitHub": {"loginId": "42"},
///     "slack": {"url": "https://hooks.slack.example/x"},
///     "discord": {"url": "https://discord.example/y", "events": ["instance.deleted"]},
/// })).unwrap();
/// let integrations = Integrations::from_metadata(&metadata);
/// assert_eq!(integrations.remote.git_hub, Some(json!({"loginId": "42"})));
/// assert_eq!(integrations.notification.slack.unwrap().events, NotificationEvent::DEFAULTS);
/// assert_eq!(integrations.notification.discord.unwrap().events, [NotificationEvent::InstanceDeleted]);
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Integrations {
    /// Source-code hosts.
    pub remote: RemoteIntegrations,
    /// E-mail senders.
    pub email: EmailIntegrations,
    /// Notification channels.
    pub notification: NotificationIntegrations,
}

impl Integrations {
    /// Reads the integrations out of a cluster's metadata, each entry as
    /// it is stored (a `null` entry is none). A notification integration
    /// whose `events` is missing or `null` gets [`NotificationEvent::DEFAULTS`];
    /// a list keeps the events it names that are known, once each, in its
    /// order, so an empty list (or one of unknown names only) is an
    /// integration told about nothing, as the original read it
    /// (`integration.events || defaults`).
    pub fn from_metadata(metadata: &Metadata) -> Self {
        let object = |key: &str| metadata.get(key).filter(|value| !value.is_null()).cloned();
        let notification = |key: &str| object(key).map(notification_integration);
        Self {
            remote: RemoteIntegrations {
                git_hub: object("gitHub"),
                git_lab: object("gitLab"),
                bit_bucket: object("bitBucket"),
            },
            email: EmailIntegrations {
                resend_mail: object("resendMail"),
                zoho_mail: object("zohoMail"),
                mailer_send: object("mailerSend"),
                mail_chimp: object("mailChimp"),
            },
            notification: NotificationIntegrations {
                discord: notification("discord"),
                slack: notification("slack"),
                custom_webhook: notification("customWebhook"),
                email_notification: notification("emailNotification"),
            },
        }
    }
}

fn notification_integration(settings: Value) -> NotificationIntegration {
    let events = match settings.get("events") {
        Some(Value::Array(named)) => {
            let mut events = Vec::new();
            for event in named.iter().filter_map(|event| NotificationEvent::deserialize(event).ok()) {
                if !events.contains(&event) {
                    events.push(event);
                }
            }
            events
        }
        // Missing, null, or not a list: names no events.
        _ => NotificationEvent::DEFAULTS.to_vec(),
    };
    NotificationIntegration { settings, events }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Integrations, NotificationEvent};
    use crate::Metadata;

    fn read(metadata: serde_json::Value) -> Integrations {
        Integrations::from_metadata(&Metadata::try_from(metadata).unwrap())
    }

    #[test]
    fn event_codes_are_the_originals_and_older_spellings_are_read_too() {
        let codes: Vec<String> = NotificationEvent::DEFAULTS
            .iter()
            .map(|event| serde_json::to_value(event).unwrap().as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            codes,
            [
                "instance.created",
                "instance.modified",
                "instance.deleted",
                "cluster.invite_accepted",
                "cluster.user_invited",
                "cluster.removed_user",
                "cluster.user_role_changed"
            ]
        );
        let integrations = read(json!({"slack": {"events": ["cluster.user_removed", "instance.updated"]}}));
        assert_eq!(
            integrations.notification.slack.unwrap().events,
            [NotificationEvent::ClusterUserRemoved, NotificationEvent::InstanceModified]
        );
    }

    #[test]
    fn only_a_missing_or_null_events_list_means_the_default_events() {
        let events =
            |settings: serde_json::Value| read(json!({ "discord": settings })).notification.discord.unwrap().events;
        assert_eq!(events(json!({"url": "u"})), NotificationEvent::DEFAULTS);
        assert_eq!(events(json!({"url": "u", "events": null})), NotificationEvent::DEFAULTS);
        assert_eq!(events(json!({"url": "u", "events": []})), [], "an empty list mutes the integration");
        assert_eq!(events(json!({"events": ["nothing.known"]})), []);
        assert_eq!(
            events(json!({"events": ["instance.deleted", "bogus", "instance.deleted", "instance.created"]})),
            [NotificationEvent::InstanceDeleted, NotificationEvent::InstanceCreated]
        );
    }

    #[test]
    fn entries_are_read_as_stored_and_serialized_under_the_metadatas_keys() {
        let integrations =
            read(json!({"gitHub": 42, "gitLab": null, "mailChimp": "key", "customWebhook": {"url": "u"}}));
        assert_eq!(integrations.remote.git_hub, Some(json!(42)));
        assert_eq!(integrations.remote.git_lab, None);
        assert_eq!(integrations.email.mail_chimp, Some(json!("key")));
        let text = serde_json::to_value(&integrations).unwrap();
        assert_eq!(text["remote"]["gitHub"], json!(42));
        assert_eq!(text["email"]["mailChimp"], json!("key"));
        assert_eq!(text["notification"]["customWebhook"]["settings"], json!({"url": "u"}));
        assert_eq!(serde_json::from_value::<Integrations>(text).unwrap(), integrations);
    }
}
