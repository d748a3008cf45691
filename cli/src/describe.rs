//! `ceccmctl describe`: one object for a person to read, with its conditions and events.

use serde_json::{Map, Value};

use crate::client::Client;
use crate::commands::targets;
use crate::error::{Error, Result};
use crate::output;
use crate::results;
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
    let mut texts = Vec::new();
    for object in &objects {
        let related = gather(client, kind.kind, object).await?;
        texts.push(render(kind.kind, object, &related, now_unix()));
    }
    if texts.is_empty() {
        eprintln!("No resources found.");
    }
    output::print(&texts.join("\n\n"))
}

/// What describe shows beside the object itself.
#[derive(Debug, Default)]
pub struct Related {
    /// Events about the object (any object of its kind and name: [`render`] keeps those of
    /// this very object).
    pub events: Vec<Value>,
    /// An application's tasks, for what each region measured; `None` for other kinds.
    pub tasks: Option<Fetched<Vec<Value>>>,
    /// A succeeded application's results index; `None` otherwise.
    pub results: Option<Fetched<results::Index>>,
}

/// Something describe read besides the object, or why it could not: the server's refusal is
/// shown in place rather than hiding the rest of the description.
pub type Fetched<T> = std::result::Result<T, String>;

/// Reads the events of `object` and, for an application, its tasks and (once it succeeded) its
/// results index. Server errors of these extras are kept for display; an unreachable server
/// fails the command.
async fn gather(client: &Client, kind: &str, object: &Value) -> Result<Related> {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let selector = format!("involvedObject.kind={kind},involvedObject.name={name}");
    let events_kind = crate::kinds::resolve("events")?;
    let events = match client.list(events_kind, None, Some(&selector)).await {
        Ok(list) => list.items,
        // Describing an event, or a server without events, still describes the object.
        Err(e @ Error::Api { .. }) if kind == "Event" => {
            eprintln!("{}", output::error_line(&e));
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    if kind != "Application" {
        return Ok(Related {
            events,
            ..Related::default()
        });
    }
    let tasks_kind = crate::kinds::resolve("tasks")?;
    let selector = format!("{APPLICATION_LABEL}={name}");
    let tasks = shown(
        client
            .list(tasks_kind, Some(&selector), None)
            .await
            .map(|list| list.items),
    )?;
    let succeeded = object.pointer("/status/phase").and_then(Value::as_str) == Some("Succeeded");
    let results = match succeeded {
        true => Some(shown(results::fetch_index(client, name).await)?),
        false => None,
    };
    Ok(Related {
        events,
        tasks: Some(tasks),
        results,
    })
}

/// The label that ties a task to its application.
const APPLICATION_LABEL: &str = "ceccm/application";

/// A server error as text to show in place; other failures end the command.
fn shown<T>(result: Result<T>) -> Result<Fetched<T>> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(e @ Error::Api { .. }) => Ok(Err(e.to_string())),
        Err(e) => Err(e),
    }
}

/// The events about this very object: those whose `involvedObject.uid` is its uid. Events are
/// found by kind and name, and an object deleted and created again under the same name would
/// otherwise show its predecessor's history. Events without a uid (servers before uids were
/// recorded) cannot be told apart and are kept; an object without a uid keeps all.
pub fn own_events(object: &Value, events: &[Value]) -> Vec<Value> {
    let uid = object.pointer("/metadata/uid").and_then(Value::as_str);
    events
        .iter()
        .filter(|e| {
            match (
                uid,
                e.pointer("/involvedObject/uid").and_then(Value::as_str),
            ) {
                (Some(uid), Some(theirs)) => uid == theirs,
                _ => true,
            }
        })
        .cloned()
        .collect()
}

