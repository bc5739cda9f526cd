//! The integrations a cluster records in its metadata (top-level keys such
//! as `gitHub` or `slack`), read into typed groups; notification
//! integrations that name no events get the default set.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Metadata;

/// The events a notification integration may be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NotificationEvent {
    /// `instance.created`
    #[serde(rename = "instance.created")]
    InstanceCreated,
    /// `instance.modified`
    #[serde(rename = "instance.modified")]
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
    /// `cluster.user_removed`
    #[serde(rename = "cluster.user_removed")]
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

/// Source-code hosts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RemoteIntegrations {
    /// `metadata.gitHub`
    pub git_hub: Option<Value>,
    /// `metadata.gitLab`
    pub git_lab: Option<Value>,
    /// `metadata.bitBucket`
    pub bit_bucket: Option<Value>,
}

/// E-mail senders.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
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

/// Notification channels.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
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
    /// Reads the integrations out of a cluster's metadata. Entries that are
    /// not objects are ignored; unknown event names are skipped.
    pub fn from_metadata(metadata: &Metadata) -> Self {
        let object = |key: &str| metadata.get(key).filter(|value| value.is_object()).cloned();
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
    let named: Vec<NotificationEvent> = settings
        .get("events")
        .and_then(Value::as_array)
        .map(|events| events.iter().filter_map(|event| serde_json::from_value(event.clone()).ok()).collect())
        .unwrap_or_default();
    let events = if named.is_empty() { NotificationEvent::DEFAULTS.to_vec() } else { named };
    NotificationIntegration { settings, events }
}
