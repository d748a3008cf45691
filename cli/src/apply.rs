//! `ceccmctl apply`: validate every document, then create or update each object on the server.

use reqwest::StatusCode;
use serde_json::Value;

use crate::client::Client;
use crate::error::{Error, Result, failed, usage};
use crate::manifest::{self, Manifest};
use crate::output;

pub const HELP: &str = "\
All or nothing: by default apply reads every document of every -f source first, checks each
one locally (apiVersion, kind, name) and then on the server with a dry run (which names unknown
fields and invalid values), and only when every document passes does it store any of them. A
file whose third document is invalid therefore changes nothing on the server. With
--continue-on-error each valid document is applied and each invalid one reported; the exit
status is then 1 (or 2 when a document was rejected locally) if any failed.

A YAML or JSON syntax error always stops apply before anything is sent: the rest of that file
cannot be read reliably. The error names the file and line.

Regions are applied first (as kubectl applies namespaces first), then the other objects in file
order. A dataset or application may name a region created by the same apply: the dry run leaves
that reference out, and the server checks it when the object is stored after the region.

Each object is printed as KIND/NAME followed by `created`, `configured` (spec, labels or
annotations changed) or `unchanged` (the server kept the same resourceVersion).

Examples:
  ceccmctl apply -f examples/regions.yaml
  ceccmctl apply -f examples/            # every .yaml, .yml and .json file in name order
  cat m51.yaml | ceccmctl apply -f -
  ceccmctl apply -f m51.yaml --dry-run=server";

pub struct Options {
    pub files: Vec<String>,
    pub dry_run: bool,
    pub continue_on_error: bool,
}

/// What applying one object did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        }
    }
}

/// Decides what an apply did from the object before (if it existed) and the server's answer.
/// Only the user-owned parts (spec, labels, annotations) count: controllers may have moved the
/// status (and so the resourceVersion) between the read and the apply.
pub fn outcome(status: StatusCode, before: Option<&Value>, after: &Value) -> Outcome {
    let Some(before) = before else {
        return Outcome::Created;
    };
    if status == StatusCode::CREATED {
        return Outcome::Created;
    }
    let owned = |o: &Value| {
        (
            o.get("spec").cloned(),
            o.pointer("/metadata/labels").cloned(),
            o.pointer("/metadata/annotations").cloned(),
        )
    };
    if owned(before) == owned(after) {
        Outcome::Unchanged
    } else {
        Outcome::Configured
    }
}

pub async fn run(client: &Client, options: &Options) -> Result<()> {
    let documents = manifest::read_all(&options.files)?;
    if documents.is_empty() {
        return Err(usage!("no objects found in {}", options.files.join(", ")));
    }
    let mut manifests = Vec::new();
    let mut local_errors = Vec::new();
    for document in documents {
        match manifest::validate(document) {
            Ok(m) => manifests.push(m),
            Err(e) => local_errors.push(e),
        }
    }
    // Regions first, as kubectl applies namespaces first: other kinds may name them.
    manifests.sort_by_key(|m| m.kind.kind != "Region");
    if options.continue_on_error {
        return apply_each(client, &manifests, local_errors, options.dry_run).await;
    }
    if !local_errors.is_empty() {
        let documents = manifests.len() + local_errors.len();
        return Err(nothing_applied(local_errors, documents));
    }

    // Phase 1: the server judges every object without storing anything. References to regions
    // that this apply creates cannot pass a dry run yet; they are checked when applied.
    let mut checked = Vec::new();
    let mut server_errors = Vec::new();
    let mut new_regions = Vec::new();
    for m in &manifests {
        match check(client, m, &new_regions).await {
            Ok(result) => {
                if m.kind.kind == "Region" && result.0.is_none() {
                    new_regions.push(m.name.clone());
                }
                checked.push(result);
            }
            Err(e) => server_errors.push(e),
        }
    }
    if !server_errors.is_empty() {
        return Err(nothing_applied(server_errors, manifests.len()));
    }
    if options.dry_run {
        for (m, (before, (status, after))) in manifests.iter().zip(&checked) {
            let done = outcome(*status, before.as_ref(), after);
            output::print(&format!(
                "{} {} (server dry run)\n",
                m.reference(),
                done.word()
            ))?;
        }
        return Ok(());
    }

    // Phase 2: store them, regions first, then in file order.
    for (m, (before, _)) in manifests.iter().zip(&checked) {
        let (status, after) = client
            .apply(m.kind, &m.name, &m.document.object, false)
            .await
            .map_err(|e| in_document(m, e))?;
        let done = outcome(status, before.as_ref(), &after);
        output::print(&format!("{} {}\n", m.reference(), done.word()))?;
    }
    Ok(())
}

