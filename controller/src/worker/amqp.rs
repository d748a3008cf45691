//! A worker fed by RabbitMQ (`--transport amqp://...`): consumes its region's queue
//! `ceccm.<region>` with manual acknowledgements and a prefetch, claims the task each message
//! names through the API, runs it as the embedded queue's worker does (same `run_task`, same
//! outbox) and acknowledges the message once the report was taken or kept in the outbox.
//! See `crate::amqp` for the decisions and `docs/amqp.md` for the wire format.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;

use super::{Leased, Reported, WorkerError, WorkerOptions, answered, data::DataPlane, outbox};
use crate::amqp::{AmqpUrl, ClaimVerdict, TaskMessage, declare_region, on_claim, queue_name};
use crate::queue::{LeaseRequest, TaskClaim};

/// How long a delivery is held while the server cannot answer its claim (a control plane
/// restarting) before it goes back to the queue.
const CLAIM_PATIENCE: Duration = Duration::from_secs(600);

/// What to do with a delivery once its task was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    /// Reject without requeueing: RabbitMQ routes it to the dead-letter exchange.
    DeadLetter,
    /// Give it back to the queue.
    Requeue,
}

/// How a delivery's report settles its message.
fn settle(reported: Reported) -> Settle {
    match reported {
        Reported::Taken {
            dead_lettered: true,
        } => Settle::DeadLetter,
        Reported::Taken { .. } | Reported::Refused | Reported::Kept | Reported::LeaseLost => {
            Settle::Ack
        }
        // Nothing was kept: the lease expires and the task is queued (and sent) again; the
        // message given back meanwhile finds it leased and is dropped.
        Reported::Lost => Settle::Requeue,
    }
}

