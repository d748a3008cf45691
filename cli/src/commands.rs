//! `get`, `delete`, `logs` and `top`.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::Client;
use crate::error::{Error, Result, failed, usage};
use crate::kinds::{self, KindInfo};
use crate::manifest;
use crate::output::{self, Format};
use crate::table;
use crate::time::now_unix;

pub struct GetOptions {
    pub kind: String,
    pub names: Vec<String>,
    pub selector: Option<String>,
    pub field_selector: Option<String>,
    pub format: Format,
    pub watch: bool,
}

/// `KIND NAME...` or `KIND/NAME` into a kind and names.
pub fn targets(kind: &str, names: &[String]) -> Result<(&'static KindInfo, Vec<String>)> {
    let (info, name) = kinds::split_ref(kind)?;
    match name {
        Some(_) if !names.is_empty() => Err(usage!(
            "there is no need to give names after KIND/NAME: \"{kind}\" already names one"
        )),
        Some(name) => Ok((info, vec![name.to_string()])),
        None => Ok((info, names.to_vec())),
    }
}

/// Objects named as `KIND/NAME...`, `KIND NAME...`, or a lone `NAME` that is not a kind, which
/// names an application (as `logs NAME` does): the spellings of commands that act on
/// applications.
fn object_refs(words: &[String]) -> Result<Vec<(&'static KindInfo, String)>> {
    let Some(first) = words.first() else {
        return Err(usage!(
            "name the application: application/NAME, application NAME or NAME"
        ));
    };
    if first.contains('/') {
        return words
            .iter()
            .map(|word| match kinds::split_ref(word)? {
                (kind, Some(name)) => Ok((kind, name.to_string())),
                (_, None) => Err(usage!(
                    "\"{word}\" is not KIND/NAME: write every object as KIND/NAME, or KIND NAME..."
                )),
            })
            .collect();
    }
    match kinds::resolve(first) {
        Ok(kind) if words.len() == 1 => Err(usage!(
            "name the {} after \"{first}\": {first} NAME or {first}/NAME",
            kind.singular
        )),
        Ok(kind) => Ok(words[1..].iter().map(|n| (kind, n.clone())).collect()),
        Err(_) if words.len() == 1 => Ok(vec![(kinds::resolve("application")?, first.clone())]),
        Err(e) => Err(e),
    }
}

/// The names of the applications `words` name (see [`object_refs`]); any other kind is a usage
/// error saying why (`what` completes "only applications ...").
pub fn application_names(words: &[String], what: &str) -> Result<Vec<String>> {
    object_refs(words)?
        .into_iter()
        .map(|(kind, name)| match kind.kind {
            "Application" => Ok(name),
            _ => Err(usage!(
                "only applications {what}, not {}/{name}",
                kind.plural
            )),
        })
        .collect()
}

/// What `cancel` and `retry` ask the server to do to an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppAction {
    /// Stop its workers, keep its finished chunks; phase `Cancelled`.
    Cancel,
    /// Queue its dead-lettered tasks again with fresh attempts and run it again.
    Retry,
}

impl AppAction {
    /// The last segment of `POST /api/v1/applications/{name}/{action}`.
    fn segment(self) -> &'static str {
        match self {
            AppAction::Cancel => "cancel",
            AppAction::Retry => "retry",
        }
    }

    fn done(self) -> &'static str {
        match self {
            AppAction::Cancel => "cancelled",
            AppAction::Retry => "retried",
        }
    }
}