/// The stored object (if any) and the server's dry-run answer for one manifest.
async fn check(
    client: &Client,
    m: &Manifest,
    new_regions: &[String],
) -> Result<(Option<Value>, (StatusCode, Value))> {
    let before = stored(client, m).await.map_err(|e| in_document(m, e))?;
    let body = without_region_refs(&m.document.object, m.kind.region_refs, new_regions);
    let answer = client
        .apply(m.kind, &m.name, &body, true)
        .await
        .map_err(|e| in_document(m, e))?;
    Ok((before, answer))
}

/// The object as the server holds it now, if it does.
async fn stored(client: &Client, m: &Manifest) -> Result<Option<Value>> {
    match client.get(m.kind, &m.name).await {
        Ok(object) => Ok(Some(object)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The object with every reference (at `pointers`) to one of `regions` left out: a region name
/// field is removed, a list of names loses those names (and goes when it is left empty).
pub fn without_region_refs(object: &Value, pointers: &[&str], regions: &[String]) -> Value {
    let mut object = object.clone();
    for pointer in pointers {
        let Some((parent, key)) = pointer.rsplit_once('/') else {
            continue;
        };
        let Some(Value::Object(fields)) = object.pointer_mut(parent) else {
            continue;
        };
        let drop = match fields.get_mut(key) {
            Some(Value::String(name)) => regions.contains(name),
            Some(Value::Array(names)) => {
                names.retain(|n| !n.as_str().is_some_and(|n| regions.iter().any(|r| r == n)));
                names.is_empty()
            }
            _ => false,
        };
        if drop {
            fields.remove(key);
        }
    }
    object
}

async fn apply_each(
    client: &Client,
    manifests: &[Manifest],
    local_errors: Vec<Error>,
    dry_run: bool,
) -> Result<()> {
    let mut failures = local_errors.len();
    let usage_failure = failures > 0;
    for e in &local_errors {
        eprintln!("{}", output::error_line(e));
    }
    let mut new_regions = Vec::new();
    for m in manifests {
        let result = async {
            let before = stored(client, m).await?;
            // Only a dry run needs references to regions it did not create left out.
            let body = if dry_run {
                without_region_refs(&m.document.object, m.kind.region_refs, &new_regions)
            } else {
                m.document.object.clone()
            };
            let (status, after) = client.apply(m.kind, &m.name, &body, dry_run).await?;
            if m.kind.kind == "Region" && before.is_none() {
                new_regions.push(m.name.clone());
            }
            Ok(outcome(status, before.as_ref(), &after))
        }
        .await;
        match result {
            Ok(done) => {
                let suffix = if dry_run { " (server dry run)" } else { "" };
                output::print(&format!("{} {}{suffix}\n", m.reference(), done.word()))?;
            }
            Err(e) if matches!(e, Error::Unreachable { .. }) => return Err(e),
            Err(e) => {
                failures += 1;
                eprintln!("{}", output::error_line(&in_document(m, e)));
            }
        }
    }
    match failures {
        0 => Ok(()),
        n if usage_failure => Err(usage!("{n} document(s) could not be applied")),
        n => Err(failed!("{n} document(s) could not be applied")),
    }
}

/// Prefixes a server error with the document it is about.
fn in_document(m: &Manifest, error: Error) -> Error {
    match error {
        Error::Api {
            status,
            code,
            message,
        } => Error::Api {
            status,
            code,
            message: format!("{} {}: {message}", m.document.origin(), m.reference()),
        },
        other => other,
    }
}

/// Prints every rejected document and answers the error that ends the command: a usage error
/// when the client rejected them, a failure when the server did. `documents` counts them all.
fn nothing_applied(errors: Vec<Error>, documents: usize) -> Error {
    let (unreachable, errors): (Vec<Error>, Vec<Error>) = errors
        .into_iter()
        .partition(|e| matches!(e, Error::Unreachable { .. }));
    if let Some(e) = unreachable.into_iter().next() {
        return e;
    }
    for e in &errors {
        eprintln!("{}", output::error_line(e));
    }
    let summary = format!(
        "nothing was applied: {} of {documents} document(s) rejected \
         (use --continue-on-error to apply the others)",
        errors.len()
    );
    if errors.iter().all(|e| matches!(e, Error::Usage(_))) {
        Error::Usage(summary)
    } else {
        Error::Failed(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(rv: &str, tier: &str, labels: Value) -> Value {
        json!({"metadata": {"name": "x", "resourceVersion": rv, "labels": labels},
               "spec": {"tier": tier}, "status": {"phase": "Ready"}})
    }

    #[test]
    fn outcomes_follow_what_the_server_stored() {
        let before = object("7", "edge", json!({}));
        assert_eq!(
            outcome(StatusCode::CREATED, None, &before),
            Outcome::Created
        );
        assert_eq!(
            outcome(StatusCode::OK, Some(&before), &before),
            Outcome::Unchanged
        );
        let new_spec = object("8", "cloud", json!({}));
        assert_eq!(
            outcome(StatusCode::OK, Some(&before), &new_spec),
            Outcome::Configured
        );
        let new_label = object("8", "edge", json!({"site": "caha"}));
        assert_eq!(
            outcome(StatusCode::OK, Some(&before), &new_label),
            Outcome::Configured
        );
        // A dry run may answer the would-be object without a new resourceVersion.
        let dry_run_change = object("7", "cloud", json!({}));
        assert_eq!(
            outcome(StatusCode::OK, Some(&before), &dry_run_change),
            Outcome::Configured
        );
        // A heartbeat moved the status between the read and the apply: still unchanged.
        let mut status_only = before.clone();
        status_only["metadata"]["resourceVersion"] = json!("9");
        status_only["status"]["load"] = json!(0.5);
        assert_eq!(
            outcome(StatusCode::OK, Some(&before), &status_only),
            Outcome::Unchanged
        );
    }

    #[test]
    fn references_to_new_regions_leave_the_dry_run_body() {
        let new = vec!["edge-new".to_string()];
        let dataset = json!({"spec": {"region": "edge-new", "format": "fits"}});
        assert_eq!(
            without_region_refs(&dataset, &["/spec/region"], &new),
            json!({"spec": {"format": "fits"}})
        );
        let app =
            json!({"spec": {"placement": {"regions": ["edge-new", "cloud"], "tiers": ["edge"]}}});
        assert_eq!(
            without_region_refs(&app, &["/spec/placement/regions"], &new),
            json!({"spec": {"placement": {"regions": ["cloud"], "tiers": ["edge"]}}})
        );
        let only_new = json!({"spec": {"placement": {"regions": ["edge-new"]}}});
        assert_eq!(
            without_region_refs(&only_new, &["/spec/placement/regions"], &new),
            json!({"spec": {"placement": {}}})
        );
        let existing = json!({"spec": {"region": "cloud"}});
        assert_eq!(
            without_region_refs(&existing, &["/spec/region"], &new),
            existing
        );
        assert_eq!(
            without_region_refs(&json!({}), &["/spec/region"], &new),
            json!({})
        );
    }

    #[test]
    fn nothing_applied_keeps_the_kind_of_failure() {
        let usage = nothing_applied(vec![Error::Usage("a.yaml (document 2): bad".into())], 2);
        assert!(matches!(usage, Error::Usage(_)));
        let text = usage.to_string();
        assert!(text.contains("nothing was applied: 1 of 2"), "{text}");
        let server = nothing_applied(
            vec![Error::Api {
                status: 400,
                code: "BadRequest".into(),
                message: "unknown field `colour`".into(),
            }],
            3,
        );
        assert!(matches!(server, Error::Failed(_)));
        assert!(server.to_string().contains("1 of 3"), "{server}");
    }
}
