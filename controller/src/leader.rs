//! Which server runs the controllers. Any number of `ceccm server`s may serve the API over one
//! PostgreSQL database (the store is the one source of truth, and each follows its change
//! log), but exactly one runs the reconcilers, the lease sweeper, the RabbitMQ publisher and
//! the local driver's workers: the one holding a session-level advisory lock, as Kubernetes'
//! controller managers elect a leader through a Lease object. The lock lives with the
//! leader's database session, so a leader that dies (or loses the database) lets go at once,
//! and another takes over within one campaign interval. On SQLite there is one server per data
//! directory (`server.lock`), and it always leads.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// How often a follower asks for leadership, and a leader checks it still holds it: the
/// takeover deadline once a leader's session has ended.
pub const CAMPAIGN_EVERY: Duration = Duration::from_secs(1);

/// Campaigns until `stop`; for each term this server leads, runs `lead` with a signal that
/// ends the term (leadership lost, or the server stopping) and waits for it to wind down.
pub async fn campaign<F, Fut>(store: Arc<Store>, mut stop: watch::Receiver<bool>, lead: F)
where
    F: Fn(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut said_following = false;
    loop {
        if *stop.borrow() {
            return;
        }
        match store.try_lead().await {
            Ok(Some(mut term)) => {
                tracing::info!("leading: this server runs the controllers");
                said_following = false;
                let (end_term, term_ended) = watch::channel(false);
                let mut work = tokio::spawn(lead(term_ended));
                let stopping = loop {
                    tokio::select! {
                        _ = stop.changed() => break true,
                        _ = &mut work => break false,
                        _ = tokio::time::sleep(CAMPAIGN_EVERY) => {
                            if !term.still_held().await {
                                tracing::warn!("leadership lost (the database session ended): stopping the controllers");
                                break false;
                            }
                        }
                    }
                };
                let _ = end_term.send(true);
                let _ = work.await;
                if stopping {
                    return;
                }
            }
            Ok(None) => {
                if !said_following {
                    tracing::info!("following: another server runs the controllers");
                    said_following = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot campaign for leadership"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(CAMPAIGN_EVERY) => {}
        }
    }
}