/// The text of one object: metadata, spec, status, an application's stages, placements,
/// measured usage and results, then conditions and recent events.
pub fn render(kind: &str, object: &Value, related: &Related, now: i64) -> String {
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
    let application = kind == "Application";
    for (label, key) in [("Spec", "spec"), ("Status", "status")] {
        let mut section = object.get(key).cloned().unwrap_or(Value::Null);
        if let Value::Object(map) = &mut section {
            map.remove("conditions");
            if application && key == "status" {
                // Each has a section of its own below.
                for shown_below in ["stages", "progress", "placements", "explanation"] {
                    map.remove(shown_below);
                }
            }
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
    if application {
        out.push_str(&application_sections(object, related));
    }
    out.push_str(&conditions(object, now));
    let mut events = own_events(object, &related.events);
    crate::commands::sort_events(&mut events);
    let recent = &events[events.len().saturating_sub(RECENT_EVENTS)..];
    out.push_str(&events_section(recent, now));
    out
}

/// Stages (astro-fit), progress, placements with their predictions, the explanation of the
/// placement, what each region measured, and the results of a succeeded application.
fn application_sections(object: &Value, related: &Related) -> String {
    let status = |key: &str| object.pointer(&format!("/status/{key}"));
    let mut out = String::new();
    if let Some(stages) = status("stages").and_then(Value::as_array)
        && !stages.is_empty()
    {
        let text = stages
            .iter()
            .map(|s| {
                format!(
                    "{} {}/{}",
                    s.get("name").and_then(Value::as_str).unwrap_or("?"),
                    s.get("done").and_then(Value::as_u64).unwrap_or(0),
                    s.get("total").and_then(Value::as_u64).unwrap_or(0)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&field_line("Stages", &text));
    }
    out.push_str(&field_line("Progress", &progress(object)));
    out.push_str(&placements(object));
    match status("explanation").and_then(Value::as_str) {
        Some(text) if !text.trim().is_empty() => {
            out.push_str("Explanation:\n");
            for line in text.lines() {
                let line = line.trim_end();
                match line.is_empty() {
                    true => out.push('\n'),
                    false => out.push_str(&format!("  {line}\n")),
                }
            }
        }
        _ => out.push_str(&field_line("Explanation", "<none>")),
    }
    match &related.tasks {
        Some(Ok(tasks)) => out.push_str(&measured(tasks)),
        Some(Err(e)) => out.push_str(&field_line("Measured", &format!("<unavailable: {e}>"))),
        None => {}
    }
    match &related.results {
        Some(Ok(index)) if index.files.is_empty() => out.push_str(&field_line("Results", "<none>")),
        Some(Ok(index)) => {
            let mut rows = vec![
                ["Name", "Size"].map(String::from).to_vec(),
                ["----", "----"].map(String::from).to_vec(),
            ];
            rows.extend(
                index
                    .files
                    .iter()
                    .map(|f| vec![f.name.clone(), table::bytes(f.size as f64)]),
            );
            out.push_str(&indented("Results:", &rows));
        }
        Some(Err(e)) => out.push_str(&field_line("Results", &format!("<unavailable: {e}>"))),
        None => {}
    }
    out
}

/// `done/total tasks`, with failures.
fn progress(object: &Value) -> String {
    let count = |key: &str| {
        object
            .pointer(&format!("/status/progress/{key}"))
            .and_then(Value::as_u64)
    };
    match (count("done"), count("total")) {
        (Some(done), Some(total)) => match count("failed") {
            Some(failed) if failed > 0 => format!("{done}/{total} tasks done, {failed} failed"),
            _ => format!("{done}/{total} tasks done"),
        },
        _ => "<none>".into(),
    }
}

/// Where the scheduler placed the tasks and what it predicted each region would take.
fn placements(object: &Value) -> String {
    let Some(placements) = object
        .pointer("/status/placements")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
    else {
        return field_line("Placements", "<none>");
    };
    let mut rows = vec![
        ["Region", "Tasks", "Predicted Time", "Predicted Energy"]
            .map(String::from)
            .to_vec(),
        ["------", "-----", "--------------", "----------------"]
            .map(String::from)
            .to_vec(),
    ];
    for p in placements {
        let number = |key: &str| p.get(key).and_then(Value::as_f64);
        rows.push(vec![
            p.get("region")
                .and_then(Value::as_str)
                .unwrap_or("<none>")
                .to_string(),
            p.get("tasks")
                .and_then(Value::as_u64)
                .map_or_else(|| "<none>".into(), |t| t.to_string()),
            number("predictedSeconds").map_or_else(|| "<none>".into(), seconds),
            number("predictedJoules").map_or_else(|| "<none>".into(), joules),
        ]);
    }
    indented("Placements:", &rows)
}

/// What the application's tasks measured, per region they ran in: tasks, CPU time and energy,
/// summed from each task's status, with a total when several regions took part.
fn measured(tasks: &[Value]) -> String {
    let usage = usage_by_region(tasks);
    if usage.is_empty() {
        return field_line("Measured", "<none>");
    }
    let mut rows = vec![
        ["Region", "Tasks", "CPU Time", "Energy"]
            .map(String::from)
            .to_vec(),
        ["------", "-----", "--------", "------"]
            .map(String::from)
            .to_vec(),
    ];
    let row = |region: &str, u: &RegionUsage| {
        vec![
            region.to_string(),
            u.tasks.to_string(),
            seconds(u.cpu_seconds),
            joules(u.energy_joules),
        ]
    };
    let mut total = RegionUsage::default();
    for (region, u) in &usage {
        rows.push(row(region, u));
        total.tasks += u.tasks;
        total.cpu_seconds += u.cpu_seconds;
        total.energy_joules += u.energy_joules;
    }
    if usage.len() > 1 {
        rows.push(row("(total)", &total));
    }
    indented("Measured:", &rows)
}

/// What the tasks that ran in one region used.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RegionUsage {
    pub tasks: u32,
    pub cpu_seconds: f64,
    pub energy_joules: f64,
}

/// Sums `status.cpuSeconds` and `status.energyJoules` of the tasks over `status.region`, in
/// region name order. Tasks that never ran anywhere (no region yet) are left out.
pub fn usage_by_region(tasks: &[Value]) -> Vec<(String, RegionUsage)> {
    let mut by_region = std::collections::BTreeMap::<String, RegionUsage>::new();
    for task in tasks {
        let Some(region) = task
            .pointer("/status/region")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
        else {
            continue;
        };
        let number = |key: &str| {
            task.pointer(&format!("/status/{key}"))
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
        };
        let usage = by_region.entry(region.to_string()).or_default();
        usage.tasks += 1;
        usage.cpu_seconds += number("cpuSeconds");
        usage.energy_joules += number("energyJoules");
    }
    by_region.into_iter().collect()
}

/// Seconds with one decimal below a minute (`12.5s`), else as AGE writes durations (`3m20s`).
fn seconds(value: f64) -> String {
    if value < 60.0 {
        format!("{value:.1}s")
    } else {
        crate::time::human_duration(value.round() as i64)
    }
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

/// A table under a title, indented by two. A last cell of several lines (a condition's message
/// that explains a placement) continues under its own column rather than at the margin.
fn indented(title: &str, rows: &[Vec<String>]) -> String {
    let first_lines: Vec<Vec<String>> = rows
        .iter()
        .map(|row| match row.split_last() {
            Some((last, rest)) => {
                let mut row = rest.to_vec();
                row.push(last.lines().next().unwrap_or_default().to_string());
                row
            }
            None => Vec::new(),
        })
        .collect();
    let widths = table::widths(&first_lines);
    let last_column = widths.len().saturating_sub(1);
    let margin = 2 + widths[..last_column].iter().map(|w| w + 3).sum::<usize>();
    let mut out = format!("{title}\n");
    for (row, first) in rows.iter().zip(&first_lines) {
        out.push_str(&format!("  {}\n", table::line(first, &widths)));
        let continued = row.last().map(|last| last.lines().skip(1));
        for line in continued.into_iter().flatten() {
            out.push_str(&format!("{:margin$}{}\n", "", line.trim_end()));
        }
    }
    out
}

/// Energy as describe writes it: with a decimal while small (`4.7J`), where the tables' whole
/// joules would round the energy of a short job away, then with SI prefixes (`35kJ`).
fn joules(value: f64) -> String {
    if value.abs() < 99.95 {
        format!("{value:.1}J")
    } else {
        table::si(value, "J")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_rfc3339;
    use serde_json::json;

    fn with_events(events: Vec<Value>) -> Related {
        Related {
            events,
            ..Related::default()
        }
    }

    #[test]
    fn an_application_reads_like_kubectl_describe() {
        let now = parse_rfc3339("2026-11-21T12:00:00Z").unwrap();
        let app = json!({
            "apiVersion": "ceccm/v1", "kind": "Application",
            "metadata": {"name": "m51", "uid": "u-1", "resourceVersion": "42", "generation": 2,
                         "labels": {"survey": "manga", "team": "ifs"},
                         "creationTimestamp": "2026-11-21T11:55:00Z",
                         "finalizers": ["ceccm/release"]},
            "spec": {"app": "container", "parallelism": 4},
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
        let text = render("Application", &app, &with_events(events), now);
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
  app: container
  parallelism: 4
Status:
  phase: Running
Progress:         <none>
Placements:       <none>
Explanation:      <none>
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

    fn task(region: Option<&str>, cpu: f64, joules: f64) -> Value {
        json!({"metadata": {"labels": {"ceccm/application": "m51"}},
               "status": {"state": "Done", "region": region, "cpuSeconds": cpu,
                          "energyJoules": joules}})
    }

    #[test]
    fn an_astro_fit_application_shows_stages_placements_usage_and_results() {
        let now = parse_rfc3339("2026-11-21T12:00:00Z").unwrap();
        let app = json!({
            "kind": "Application",
            "metadata": {"name": "m51", "uid": "u-2", "creationTimestamp": "2026-11-21T11:55:00Z"},
            "spec": {"app": "astro-fit"},
            "status": {
                "phase": "Succeeded",
                "stages": [{"name": "prepare", "done": 1, "total": 1},
                           {"name": "fit", "done": 9, "total": 9},
                           {"name": "assemble", "done": 1, "total": 1}],
                "progress": {"done": 11, "failed": 1, "total": 11},
                "placements": [
                    {"region": "edge-caha", "tasks": 8, "predictedSeconds": 95.0,
                     "predictedJoules": 3210.0},
                    {"region": "cloud-a", "tasks": 3, "predictedSeconds": 12.34}],
                "explanation": "objective energy\n\nedge-caha: cheapest per chunk",
                "energyJoules": 4100.0,
                "results": "/api/v1/applications/m51/results"
            }
        });
        let tasks = vec![
            task(Some("edge-caha"), 10.0, 1000.0),
            task(Some("edge-caha"), 30.5, 2000.0),
            task(Some("cloud-a"), 80.0, 1100.0),
            task(None, 0.0, 0.0),
        ];
        let index = results::parse_index(json!({"files": [
            {"name": "maps.fits", "size": 1_258_291, "sha256": "a"},
            {"name": "summary.json", "size": 912, "sha256": "b"}]}))
        .unwrap();
        let event = |uid: &str, reason: &str| {
            json!({"type": "Normal", "reason": reason, "message": reason,
                   "involvedObject": {"kind": "Application", "name": "m51", "uid": uid},
                   "lastTimestamp": "2026-11-21T11:59:00Z"})
        };
        let related = Related {
            events: vec![event("u-1", "OfTheDeletedOne"), event("u-2", "Completed")],
            tasks: Some(Ok(tasks)),
            results: Some(Ok(index)),
        };
        let text = render("Application", &app, &related, now);
        let after_status = text
            .split_once("Status:\n")
            .map(|(_, rest)| rest)
            .expect("a status section");
        let expected = "  energyJoules: 4100.0
  phase: Succeeded
  results: /api/v1/applications/m51/results
Stages:           prepare 1/1, fit 9/9, assemble 1/1
Progress:         11/11 tasks done, 1 failed
Placements:
  Region      Tasks   Predicted Time   Predicted Energy
  ------      -----   --------------   ----------------
  edge-caha   8       95s              3.2kJ
  cloud-a     3       12.3s            <none>
Explanation:
  objective energy

  edge-caha: cheapest per chunk
Measured:
  Region      Tasks   CPU Time   Energy
  ------      -----   --------   ------
  cloud-a     1       80s        1.1kJ
  edge-caha   2       40.5s      3kJ
  (total)     3       2m1s       4.1kJ
Results:
  Name           Size
  ----           ----
  maps.fits      1.2MiB
  summary.json   912B
Conditions:       <none>
Events:
  Type     Reason      Age   Message
  ----     ------      ---   -------
  Normal   Completed   60s   Completed
";
        assert_eq!(after_status, expected, "{text}");
    }

    #[test]
    fn extras_the_server_refused_are_shown_in_place() {
        let app = json!({"metadata": {"name": "m51"}, "status": {"phase": "Succeeded"}});
        let related = Related {
            tasks: Some(Err("Error from server (Forbidden): no".into())),
            results: Some(Err("Error from server (NotFound): gone".into())),
            ..Related::default()
        };
        let text = render("Application", &app, &related, 0);
        assert!(
            text.contains("Measured:         <unavailable: Error from server (Forbidden): no>\n"),
            "{text}"
        );
        assert!(
            text.contains("Results:          <unavailable: Error from server (NotFound): gone>\n"),
            "{text}"
        );
        let empty = Related {
            tasks: Some(Ok(vec![])),
            results: Some(Ok(results::Index::default())),
            ..Related::default()
        };
        let text = render("Application", &app, &empty, 0);
        assert!(text.contains("Measured:         <none>\n"), "{text}");
        assert!(text.contains("Results:          <none>\n"), "{text}");
    }

    #[test]
    fn a_message_of_several_lines_continues_under_its_column() {
        let app = json!({"metadata": {"name": "m51"}, "status": {"conditions": [
            {"type": "Scheduled", "status": "True", "reason": "Scheduled",
             "message": "objective balanced: 9 tasks\n  edge: 9 tasks  \n  cloud: 0 tasks"},
            {"type": "Planned", "status": "True", "reason": "ChunksPlanned",
             "message": "9 chunks"}]}});
        let text = render("Application", &app, &Related::default(), 0);
        let conditions = text.split_once("Conditions:\n").expect("conditions").1;
        assert!(
            conditions.starts_with(
                "  Type        Status   Reason          Last Transition   Message
  ----        ------   ------          ---------------   -------
  Scheduled   True     Scheduled                         objective balanced: 9 tasks
                                                           edge: 9 tasks
                                                           cloud: 0 tasks
  Planned     True     ChunksPlanned                     9 chunks
"
            ),
            "{text}"
        );
    }

    #[test]
    fn small_energies_keep_a_decimal() {
        assert_eq!(joules(3.18), "3.2J");
        assert_eq!(joules(47.0), "47.0J");
        assert_eq!(joules(120.0), "120J");
        assert_eq!(joules(35_210.0), "35kJ");
    }

    #[test]
    fn only_events_of_this_very_object_are_shown() {
        let object = json!({"metadata": {"name": "m51", "uid": "new"}});
        let events = vec![
            json!({"reason": "a", "involvedObject": {"name": "m51", "uid": "old"}}),
            json!({"reason": "b", "involvedObject": {"name": "m51", "uid": "new"}}),
            json!({"reason": "c", "involvedObject": {"name": "m51"}}),
        ];
        let reasons = |kept: Vec<Value>| -> Vec<String> {
            kept.iter()
                .map(|e| e["reason"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(reasons(own_events(&object, &events)), ["b", "c"]);
        let without_uid = json!({"metadata": {"name": "m51"}});
        assert_eq!(reasons(own_events(&without_uid, &events)), ["a", "b", "c"]);
        // And describe of any kind goes through it.
        let region = json!({"metadata": {"name": "m51", "uid": "new"}});
        let text = render("Region", &region, &with_events(events), 0);
        assert!(!text.contains(" a "), "{text}");
    }

    #[test]
    fn usage_sums_per_region_leaving_out_tasks_that_never_ran() {
        let tasks = [
            task(Some("b"), 1.5, 10.0),
            task(Some("a"), 2.0, 5.0),
            task(Some("b"), 0.5, 2.5),
            task(None, 9.0, 9.0),
        ];
        assert_eq!(
            usage_by_region(&tasks),
            [
                (
                    "a".to_string(),
                    RegionUsage {
                        tasks: 1,
                        cpu_seconds: 2.0,
                        energy_joules: 5.0
                    }
                ),
                (
                    "b".to_string(),
                    RegionUsage {
                        tasks: 2,
                        cpu_seconds: 2.0,
                        energy_joules: 12.5
                    }
                ),
            ]
        );
    }

    #[test]
    fn an_object_without_status_or_events_says_none() {
        let text = render(
            "Dataset",
            &json!({"metadata": {"name": "cube"}}),
            &Related::default(),
            0,
        );
        assert!(text.contains("Spec: <none>\nStatus: <none>\n"), "{text}");
        assert!(text.contains("Conditions:       <none>\n"), "{text}");
        assert!(text.ends_with("Events:           <none>\n"), "{text}");
    }
}
