//! The RabbitMQ task transport (`--transport amqp://...`; the embedded queue stays the default).
//!
//! The store stays the source of truth: a message only says "task T of region R is queued".
//! The server publishes one persistent message per queued attempt to the region's durable quorum
//! queue `ceccm.<region>`, with publisher confirms; a region's workers consume it with manual
//! acknowledgements and a prefetch, claim the task it names through the HTTP API (a lease by
//! name and uid, `crate::queue::claim_refusal`), run it and report it as the embedded queue's
//! workers do, and acknowledge the message only once the report was taken (or kept in the
//! outbox). A duplicate or redelivered message finds its task leased or done and is dropped:
//! a result is written once, keyed by the task, whatever the broker does. The wire format is
//! documented in `docs/amqp.md`.
//!
//! Decisions are pure ([`publish_step`], [`on_claim`], [`TaskMessage::decode`]); the publisher
//! ([`publish`]) and the worker's consumer (`crate::worker::amqp`) are thin I/O shells.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::resources::{Kind, TaskObject, TaskSpec, TaskState, TaskStatus, typed};
use crate::store::{ChangeType, Query, Store};

/// Prefix of a region's queue: `ceccm.<region>`.
pub const QUEUE_PREFIX: &str = "ceccm.";
/// Where RabbitMQ sends the message of a task dead-lettered past its attempts (fanout).
pub const DEAD_LETTER_EXCHANGE: &str = "ceccm.dead-letter";
/// The queue bound to [`DEAD_LETTER_EXCHANGE`], for an operator or a UC3 consumer to read.
pub const DEAD_LETTER_QUEUE: &str = "ceccm.dead-letter";
/// The AMQP `type` property of a task message.
pub const MESSAGE_TYPE: &str = "ceccm.task.v1";
/// The message format's version, in the body.
pub const MESSAGE_VERSION: u32 = 1;
/// The environment variable that carries `--transport` to workers (it may hold a password).
pub const TRANSPORT_ENV: &str = "CECCM_TRANSPORT";

/// A region's queue.
pub fn queue_name(region: &str) -> String {
    format!("{QUEUE_PREFIX}{region}")
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("--transport {0:?}: expected `embedded` or an amqp:// (or amqps://) URL")]
    Scheme(String),
    #[error("--transport: malformed AMQP URL: {0}")]
    Url(String),
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the message of task {0} (publisher confirm nack)")]
    Nacked(String),
}

/// An AMQP URL; shown with its password hidden.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// The URL itself, password included: for connecting and for workers' environment only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // scheme://user:password@host... -> scheme://user:***@host...
        let url = &self.0;
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        match rest.split_once('@') {
            Some((user_info, host)) => {
                let user = user_info.split(':').next().unwrap_or_default();
                write!(f, "{scheme}://{user}:***@{host}")
            }
            None => write!(f, "{url}"),
        }
    }
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AmqpUrl({self})")
    }
}

/// How tasks reach workers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Transport {
    /// Workers lease from the store over HTTP (`POST /api/v1/tasks:lease`).
    #[default]
    Embedded,
    /// The server publishes to RabbitMQ; workers consume and claim by name.
    Amqp(AmqpUrl),
}

impl FromStr for Transport {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() || s == "embedded" {
            return Ok(Transport::Embedded);
        }
        if !(s.starts_with("amqp://") || s.starts_with("amqps://")) {
            return Err(TransportError::Scheme(s.to_string()));
        }
        if s.starts_with("amqps://") {
            return Err(TransportError::Url(
                "amqps:// is not built in (no TLS backend); use amqp:// over a trusted link".into(),
            ));
        }
        lapin::uri::AMQPUri::from_str(s)
            .map_err(|e| TransportError::Url(format!("{}: {e}", AmqpUrl(s.to_string()))))?;
        Ok(Transport::Amqp(AmqpUrl(s.to_string())))
    }
}

impl Transport {
    /// The form `--transport` / `$CECCM_TRANSPORT` take.
    pub fn arg(&self) -> String {
        match self {
            Transport::Embedded => "embedded".into(),
            Transport::Amqp(url) => url.expose().to_string(),
        }
    }
}

