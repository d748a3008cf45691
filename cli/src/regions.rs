//! `cordon`, `uncordon` and `drain`: take a region out of placement (and its queued work off
//! it), as kubectl does for nodes.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Client, encode};
use crate::error::{Error, Result};
use crate::kinds;
use crate::output;

/// The region names `words` give: `region/NAME...` or `region NAME...` (any alias of the kind).
pub fn region_names(words: &[String]) -> Result<Vec<String>> {
    let Some(first) = words.first() else {
        return Err(Error::Usage(
            "name the region: region/NAME or region NAME".into(),
        ));
    };
    let refs: Vec<(&'static kinds::KindInfo, String)> = if first.contains('/') {
        words
            .iter()
            .map(|w| match kinds::split_ref(w)? {
                (kind, Some(name)) => Ok((kind, name.to_string())),
                (_, None) => Err(Error::Usage(format!("\"{w}\" is not KIND/NAME"))),
            })
            .collect::<Result<_>>()?
    } else {
        let kind = kinds::resolve(first)?;
        if words.len() == 1 {
            return Err(Error::Usage(format!(
                "name the region after \"{first}\": {first} NAME or {first}/NAME"
            )));
        }
        words[1..].iter().map(|n| (kind, n.clone())).collect()
    };
    refs.into_iter()
        .map(|(kind, name)| match kind.kind {
            "Region" => Ok(name),
            _ => Err(Error::Usage(format!(
                "only regions can be cordoned or drained, not {}/{name}",
                kind.plural
            ))),
        })
        .collect()
}

/// Sets `spec.unschedulable` on each region (a read, then a write guarded by its
/// resourceVersion, read again when another writer won).
pub async fn cordon(client: &Client, words: &[String], unschedulable: bool) -> Result<()> {
    let kind = kinds::resolve("region")?;
    for name in region_names(words)? {
        let mut attempts = 0;
        loop {
            let mut region = client.get(kind, &name).await?;
            let before = region["spec"]["unschedulable"].as_bool().unwrap_or(false);
            let done = if unschedulable {
                "cordoned"
            } else {
                "uncordoned"
            };
            if before == unschedulable {
                output::print(&format!("region/{name} already {done}\n"))?;
                break;
            }
            region["spec"]["unschedulable"] = json!(unschedulable);
            if let Some(status) = region.as_object_mut() {
                status.remove("status");
            }
            match client.apply(kind, &name, &region, false).await {
                Ok(_) => {
                    output::print(&format!("region/{name} {done}\n"))?;
                    break;
                }
                Err(Error::Api { status: 409, .. }) if attempts < 5 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Cordons each region and moves its queued work elsewhere, then waits (up to `timeout`) until
/// the work running there has finished, as `kubectl drain` waits for evicted pods.
pub async fn drain(client: &Client, words: &[String], timeout: Duration) -> Result<()> {
    for name in region_names(words)? {
        let path = format!("regions/{}/drain", encode(&name));
        let deadline = Instant::now() + timeout;
        let first = drained(client, &path).await?;
        output::print(&format!(
            "region/{name} cordoned; {} queued tasks placed elsewhere\n",
            first.1
        ))?;
        let mut running = first.0;
        let mut said = None;
        while running > 0 {
            if said != Some(running) {
                output::print(&format!(
                    "waiting for {running} running tasks on region/{name}\n"
                ))?;
                said = Some(running);
            }
            if Instant::now() >= deadline {
                return Err(Error::Failed(format!(
                    "region/{name}: {running} tasks still running after {}s (--timeout)",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            running = drained(client, &path).await?.0;
        }
        output::print(&format!("region/{name} drained\n"))?;
    }
    Ok(())
}

/// One drain request: (tasks still running, tasks evicted now).
async fn drained(client: &Client, path: &str) -> Result<(u64, u64)> {
    let answer: Value = client.post_path(path, &json!({})).await?;
    let count = |field: &str| {
        answer[field].as_u64().ok_or_else(|| {
            Error::Failed(format!(
                "the server's drain answer has no {field}: {answer}"
            ))
        })
    };
    Ok((count("running")?, count("evicted")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_named_like_kubectl_nodes() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            region_names(&words(&["region/a", "rg/b"])).unwrap(),
            ["a", "b"]
        );
        assert_eq!(
            region_names(&words(&["regions", "a", "b"])).unwrap(),
            ["a", "b"]
        );
        for bad in [
            &[][..],
            &["region"][..],
            &["application/x"][..],
            &["apps", "x"][..],
        ] {
            assert!(
                matches!(region_names(&words(bad)), Err(Error::Usage(_))),
                "{bad:?}"
            );
        }
    }
}
