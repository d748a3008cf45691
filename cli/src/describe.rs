//! `ceccmctl describe`: one object for a person to read, with its conditions and events.

use serde_json::{Map, Value};

use crate::client::Client;
use crate::commands::targets;
use crate::error::{Error, Result};
use crate::output;
use crate::table;
use crate::time::{age, now_unix};

/// How many of the latest events describe shows.
const RECENT_EVENTS: usize = 20;

pub async fn run(client: &Client, kind: &str, names: &[String]) -> Result<()> {
    let (kind, names) = targets(kind, names)?;
    let objects = if names.is_empty() {
        client.list(kind, None, None).await?.items
    } else {
        let mut objects = Vec::new();
        for name in &names {
            objects.push(client.get(kind, name).await?);
        }
        objects
    };
    let events_kind = crate::kinds::resolve("events")?;
    let mut texts = Vec::new();
    for object in &objects {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let selector = format!(
            "involvedObject.kind={},involvedObject.name={name}",
            kind.kind
        );
        let events = match client.list(events_kind, None, Some(&selector)).await {
            Ok(list) => list.items,
            // Describing an event, or a server without events, still describes the object.
            Err(e @ Error::Api { .. }) if kind.kind == "Event" => {
                eprintln!("{}", output::error_line(&e));
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        texts.push(render(kind.kind, object, events, now_unix()));
    }
    if texts.is_empty() {
        eprintln!("No resources found.");
    }
    output::print(&texts.join("\n\n"))
}

/// The text of one object: metadata, spec, status, conditions and recent events.
pub fn render(kind: &str, object: &Value, mut events: Vec<Value>, now: i64) -> String {
    let meta = |key: &str| object.pointer(&format!("/metadata/{key}"));
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "<none>".into(),
        Some(other) => other.to_string(),
    };
    let mut fields: Vec<(&str, String)> = vec![
        ("Name", text(meta("name"))),
        ("Kind", kind.to_string()),
        ("Labels", pairs(meta("labels"))),
        ("Annotations", pairs(meta("annotations"))),
        ("UID", text(meta("uid"))),
        ("Resource Version", text(meta("resourceVersion"))),
        ("Generation", text(meta("generation"))),
        ("Created", timestamp(meta("creationTimestamp"), now)),
    ];
    if meta("deletionTimestamp").is_some_and(|v| !v.is_null()) {
        fields.push(("Deleting Since", timestamp(meta("deletionTimestamp"), now)));
    }
    if let Some(Value::Array(f)) = meta("finalizers")
        && !f.is_empty()
    {
        fields.push(("Finalizers", list(f)));
    }
    let mut out = String::new();
    for (label, value) in &fields {
        out.push_str(&field_line(label, value));
    }
    for (label, key) in [("Spec", "spec"), ("Status", "status")] {
        let mut section = object.get(key).cloned().unwrap_or(Value::Null);
        if let Value::Object(map) = &mut section {
            map.remove("conditions");
        }
        out.push_str(&format!("{label}:"));
        match &section {
            Value::Null => out.push_str(" <none>\n"),
            Value::Object(map) if map.is_empty() => out.push_str(" <none>\n"),
            value => {
                out.push('\n');
                let yaml = output::to_yaml(value).unwrap_or_default();
                for line in yaml.lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            }
        }
    }
    out.push_str(&conditions(object, now));
    crate::commands::sort_events(&mut events);
    let recent = &events[events.len().saturating_sub(RECENT_EVENTS)..];
    out.push_str(&events_section(recent, now));
    out
}

/// `Label:` padded so that values line up, as kubectl describe does.
fn field_line(label: &str, value: &str) -> String {
    format!(
        "{:<width$}{value}\n",
        format!("{label}:"),
        width = LABEL_WIDTH
    )
}

const LABEL_WIDTH: usize = 18;

fn pairs(value: Option<&Value>) -> String {
    match value {
        Some(Value::Object(map)) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str().map_or_else(|| v.to_string(), str::to_string)
                )
            })
            .collect::<Vec<_>>()
            .join(&format!("\n{:LABEL_WIDTH$}", "")),
        _ => "<none>".into(),
    }
}

fn list(values: &[Value]) -> String {
    values
        .iter()
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
        .collect::<Vec<_>>()
        .join(", ")
}

fn timestamp(value: Option<&Value>, now: i64) -> String {
    match value.and_then(Value::as_str) {
        Some(t) => format!("{t} ({} ago)", age(t, now)),
        None => "<none>".into(),
    }
}

fn str_field(object: &Map<String, Value>, key: &str) -> String {
    match object.get(key) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Null) | None => "".into(),
        Some(other) => other.to_string(),
    }
}