/// A task message's body (JSON): which task, and for which region and attempt. Nothing else
/// travels: the worker reads the task from the API when it claims it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskMessage {
    /// The format's version: 1.
    pub version: u32,
    /// The task's name (`metadata.name`).
    pub task: String,
    /// The task's uid (`metadata.uid`): a task made again under the same name is another task.
    pub uid: String,
    pub application: String,
    /// The region it is queued in; the message is published to `ceccm.<region>`.
    pub region: String,
    /// The attempt this message starts (1 for the first).
    pub attempt: u32,
}

/// Why a message body is not a task message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("not a ceccm task message: {0}")]
    Malformed(String),
    #[error("task message version {0} is not supported (this worker reads version 1)")]
    Version(u32),
}

/// The largest body a worker reads.
pub const MAX_MESSAGE_BYTES: usize = 4096;

impl TaskMessage {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<TaskMessage, MessageError> {
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::Malformed(format!(
                "{} bytes (at most {MAX_MESSAGE_BYTES})",
                body.len()
            )));
        }
        // The version first, so that a newer format says so instead of failing to parse.
        #[derive(Deserialize)]
        struct Versioned {
            version: Option<u32>,
        }
        let versioned: Versioned =
            serde_json::from_slice(body).map_err(|e| MessageError::Malformed(e.to_string()))?;
        match versioned.version {
            Some(MESSAGE_VERSION) => {}
            Some(other) => return Err(MessageError::Version(other)),
            None => return Err(MessageError::Malformed("no version".into())),
        }
        let message: TaskMessage =
            serde_json::from_slice(body).map_err(|e| MessageError::Malformed(e.to_string()))?;
        for (field, value, max) in [
            ("task", &message.task, 253),
            ("uid", &message.uid, 64),
            ("application", &message.application, 253),
            ("region", &message.region, 63),
        ] {
            if value.is_empty() || value.len() > max {
                return Err(MessageError::Malformed(format!(
                    "{field} must be 1 to {max} characters"
                )));
            }
        }
        crate::resources::validate_name(&message.region)
            .map_err(|e| MessageError::Malformed(format!("region: {e}")))?;
        Ok(message)
    }
}

// ---- publishing: pure decisions --------------------------------------------------------------

/// What the publisher knows of a task from its stored object.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFacts {
    pub name: String,
    pub uid: String,
    pub application: String,
    pub state: TaskState,
    pub region: Option<String>,
    pub attempts: u32,
}

impl TaskFacts {
    pub fn of(object: &Value) -> Option<TaskFacts> {
        let task: TaskObject = typed::<TaskSpec, TaskStatus>(object).ok()?;
        let status = task.status.unwrap_or(crate::lifecycle::queued_status());
        Some(TaskFacts {
            uid: task.metadata.uid.clone()?,
            name: task.metadata.name,
            application: task.spec.application,
            state: status.state,
            region: status.region,
            attempts: status.attempts,
        })
    }
}

/// The message last published for a task: (uid, region).
pub type Published = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishStep {
    /// Publish this message (and remember it once confirmed).
    Publish(TaskMessage),
    /// The task left its queue (leased, done, re-placed, deleted): its next queued attempt
    /// gets a message of its own.
    Forget,
    /// Nothing to do: published already, or not queued in a region.
    Keep,
}

/// Whether the task needs a message: queued in a region, its application runnable, and no
/// message published for this uid and region since it was last queued.
pub fn publish_step(
    task: &TaskFacts,
    published: Option<&Published>,
    runnable: bool,
) -> PublishStep {
    let region = match (&task.state, &task.region) {
        (TaskState::Queued, Some(region)) => region,
        _ => {
            return if published.is_some() {
                PublishStep::Forget
            } else {
                PublishStep::Keep
            };
        }
    };
    if !runnable {
        // Sent when the application can run again (`publish` watches applications).
        return if published.is_some() {
            PublishStep::Forget
        } else {
            PublishStep::Keep
        };
    }
    match published {
        Some((uid, at)) if *uid == task.uid && at == region => PublishStep::Keep,
        _ => PublishStep::Publish(TaskMessage {
            version: MESSAGE_VERSION,
            task: task.name.clone(),
            uid: task.uid.clone(),
            application: task.application.clone(),
            region: region.clone(),
            attempt: task.attempts + 1,
        }),
    }
}