/// Consumes until idle for `idle_exit`, the region is drained, or the parent server dies.
pub(super) async fn consume(
    client: &reqwest::Client,
    o: &WorkerOptions,
    data: &DataPlane,
    outbox: &outbox::Outbox,
    warm: &mut super::stage::StageRunner,
    url: &AmqpUrl,
) -> anyhow::Result<()> {
    let parent = std::os::unix::process::parent_id();
    let mut idle_since = Instant::now();
    let tag = format!("{}-{}", o.worker_id, std::process::id());
    loop {
        if std::os::unix::process::parent_id() != parent {
            return Ok(());
        }
        let (connection, channel, mut consumer) = match subscribe(url, o, &tag).await {
            Ok(opened) => opened,
            Err(e) => {
                tracing::warn!(broker = %url, error = %e, "cannot consume from the broker; retrying");
                if idle_since.elapsed() >= o.idle_exit.max(Duration::from_secs(30)) {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let stop = loop {
            if std::os::unix::process::parent_id() != parent {
                break true;
            }
            // As the embedded worker: no new work until the server takes what waits; the
            // deliveries held meanwhile go back to the queue if this worker leaves.
            match outbox
                .room_for_work(data, client, &o.server, idle_since.elapsed(), o.idle_exit)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(full) => {
                    let _ = connection.close(200, "outbox full".into()).await;
                    return Err(full);
                }
            }
            let wait = o
                .idle_exit
                .saturating_sub(idle_since.elapsed())
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            let delivery = match tokio::time::timeout(wait, consumer.next()).await {
                Err(_) => {
                    if idle_since.elapsed() >= o.idle_exit {
                        break true;
                    }
                    continue;
                }
                // Cancelled by the broker (queue deleted) or the connection closed.
                Ok(None) => break false,
                Ok(Some(Err(e))) => {
                    tracing::warn!(broker = %url, error = %e, "consuming failed; reconnecting");
                    break false;
                }
                Ok(Some(Ok(delivery))) => delivery,
            };
            let (verdict, outcome) = handle(client, o, data, outbox, warm, &delivery.data).await;
            idle_since = Instant::now();
            let acked = match outcome {
                Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
                Settle::DeadLetter => delivery.reject(BasicRejectOptions { requeue: false }).await,
                Settle::Requeue => {
                    delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        })
                        .await
                }
            };
            if let Err(e) = acked {
                // The broker went away: the message comes back and its claim is refused then.
                tracing::warn!(broker = %url, error = %e, "settling a delivery failed; reconnecting");
                break false;
            }
            match verdict {
                ClaimVerdict::SkipAndStop => {
                    tracing::info!(
                        region = o.region,
                        "the region is drained: cancelling the consumer"
                    );
                    break true;
                }
                ClaimVerdict::Refused => {
                    let _ = connection.close(200, "refused".into()).await;
                    return Err(anyhow::anyhow!(
                        "the server refused this worker's claims (token or request)"
                    ));
                }
                _ => {}
            }
        };
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = connection.close(200, "worker leaving".into()).await;
        if stop {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn subscribe(
    url: &AmqpUrl,
    o: &WorkerOptions,
    tag: &str,
) -> anyhow::Result<(lapin::Connection, lapin::Channel, lapin::Consumer)> {
    let connection = crate::amqp::connect(url, &format!("ceccm-worker {}", o.worker_id)).await?;
    let channel = connection.create_channel().await?;
    declare_region(&channel, &o.region).await?;
    // The message being run plus those held ahead (`--prefetch`).
    let prefetch = u16::try_from(o.prefetch.saturating_add(1)).unwrap_or(u16::MAX);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue_name(&o.region).as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

/// Decodes a delivery, claims its task, runs it; says how to settle the message.
async fn handle(
    client: &reqwest::Client,
    o: &WorkerOptions,
    data: &DataPlane,
    outbox: &outbox::Outbox,
    warm: &mut super::stage::StageRunner,
    body: &[u8],
) -> (ClaimVerdict, Settle) {
    let message = match TaskMessage::decode(body) {
        Ok(message) => message,
        Err(e) => {
            tracing::warn!(error = %e, bytes = body.len(), "dropping a malformed message");
            return (ClaimVerdict::Skip, Settle::Ack);
        }
    };
    if message.region != o.region {
        tracing::warn!(
            task = message.task,
            region = message.region,
            "dropping a message for another region"
        );
        return (ClaimVerdict::Skip, Settle::Ack);
    }
    let deadline = Instant::now() + CLAIM_PATIENCE;
    let mut wait = Duration::from_millis(500);
    let leased = loop {
        match claim(client, o, &message).await {
            Ok(leased) => break leased,
            Err((verdict, why)) => match verdict {
                ClaimVerdict::Retry if Instant::now() + wait < deadline => {
                    tracing::info!(
                        task = message.task,
                        error = why,
                        "claim failed; trying again"
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                ClaimVerdict::Retry | ClaimVerdict::Refused => {
                    tracing::warn!(
                        task = message.task,
                        error = why,
                        "claim failed; message given back"
                    );
                    return (verdict, Settle::Requeue);
                }
                ClaimVerdict::DeadLetter => {
                    tracing::info!(task = message.task, "dead-lettered: message to the DLX");
                    return (verdict, Settle::DeadLetter);
                }
                ClaimVerdict::Skip | ClaimVerdict::SkipAndStop | ClaimVerdict::Run => {
                    tracing::debug!(
                        task = message.task,
                        reason = why,
                        "message no longer counts"
                    );
                    return (verdict, Settle::Ack);
                }
            },
        }
    };
    let reported =
        super::run_task(client, o, data, outbox, warm, leased, &mut VecDeque::new()).await;
    (ClaimVerdict::Run, settle(reported))
}

/// Claims the message's task: leased, or the verdict on the server's answer and why.
async fn claim(
    client: &reqwest::Client,
    o: &WorkerOptions,
    message: &TaskMessage,
) -> Result<Leased, (ClaimVerdict, String)> {
    let request = LeaseRequest {
        worker: o.worker_id.clone(),
        region: o.region.clone(),
        lease_seconds: o.lease_seconds,
        task: Some(TaskClaim {
            name: message.task.clone(),
            uid: message.uid.clone(),
        }),
    };
    let sent = client
        .post(format!("{}/api/v1/tasks:lease", o.server))
        .timeout(Duration::from_secs(10))
        .json(&request)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(e) => return Err((ClaimVerdict::Retry, e.to_string())),
    };
    let secret = response
        .headers()
        .get(crate::api::LEASE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    match answered(response).await {
        Ok(Some(response)) => match response.json().await {
            Ok(task) => Ok(Leased {
                task,
                secret,
                claim: None,
            }),
            Err(e) => Err((ClaimVerdict::Retry, e.to_string())),
        },
        Ok(None) => Err((ClaimVerdict::Skip, "nothing leased".into())),
        Err(WorkerError::Status { status, body }) => {
            let details = serde_json::from_str::<serde_json::Value>(&body)
                .map(|b| b["error"]["details"].clone())
                .unwrap_or_default();
            Err((on_claim(status, &details), body))
        }
        Err(e) => Err((ClaimVerdict::Retry, e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_acknowledged_once_its_report_is_safe() {
        assert_eq!(
            settle(Reported::Taken {
                dead_lettered: false
            }),
            Settle::Ack
        );
        assert_eq!(settle(Reported::Kept), Settle::Ack);
        assert_eq!(settle(Reported::Refused), Settle::Ack);
        assert_eq!(settle(Reported::LeaseLost), Settle::Ack);
        assert_eq!(
            settle(Reported::Taken {
                dead_lettered: true
            }),
            Settle::DeadLetter
        );
        assert_eq!(settle(Reported::Lost), Settle::Requeue);
    }
}