fn conditions(object: &Value, now: i64) -> String {
    let Some(conditions) = object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
    else {
        return field_line("Conditions", "<none>");
    };
    let mut rows = vec![
        ["Type", "Status", "Reason", "Last Transition", "Message"]
            .map(String::from)
            .to_vec(),
        ["----", "------", "------", "---------------", "-------"]
            .map(String::from)
            .to_vec(),
    ];
    for c in conditions.iter().filter_map(Value::as_object) {
        let transition = c
            .get("lastTransitionTime")
            .and_then(Value::as_str)
            .map_or_else(String::new, |t| age(t, now));
        rows.push(vec![
            str_field(c, "type"),
            str_field(c, "status"),
            str_field(c, "reason"),
            transition,
            str_field(c, "message"),
        ]);
    }
    indented("Conditions:", &rows)
}

fn events_section(events: &[Value], now: i64) -> String {
    if events.is_empty() {
        return field_line("Events", "<none>");
    }
    let mut rows = vec![
        ["Type", "Reason", "Age", "Message"]
            .map(String::from)
            .to_vec(),
        ["----", "------", "---", "-------"]
            .map(String::from)
            .to_vec(),
    ];
    for e in events.iter().filter_map(Value::as_object) {
        let last = e
            .get("lastTimestamp")
            .and_then(Value::as_str)
            .map_or_else(|| "<unknown>".into(), |t| age(t, now));
        let count = e.get("count").and_then(Value::as_u64).unwrap_or(1);
        let first = e.get("firstTimestamp").and_then(Value::as_str);
        // kubectl writes repeated events as `10s (x3 over 2m)`.
        let when = match first {
            Some(first) if count > 1 => format!("{last} (x{count} over {})", age(first, now)),
            _ => last,
        };
        rows.push(vec![
            str_field(e, "type"),
            str_field(e, "reason"),
            when,
            str_field(e, "message"),
        ]);
    }
    indented("Events:", &rows)
}

fn indented(title: &str, rows: &[Vec<String>]) -> String {
    let body: String = table::render(rows)
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    format!("{title}\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_rfc3339;
    use serde_json::json;

    #[test]
    fn an_application_reads_like_kubectl_describe() {
        let now = parse_rfc3339("2026-11-21T12:00:00Z").unwrap();
        let app = json!({
            "apiVersion": "ceccm/v1", "kind": "Application",
            "metadata": {"name": "m51", "uid": "u-1", "resourceVersion": "42", "generation": 2,
                         "labels": {"survey": "manga", "team": "ifs"},
                         "creationTimestamp": "2026-11-21T11:55:00Z",
                         "finalizers": ["ceccm/release"]},
            "spec": {"app": "astro-fit", "parallelism": 4},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Scheduled", "status": "True", "reason": "Placed",
                                       "message": "4 tasks on edge-caha",
                                       "lastTransitionTime": "2026-11-21T11:59:00Z"}]}
        });
        let events = vec![
            json!({"type": "Warning", "reason": "TaskRetried", "message": "task 2 failed",
                   "count": 3, "firstTimestamp": "2026-11-21T11:58:00Z",
                   "lastTimestamp": "2026-11-21T11:59:50Z"}),
            json!({"type": "Normal", "reason": "Scheduled", "message": "placed",
                   "count": 1, "firstTimestamp": "2026-11-21T11:56:00Z",
                   "lastTimestamp": "2026-11-21T11:56:00Z"}),
        ];
        let text = render("Application", &app, events, now);
        let expected = "\
Name:             m51
Kind:             Application
Labels:           survey=manga
                  team=ifs
Annotations:      <none>
UID:              u-1
Resource Version: 42
Generation:       2
Created:          2026-11-21T11:55:00Z (5m ago)
Finalizers:       ceccm/release
Spec:
  app: astro-fit
  parallelism: 4
Status:
  phase: Running
Conditions:
  Type        Status   Reason   Last Transition   Message
  ----        ------   ------   ---------------   -------
  Scheduled   True     Placed   60s               4 tasks on edge-caha
Events:
  Type      Reason        Age                Message
  ----      ------        ---                -------
  Normal    Scheduled     4m                 placed
  Warning   TaskRetried   10s (x3 over 2m)   task 2 failed
";
        assert_eq!(text, expected);
    }

    #[test]
    fn an_object_without_status_or_events_says_none() {
        let text = render("Dataset", &json!({"metadata": {"name": "cube"}}), vec![], 0);
        assert!(text.contains("Spec: <none>\nStatus: <none>\n"), "{text}");
        assert!(text.contains("Conditions:       <none>\n"), "{text}");
        assert!(text.ends_with("Events:           <none>\n"), "{text}");
    }
}