// ---- consuming: pure decisions ---------------------------------------------------------------

/// What a worker does with a delivery once the server answered its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimVerdict {
    /// Leased: run the task, then acknowledge.
    Run,
    /// The message no longer counts (done, leased by another, re-placed, another task):
    /// acknowledge it and go on.
    Skip,
    /// As `Skip`, and the region is drained: cancel the consumer.
    SkipAndStop,
    /// The task is dead-lettered: reject the message without requeueing, so that RabbitMQ
    /// routes it to the dead-letter exchange.
    DeadLetter,
    /// The server is out of reach or failing: keep the delivery and claim again later.
    Retry,
    /// The worker is refused (token, role, bad request): give the message back and stop.
    Refused,
}

/// Decides from the claim's HTTP status and the 409's `details`.
pub fn on_claim(status: u16, details: &Value) -> ClaimVerdict {
    match status {
        200..=299 => ClaimVerdict::Run,
        404 => ClaimVerdict::Skip,
        409 => match details["reason"].as_str() {
            Some("DeadLettered") => ClaimVerdict::DeadLetter,
            _ if details["regionUnschedulable"] == true => ClaimVerdict::SkipAndStop,
            _ => ClaimVerdict::Skip,
        },
        408 | 429 | 500..=599 => ClaimVerdict::Retry,
        _ => ClaimVerdict::Refused,
    }
}

// ---- broker I/O ------------------------------------------------------------------------------

/// Connects to the broker.
pub async fn connect(url: &AmqpUrl, name: &str) -> Result<Connection, TransportError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Ok(Connection::connect(url.expose(), properties).await?)
}

fn quorum_arguments(dead_letter: bool) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if dead_letter {
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
        );
    }
    arguments
}

/// Declares (idempotently) the dead-letter exchange and queue, and `region`'s queue.
pub async fn declare_region(channel: &Channel, region: &str) -> Result<(), TransportError> {
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            DEAD_LETTER_QUEUE.into(),
            QueueDeclareOptions::durable(),
            quorum_arguments(false),
        )
        .await?;
    channel
        .queue_bind(
            DEAD_LETTER_QUEUE.into(),
            DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue_name(region).as_str().into(),
            QueueDeclareOptions::durable(),
            quorum_arguments(true),
        )
        .await?;
    Ok(())
}

/// The properties of a task message: persistent JSON, typed, its id the task's uid and attempt.
pub fn message_properties(message: &TaskMessage) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(MESSAGE_TYPE.into())
        .with_app_id("ceccm".into())
        .with_message_id(format!("{}/{}", message.uid, message.attempt).into())
}

/// A publishing channel (confirms on) and the regions declared on it.
struct Link {
    connection: Connection,
    channel: Channel,
    declared: HashSet<String>,
}

impl Link {
    async fn open(url: &AmqpUrl) -> Result<Link, TransportError> {
        let connection = connect(url, "ceccm-server").await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Link {
            connection,
            channel,
            declared: HashSet::new(),
        })
    }

    /// Publishes `messages` and waits for the broker's confirms (persisted by the quorum queue).
    async fn publish(&mut self, messages: &[TaskMessage]) -> Result<(), TransportError> {
        for message in messages {
            if !self.declared.contains(&message.region) {
                declare_region(&self.channel, &message.region).await?;
                self.declared.insert(message.region.clone());
            }
        }
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    queue_name(&message.region).as_str().into(),
                    BasicPublishOptions::default(),
                    &message.encode(),
                    message_properties(message),
                )
                .await?;
            confirms.push((message, confirm));
        }
        for (message, confirm) in confirms {
            if !confirm.await?.is_ack() {
                return Err(TransportError::Nacked(message.task.clone()));
            }
        }
        Ok(())
    }
}

/// Messages published per batch of confirms.
const PUBLISH_BATCH: usize = 1000;