/// `cancel` and `retry`: one POST per application, `application/NAME cancelled` for each that
/// the server accepted. Like `delete`, a refused one (404, 409 when there is nothing to do)
/// does not stop the others; the command fails at the end.
pub async fn act(client: &Client, action: AppAction, words: &[String]) -> Result<()> {
    let names = application_names(words, &format!("can be {}", action.done()))?;
    let mut failures = Vec::new();
    for name in names {
        let path = format!(
            "applications/{}/{}",
            crate::client::encode(&name),
            action.segment()
        );
        match client.post_path(&path, &serde_json::json!({})).await {
            Ok(_) => output::print(&format!("application/{name} {}\n", action.done()))?,
            Err(e @ Error::Api { .. }) => failures.push(e),
            Err(e) => return Err(e),
        }
    }
    match last_failure(failures) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub async fn get(client: &Client, options: &GetOptions) -> Result<()> {
    let (kind, names) = targets(&options.kind, &options.names)?;
    let now = now_unix();
    let (objects, resource_version, failure) = if names.is_empty() {
        let mut list = client
            .list(
                kind,
                options.selector.as_deref(),
                options.field_selector.as_deref(),
            )
            .await?;
        if kind.kind == "Event" {
            sort_events(&mut list.items);
        }
        (list.items, list.resource_version, None)
    } else {
        // Like kubectl: print what exists, report what does not, and fail at the end.
        let mut found = Vec::new();
        let mut failures = Vec::new();
        for name in &names {
            match client.get(kind, name).await {
                Ok(object) => found.push(object),
                Err(e @ Error::Api { .. }) => failures.push(e),
                Err(e) => return Err(e),
            }
        }
        let failure = last_failure(failures);
        let newest = found
            .iter()
            .filter_map(|o| {
                o.pointer("/metadata/resourceVersion")?
                    .as_str()?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .map(|rv| rv.to_string());
        (found, newest, failure)
    };
    let single = names.len() == 1;
    let mut widths = Vec::new();
    match options.format {
        // Scripts reading JSON or YAML get an empty List rather than nothing.
        Format::Json | Format::Yaml if names.is_empty() || !objects.is_empty() => {
            let text = output::objects(kind, &objects, options.format, single, now)?;
            output::print(&text)?;
        }
        _ if objects.is_empty() => {
            if failure.is_none() && !options.watch {
                eprintln!("No resources found.");
            }
        }
        Format::Table | Format::Wide => {
            let columns = table::columns(kind, options.format == Format::Wide);
            let rows = table::rows(&columns, &objects, now);
            widths = table::widths(&rows);
            output::print(&table::render(&rows))?;
        }
        _ => output::print(&output::objects(
            kind,
            &objects,
            options.format,
            single,
            now,
        )?)?,
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if options.watch {
        return watch(
            client,
            kind,
            &names,
            options,
            &objects,
            resource_version,
            widths,
        )
        .await;
    }
    Ok(())
}

/// Prints all failures but the last, which is returned for `main` to print and exit with.
fn last_failure(mut failures: Vec<Error>) -> Option<Error> {
    let last = failures.pop();
    for e in &failures {
        eprintln!("{}", output::error_line(e));
    }
    last
}

/// Oldest first, like kubectl. Whole seconds first (offsets may differ), then the text, which
/// orders the fractions of one second.
pub fn sort_events(events: &mut [Value]) {
    events.sort_by_cached_key(|e| {
        let text = e
            .get("lastTimestamp")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        (crate::time::parse_rfc3339(&text), text)
    });
}

/// Follows the watch stream, printing each change as `get` prints objects. A closed stream is
/// reopened from the last resourceVersion seen; `410 Gone` starts over from a fresh list.
async fn watch(
    client: &Client,
    kind: &KindInfo,
    names: &[String],
    options: &GetOptions,
    listed: &[Value],
    mut resource_version: Option<String>,
    mut widths: Vec<usize>,
) -> Result<()> {
    let columns = table::columns(kind, options.format == Format::Wide);
    let mut header_printed = !widths.is_empty();
    let mut changes = ChangeFilter::default();
    for object in listed {
        let identity = watch_identity(kind, &columns, options.format, object)?;
        changes.should_print("ADDED", object_name(object), identity);
    }
    loop {
        let mut stream = match client
            .watch(
                kind,
                options.selector.as_deref(),
                resource_version.as_deref(),
            )
            .await
        {
            Ok(stream) => stream,
            Err(Error::Api { status: 410, .. }) => {
                resource_version = None;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut events = 0usize;
        loop {
            let event = match stream.next().await {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(Error::Api { status: 410, .. }) => {
                    resource_version = None;
                    break;
                }
                Err(e) => return Err(e),
            };
            events += 1;
            let object = event.object;
            if let Some(rv) = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            {
                resource_version = Some(rv.to_string());
            }
            let name = object_name(&object);
            if !names.is_empty() && !names.iter().any(|n| n == name) {
                continue;
            }
            let identity = watch_identity(kind, &columns, options.format, &object)?;
            if !changes.should_print(&event.kind, name, identity) {
                continue;
            }
            let text = match options.format {
                Format::Table | Format::Wide => {
                    let mut rows = table::rows(&columns, std::slice::from_ref(&object), now_unix());
                    let row_widths = table::widths(&rows);
                    widths = merge_widths(&widths, &row_widths);
                    if header_printed {
                        rows.remove(0);
                    }
                    header_printed = true;
                    rows.iter()
                        .map(|r| table::line(r, &widths) + "\n")
                        .collect()
                }
                Format::Json => output::to_json(&object)?,
                Format::Yaml => format!("---\n{}", output::to_yaml(&object)?),
                Format::Name => output::reference(kind, &object) + "\n",
            };
            output::print(&text)?;
        }
        if events == 0 {
            // A server that closes watches at once must not be hammered.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn object_name(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// What a watched object prints as, for comparing with what was printed last: a table row
/// without the clock's part (see [`table::row_identity`]), or the whole text of other formats.
fn watch_identity(
    kind: &KindInfo,
    columns: &[&kinds::Column],
    format: Format,
    object: &Value,
) -> Result<Vec<String>> {
    Ok(match format {
        Format::Table | Format::Wide => table::row_identity(columns, object),
        Format::Json => vec![output::to_json(object)?],
        Format::Yaml => vec![output::to_yaml(object)?],
        Format::Name => vec![output::reference(kind, object)],
    })
}

/// Which watch events print. kubectl prints a row when what it shows changed, not on every
/// write to the object: heartbeats, energy counters and other fields a table does not show
/// (or shows rounded) change far more often than the row. Keyed by object name.
#[derive(Debug, Default)]
struct ChangeFilter {
    printed: std::collections::HashMap<String, Vec<String>>,
}

impl ChangeFilter {
    /// Whether an event of type `event` (`ADDED`, `MODIFIED`, `DELETED`) about `name`, printing
    /// as `identity`, is news. A deletion always prints and forgets the name, so that an object
    /// created again under the same name prints again.
    fn should_print(&mut self, event: &str, name: &str, identity: Vec<String>) -> bool {
        if event == "DELETED" {
            self.printed.remove(name);
            return true;
        }
        if self.printed.get(name) == Some(&identity) {
            return false;
        }
        self.printed.insert(name.to_string(), identity);
        true
    }
}

fn merge_widths(a: &[usize], b: &[usize]) -> Vec<usize> {
    (0..a.len().max(b.len()))
        .map(|i| {
            a.get(i)
                .copied()
                .unwrap_or(0)
                .max(b.get(i).copied().unwrap_or(0))
        })
        .collect()
}

pub struct DeleteOptions {
    pub kind: Option<String>,
    pub names: Vec<String>,
    pub files: Vec<String>,
    pub wait: bool,
    pub timeout: Duration,
    pub ignore_not_found: bool,
    pub dry_run: bool,
}

pub async fn delete(client: &Client, options: &DeleteOptions) -> Result<()> {
    let targets: Vec<(&KindInfo, String)> = match &options.kind {
        Some(kind) => {
            let (kind, names) = targets(kind, &options.names)?;
            if names.is_empty() {
                return Err(usage!("name the {} objects to delete", kind.singular));
            }
            names.into_iter().map(|n| (kind, n)).collect()
        }
        None if options.files.is_empty() => {
            return Err(usage!("give KIND NAME, KIND/NAME or -f FILE"));
        }
        None => manifest::read_all(&options.files)?
            .into_iter()
            .map(|d| manifest::validate(d).map(|m| (m.kind, m.name)))
            .collect::<Result<_>>()?,
    };
    if let Some((kind, _)) = targets.iter().find(|(k, _)| !k.writable) {
        return Err(usage!("{} objects are read-only", kind.kind));
    }
    let mut failures = Vec::new();
    for (kind, name) in targets {
        let reference = format!("{}/{name}", kind.singular);
        let object = match client.delete(kind, &name, options.dry_run).await {
            Ok(object) => object,
            Err(e) if e.is_not_found() && options.ignore_not_found => continue,
            Err(e @ Error::Api { .. }) => {
                failures.push(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        if options.dry_run {
            output::print(&format!("{reference} deleted (server dry run)\n"))?;
            continue;
        }
        if !options.wait {
            let pending = finalizers(&object);
            let text = if pending.is_empty() {
                format!("{reference} deleted\n")
            } else {
                format!(
                    "{reference} deletion requested (finalizers pending: {})\n",
                    pending.join(", ")
                )
            };
            output::print(&text)?;
            continue;
        }
        wait_until_gone(client, kind, &name, options.timeout).await?;
        output::print(&format!("{reference} deleted\n"))?;
    }
    match last_failure(failures) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn finalizers(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_until_gone(
    client: &Client,
    kind: &KindInfo,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let still_there = match client.get(kind, name).await {
            Ok(object) => object,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        if Instant::now() >= deadline {
            return Err(failed!(
                "{}/{name} is still being deleted after {}s (finalizers: {}); \
                 check `ceccmctl describe {} {name}`",
                kind.singular,
                timeout.as_secs(),
                finalizers(&still_there).join(", "),
                kind.singular
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `30s`, `5m`, `1h`, `250ms`, or a number of seconds.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a duration such as 30s, 5m or 1h"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => return Ok(Duration::from_millis(value)),
        "m" => value * 60,
        "h" => value * 3600,
        _ => {
            return Err(format!(
                "\"{text}\" is not a duration such as 30s, 5m or 1h"
            ));
        }
    };
    Ok(Duration::from_secs(seconds))
}

pub async fn logs(client: &Client, target: &str, task: Option<&str>, follow: bool) -> Result<()> {
    let (kind, name) = match target.split_once('/') {
        Some(_) => kinds::split_ref(target)?,
        None => (kinds::resolve("application")?, Some(target)),
    };
    if kind.kind != "Application" {
        return Err(usage!(
            "logs are kept per application: write application/NAME, not {target}"
        ));
    }
    let name = name.unwrap_or_default();
    let task = task.map(|t| task_name(name, t));
    let mut query = Vec::new();
    if let Some(task) = &task {
        query.push(("task", task.as_str()));
    }
    if follow {
        query.push(("follow", "true"));
    }
    let path = format!("applications/{}/logs", crate::client::encode(name));
    let mut response = client.stream(&path, &query).await?;
    while let Some(chunk) = client.chunk(&mut response).await? {
        output::print_bytes(&chunk)?;
    }
    Ok(())
}

/// A task given by index (`3`) becomes its name (`m51-00003`); a name stays as given.
pub fn task_name(application: &str, task: &str) -> String {
    match task.parse::<u32>() {
        Ok(index) => format!("{application}-{index:05}"),
        Err(_) => task.to_string(),
    }
}

pub async fn top(client: &Client, kind: &str) -> Result<()> {
    if kind == "predictor" {
        let report = client.get_path("predictor").await?;
        return output::print(&table::render(&predictor_rows(&report)));
    }
    let kind = kinds::resolve(kind)?;
    let columns = top_columns(kind)?;
    let list = client.list(kind, None, None).await?;
    if list.items.is_empty() {
        eprintln!("No resources found.");
        return Ok(());
    }
    let columns: Vec<&kinds::Column> = columns.iter().collect();
    output::print(&table::render(&table::rows(
        &columns,
        &list.items,
        now_unix(),
    )))
}

/// The placement predictor as one table row: what it learned from and how wrong it is.
fn predictor_rows(report: &Value) -> Vec<Vec<String>> {
    let percent = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |m| format!("{:.1}%", 100.0 * m))
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let header = [
        "STATE",
        "SAMPLES",
        "MODEL",
        "RUNTIME-MAPE",
        "ENERGY-MAPE",
        "PRIOR-MAPE",
    ];
    vec![
        header.iter().map(|h| h.to_string()).collect(),
        vec![
            text(&report["state"]),
            format!(
                "{}/{}",
                text(&report["samples"]),
                text(&report["minSamples"])
            ),
            text(&report["model"]),
            percent(&report["runtimeMape"]),
            percent(&report["energyMape"]),
            percent(&report["priorRuntimeMape"]),
        ],
    ]
}

fn top_columns(kind: &KindInfo) -> Result<&'static [kinds::Column]> {
    kinds::TOP
        .iter()
        .find(|(k, _)| *k == kind.kind)
        .map(|(_, columns)| *columns)
        .ok_or_else(|| {
            usage!(
                "top shows regions, applications and the predictor, not {}",
                kind.plural
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_accept_both_spellings() {
        let (kind, names) = targets("app/m51", &[]).unwrap();
        assert_eq!((kind.kind, names), ("Application", vec!["m51".to_string()]));
        let (kind, names) = targets("rg", &["a".into(), "b".into()]).unwrap();
        assert_eq!((kind.kind, names.len()), ("Region", 2));
        assert!(matches!(
            targets("app/m51", &["x".into()]),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn the_predictor_shows_its_state_samples_and_error() {
        let prior = serde_json::json!({"state": "prior", "trained": false, "samples": 12,
            "minSamples": 60, "trainings": 0, "model": "analytic-prior"});
        assert_eq!(
            table::render(&predictor_rows(&prior)),
            "STATE   SAMPLES   MODEL            RUNTIME-MAPE   ENERGY-MAPE   PRIOR-MAPE\n\
             prior   12/60     analytic-prior   -              -             -\n"
        );
        let learned = serde_json::json!({"state": "learned", "trained": true, "samples": 80,
            "minSamples": 60, "trainings": 1, "model": "linear-regression-log",
            "runtimeMape": 0.0123, "priorRuntimeMape": 0.5});
        assert_eq!(
            predictor_rows(&learned)[1],
            [
                "learned",
                "80/60",
                "linear-regression-log",
                "1.2%",
                "-",
                "50.0%"
            ]
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("12"), Ok(Duration::from_secs(12)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn task_indexes_become_names() {
        assert_eq!(task_name("m51", "3"), "m51-00003");
        assert_eq!(task_name("m51", "m51-00007"), "m51-00007");
    }

    #[test]
    fn events_sort_by_last_timestamp() {
        let mut events = vec![
            serde_json::json!({"lastTimestamp": "2026-11-21T10:00:05Z", "reason": "c"}),
            serde_json::json!({"lastTimestamp": "2026-11-21T10:00:01.900Z", "reason": "b"}),
            serde_json::json!({"lastTimestamp": "2026-11-21T10:00:01.200Z", "reason": "a"}),
        ];
        sort_events(&mut events);
        let reasons: Vec<&str> = events
            .iter()
            .map(|e| e["reason"].as_str().unwrap())
            .collect();
        assert_eq!(reasons, ["a", "b", "c"]);
    }

    #[test]
    fn top_is_for_regions_and_applications() {
        assert!(top_columns(kinds::resolve("rg").unwrap()).is_ok());
        assert!(top_columns(kinds::resolve("apps").unwrap()).is_ok());
        assert!(matches!(
            top_columns(kinds::resolve("ds").unwrap()),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn widths_merge_to_the_widest() {
        assert_eq!(merge_widths(&[3, 5], &[4, 2, 7]), vec![4, 5, 7]);
    }

    #[test]
    fn a_watch_prints_an_object_again_only_when_its_row_changed() {
        let mut filter = ChangeFilter::default();
        let row = |phase: &str| vec!["m51".to_string(), phase.to_string()];
        assert!(filter.should_print("ADDED", "m51", row("Pending")));
        assert!(!filter.should_print("MODIFIED", "m51", row("Pending")));
        assert!(filter.should_print("ADDED", "m52", row("Pending")));
        assert!(filter.should_print("MODIFIED", "m51", row("Running")));
        assert!(!filter.should_print("MODIFIED", "m51", row("Running")));
        // A deletion prints even when the row reads the same, and a re-created object too.
        assert!(filter.should_print("DELETED", "m51", row("Running")));
        assert!(filter.should_print("ADDED", "m51", row("Running")));
        // A watch reopened after 410 Gone sends every object as ADDED again: unchanged, silent.
        assert!(!filter.should_print("ADDED", "m52", row("Pending")));
    }

    #[test]
    fn the_identity_of_a_watched_object_follows_the_output_format() {
        let kind = kinds::resolve("apps").unwrap();
        let columns = table::columns(kind, false);
        let app = serde_json::json!({"metadata": {"name": "m51", "resourceVersion": "7",
                                                  "creationTimestamp": "2026-11-21T11:57:00Z"},
                                     "status": {"phase": "Running", "energyJoules": 10.0}});
        let mut later = app.clone();
        later["metadata"]["resourceVersion"] = serde_json::json!("8");
        later["status"]["energyJoules"] = serde_json::json!(10.2);
        let identity =
            |format, object: &Value| watch_identity(kind, &columns, format, object).unwrap();
        assert_eq!(
            identity(Format::Table, &app),
            identity(Format::Table, &later)
        );
        assert_eq!(identity(Format::Name, &app), identity(Format::Name, &later));
        // JSON and YAML print the whole object: every change is a change of what they print.
        assert_ne!(identity(Format::Json, &app), identity(Format::Json, &later));
        assert_ne!(identity(Format::Yaml, &app), identity(Format::Yaml, &later));
    }

    #[test]
    fn commands_on_applications_take_every_spelling() {
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let names = |w: &[&str]| application_names(&words(w), "can be cancelled");
        for spelling in [
            &["app/m51"][..],
            &["application/m51"],
            &["applications", "m51"],
            &["app", "m51"],
            &["m51"],
        ] {
            assert_eq!(names(spelling).unwrap(), ["m51"], "{spelling:?}");
        }
        assert_eq!(names(&["apps", "a", "b"]).unwrap(), ["a", "b"]);
        assert_eq!(names(&["app/a", "application/b"]).unwrap(), ["a", "b"]);
        for bad in [
            &[][..],
            &["app"],
            &["rg/edge"],
            &["ds", "cube"],
            &["app/a", "b"],
            &["pods", "x"],
            &["app/"],
        ] {
            assert!(matches!(names(bad), Err(Error::Usage(_))), "{bad:?}");
        }
        let text = names(&["rg/edge"]).unwrap_err().to_string();
        assert_eq!(text, "only applications can be cancelled, not regions/edge");
    }
}