/// The server's publisher: follows the store's change log (tasks and applications) and
/// publishes a message for each task queued in a region, until `stop`.
pub async fn publish(store: Arc<Store>, url: AmqpUrl, mut stop: watch::Receiver<bool>) {
    let mut publisher = Publisher {
        store: store.clone(),
        published: HashMap::new(),
        runnable: HashMap::new(),
        pending: BTreeMap::new(),
        version: 0,
        swept: false,
    };
    let mut link: Option<Link> = None;
    let mut changes = store.subscribe();
    let mut backoff = Duration::from_millis(200);
    loop {
        if let Err(e) = publisher.gather().await {
            tracing::warn!(error = %e, "reading the store for the publisher failed; retrying");
        }
        // Publish what is pending, batch by batch, each confirmed before it counts.
        while !publisher.pending.is_empty() && !*stop.borrow() {
            if link.is_none() {
                match Link::open(&url).await {
                    Ok(opened) => {
                        tracing::info!(broker = %url, "publishing tasks to RabbitMQ");
                        backoff = Duration::from_millis(200);
                        link = Some(opened);
                    }
                    Err(e) => {
                        tracing::warn!(broker = %url, error = %e, "cannot reach the broker; retrying");
                        break;
                    }
                }
            }
            let Some(open) = link.as_mut() else { break };
            let batch: Vec<TaskMessage> = publisher
                .pending
                .values()
                .take(PUBLISH_BATCH)
                .cloned()
                .collect();
            match open.publish(&batch).await {
                Ok(()) => {
                    for message in batch {
                        publisher.pending.remove(&message.task);
                        publisher
                            .published
                            .insert(message.task, (message.uid, message.region));
                    }
                }
                Err(e) => {
                    tracing::warn!(broker = %url, error = %e, "publishing failed; reconnecting");
                    if let Some(old) = link.take() {
                        let _ = old.connection.close(200, "reconnecting".into()).await;
                    }
                    break;
                }
            }
        }
        let wait = if publisher.pending.is_empty() {
            Duration::from_secs(2)
        } else {
            backoff = (backoff * 2).min(Duration::from_secs(5));
            backoff
        };
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = stop.changed() => {
                    if let Some(open) = link.take() {
                        let _ = open.connection.close(200, "server stopping".into()).await;
                    }
                    return;
                }
                change = changes.recv() => match change {
                    Ok(c) if matches!(c.kind, Kind::Task | Kind::Application) => {
                        if publisher.pending.is_empty() {
                            // Let a burst of changes settle into one pass.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if publisher.pending.is_empty() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
        if *stop.borrow() {
            return;
        }
    }
}

struct Publisher {
    store: Arc<Store>,
    /// The message last confirmed for each task, by name.
    published: HashMap<String, Published>,
    /// Whether each application seen may run (its tasks are published only then).
    runnable: HashMap<String, bool>,
    /// Messages to publish, by task name.
    pending: BTreeMap<String, TaskMessage>,
    /// The store's version read up to.
    version: i64,
    swept: bool,
}

impl Publisher {
    /// Reads what changed since the last pass (everything queued, on the first pass or when
    /// the change log was compacted past it) and decides what to publish.
    async fn gather(&mut self) -> Result<(), crate::store::StoreError> {
        if !self.swept || self.version < self.store.compacted_version().await? {
            return self.sweep().await;
        }
        let upto = self.store.current_version().await?;
        if upto <= self.version {
            return Ok(());
        }
        for change in self
            .store
            .changes_after(Kind::Application, self.version)
            .await?
        {
            if change.resource_version > upto {
                break;
            }
            let Ok(app) = serde_json::from_str::<Value>(&change.body) else {
                continue;
            };
            let name = app["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let now = change.change != ChangeType::Deleted && crate::queue::runnable(&app);
            let before = self.runnable.insert(name.clone(), now);
            if now && before == Some(false) {
                // Resumed or retried: every queued task of it is sent again (a message taken
                // while it was stopped was dropped).
                for task in self.store.tasks_of(&name).await? {
                    if let Some(facts) = TaskFacts::of(&task) {
                        self.published.remove(&facts.name);
                        self.step(&facts, true);
                    }
                }
            }
        }
        for change in self.store.changes_after(Kind::Task, self.version).await? {
            if change.resource_version > upto {
                break;
            }
            let Ok(object) = serde_json::from_str::<Value>(&change.body) else {
                continue;
            };
            let Some(facts) = TaskFacts::of(&object) else {
                continue;
            };
            if change.change == ChangeType::Deleted {
                self.published.remove(&facts.name);
                self.pending.remove(&facts.name);
                continue;
            }
            let runnable = self.runnable_app(&facts.application).await?;
            self.step(&facts, runnable);
        }
        self.version = upto;
        Ok(())
    }

    /// Every task queued in a region gets a message (a restart may send one twice: the
    /// second claim of a task is refused, so nothing runs twice).
    async fn sweep(&mut self) -> Result<(), crate::store::StoreError> {
        let version = self.store.current_version().await?;
        self.published.clear();
        self.pending.clear();
        self.runnable.clear();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list(
                    Kind::Task,
                    &Query {
                        phase: Some("Queued"),
                        after: after.as_deref(),
                        limit: Some(1000),
                        ..Default::default()
                    },
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = last["metadata"]["name"].as_str().map(str::to_string);
            for object in &page {
                if let Some(facts) = TaskFacts::of(object) {
                    let runnable = self.runnable_app(&facts.application).await?;
                    self.step(&facts, runnable);
                }
            }
        }
        self.version = version;
        self.swept = true;
        Ok(())
    }

    async fn runnable_app(&mut self, app: &str) -> Result<bool, crate::store::StoreError> {
        if let Some(known) = self.runnable.get(app) {
            return Ok(*known);
        }
        let now = self
            .store
            .get(Kind::Application, app)
            .await?
            .is_some_and(|a| crate::queue::runnable(&a));
        self.runnable.insert(app.to_string(), now);
        Ok(now)
    }

    fn step(&mut self, facts: &TaskFacts, runnable: bool) {
        match publish_step(facts, self.published.get(&facts.name), runnable) {
            PublishStep::Publish(message) => {
                self.pending.insert(facts.name.clone(), message);
            }
            PublishStep::Forget => {
                self.published.remove(&facts.name);
                self.pending.remove(&facts.name);
            }
            PublishStep::Keep => {
                // A message pending for a queued attempt that has since left its queue.
                if !(facts.state == TaskState::Queued && facts.region.is_some()) {
                    self.pending.remove(&facts.name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message() -> TaskMessage {
        TaskMessage {
            version: 1,
            task: "fit-0007".into(),
            uid: "0b5e6c1e-9f1e-4c2a-8a55-2f7f4f3c9d10".into(),
            application: "fit".into(),
            region: "edge-a".into(),
            attempt: 2,
        }
    }

    #[test]
    fn a_message_round_trips_and_bad_bodies_say_why() {
        let m = message();
        let body = m.encode();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"version": 1, "task": "fit-0007", "uid": "0b5e6c1e-9f1e-4c2a-8a55-2f7f4f3c9d10",
                   "application": "fit", "region": "edge-a", "attempt": 2})
        );
        assert_eq!(TaskMessage::decode(&body).unwrap(), m);
        assert!(matches!(
            TaskMessage::decode(b"not json"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            TaskMessage::decode(br#"{"task": "x"}"#),
            Err(MessageError::Malformed(_))
        ));
        assert_eq!(
            TaskMessage::decode(br#"{"version": 2, "task": "x", "whatever": true}"#),
            Err(MessageError::Version(2))
        );
        let mut extra: Value = serde_json::from_slice(&body).unwrap();
        extra["surprise"] = json!(1);
        assert!(TaskMessage::decode(&serde_json::to_vec(&extra).unwrap()).is_err());
        let bad_region = TaskMessage {
            region: "Edge A".into(),
            ..message()
        };
        assert!(TaskMessage::decode(&bad_region.encode()).is_err());
        let empty_uid = TaskMessage {
            uid: String::new(),
            ..message()
        };
        assert!(TaskMessage::decode(&empty_uid.encode()).is_err());
        assert!(TaskMessage::decode(&vec![b' '; MAX_MESSAGE_BYTES + 1]).is_err());
        let props = message_properties(&m);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(queue_name("edge-a"), "ceccm.edge-a");
    }

    #[test]
    fn the_transport_parses_and_hides_its_password() {
        assert_eq!(
            "embedded".parse::<Transport>().unwrap(),
            Transport::Embedded
        );
        assert_eq!("".parse::<Transport>().unwrap(), Transport::Embedded);
        let t: Transport = "amqp://guest:s3cret@127.0.0.1:5672/%2f".parse().unwrap();
        let Transport::Amqp(url) = &t else {
            panic!("not amqp")
        };
        assert_eq!(url.to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert!(!format!("{t:?}").contains("s3cret"));
        assert_eq!(t.arg(), "amqp://guest:s3cret@127.0.0.1:5672/%2f");
        assert!(matches!(
            "http://localhost".parse::<Transport>(),
            Err(TransportError::Scheme(_))
        ));
        assert!(matches!(
            "amqp://guest:guest@host:notaport/".parse::<Transport>(),
            Err(TransportError::Url(_))
        ));
    }

    fn facts(state: TaskState, region: Option<&str>) -> TaskFacts {
        TaskFacts {
            name: "fit-0007".into(),
            uid: "u1".into(),
            application: "fit".into(),
            state,
            region: region.map(str::to_string),
            attempts: 0,
        }
    }

    #[test]
    fn each_queued_attempt_is_published_once_per_region() {
        let queued = facts(TaskState::Queued, Some("edge-a"));
        let PublishStep::Publish(m) = publish_step(&queued, None, true) else {
            panic!("not published")
        };
        assert_eq!((m.region.as_str(), m.attempt), ("edge-a", 1));
        let published = ("u1".to_string(), "edge-a".to_string());
        // Published already: nothing more.
        assert_eq!(
            publish_step(&queued, Some(&published), true),
            PublishStep::Keep
        );
        // Leased: forgotten, so that its next queued attempt (same region) is sent again.
        let leased = facts(TaskState::Leased, Some("edge-a"));
        assert_eq!(
            publish_step(&leased, Some(&published), true),
            PublishStep::Forget
        );
        assert!(matches!(
            publish_step(&queued, None, true),
            PublishStep::Publish(_)
        ));
        // Re-placed elsewhere: a message for the new region.
        let moved = facts(TaskState::Queued, Some("cloud-b"));
        let PublishStep::Publish(m) = publish_step(&moved, Some(&published), true) else {
            panic!("not published")
        };
        assert_eq!(m.region, "cloud-b");
        // Waiting to be placed, done, or its application stopped: no message.
        let unplaced = facts(TaskState::Queued, None);
        assert_eq!(publish_step(&unplaced, None, true), PublishStep::Keep);
        assert_eq!(
            publish_step(&facts(TaskState::Done, Some("edge-a")), None, true),
            PublishStep::Keep
        );
        assert_eq!(publish_step(&queued, None, false), PublishStep::Keep);
        assert_eq!(
            publish_step(&queued, Some(&published), false),
            PublishStep::Forget
        );
        // Another task under the same name.
        let other = TaskFacts {
            uid: "u2".into(),
            ..queued.clone()
        };
        assert!(matches!(
            publish_step(&other, Some(&published), true),
            PublishStep::Publish(_)
        ));
    }

    #[test]
    fn a_claim_answer_decides_the_delivery() {
        assert_eq!(on_claim(200, &Value::Null), ClaimVerdict::Run);
        assert_eq!(on_claim(404, &Value::Null), ClaimVerdict::Skip);
        assert_eq!(
            on_claim(409, &json!({"reason": "Finished"})),
            ClaimVerdict::Skip
        );
        assert_eq!(
            on_claim(409, &json!({"reason": "DeadLettered"})),
            ClaimVerdict::DeadLetter
        );
        assert_eq!(
            on_claim(
                409,
                &json!({"reason": "Moved", "regionUnschedulable": true})
            ),
            ClaimVerdict::SkipAndStop
        );
        assert_eq!(on_claim(503, &Value::Null), ClaimVerdict::Retry);
        assert_eq!(on_claim(502, &Value::Null), ClaimVerdict::Retry);
        assert_eq!(on_claim(403, &Value::Null), ClaimVerdict::Refused);
        assert_eq!(on_claim(400, &Value::Null), ClaimVerdict::Refused);
    }
}
