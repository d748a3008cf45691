//! Tables as kubectl prints them: upper-case headers, left-aligned columns separated by at least
//! three spaces, `<none>` for what an object does not have, and no trailing blanks.

use serde_json::Value;

use crate::kinds::{Cell, Column, Format, KindInfo};
use crate::time;

const NONE: &str = "<none>";
const PADDING: usize = 3;

/// The columns shown for a kind, with or without the `-o wide` ones.
pub fn columns(kind: &KindInfo, wide: bool) -> Vec<&'static Column> {
    kind.columns.iter().filter(|c| wide || !c.wide).collect()
}

/// Header and one row per object.
pub fn rows(columns: &[&Column], objects: &[Value], now: i64) -> Vec<Vec<String>> {
    let header = columns.iter().map(|c| c.header.to_string()).collect();
    std::iter::once(header)
        .chain(
            objects
                .iter()
                .map(|o| columns.iter().map(|c| cell(o, c.cell, now)).collect()),
        )
        .collect()
}

/// A row as it reads at any time: what `rows` prints for the object, except that age cells
/// carry their timestamp instead of the time since it. Two identities differ only when the
/// printed row would differ for a reason other than the clock, which is what `get -w` compares
/// to decide whether a change is worth a new line (an AGE column changes by itself; a new
/// `lastTimestamp` of an event does not).
pub fn row_identity(columns: &[&Column], object: &Value) -> Vec<String> {
    columns
        .iter()
        .map(|c| match c.cell {
            Cell::Age(pointer) => object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or(NONE)
                .to_string(),
            // `now` only matters to age cells, handled above.
            other => cell(object, other, 0),
        })
        .collect()
}

/// Width of each column over these rows.
pub fn widths(rows: &[Vec<String>]) -> Vec<usize> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect()
}

/// One line: every cell but the last padded to its column's width plus the gutter.
pub fn line(row: &[String], widths: &[usize]) -> String {
    let mut out = String::new();
    for (i, cell) in row.iter().enumerate() {
        if i + 1 == row.len() {
            out.push_str(cell);
        } else {
            let width = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .max(cell.chars().count());
            out.push_str(cell);
            out.extend(std::iter::repeat_n(
                ' ',
                width - cell.chars().count() + PADDING,
            ));
        }
    }
    out.truncate(out.trim_end().len());
    out
}

/// All rows, aligned, one line each with a final newline.
pub fn render(rows: &[Vec<String>]) -> String {
    let widths = widths(rows);
    rows.iter()
        .map(|r| line(r, &widths) + "\n")
        .collect::<String>()
}

/// The text of one cell.
pub fn cell(object: &Value, cell: Cell, now: i64) -> String {
    let text = match cell {
        Cell::Name => object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_string),
        Cell::Field(pointer, format) => object.pointer(pointer).and_then(|v| formatted(v, format)),
        Cell::Age(pointer) => object
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(|t| time::age(t, now)),
        Cell::Ready => ready(object),
        Cell::Cpu => cpu(object),
        Cell::Progress => progress(object),
        Cell::PlacementRegions => placement_regions(object),
        Cell::InvolvedObject => involved_object(object),
    };
    text.filter(|t| !t.is_empty())
        .unwrap_or_else(|| NONE.to_string())
}

fn formatted(value: &Value, format: Format) -> Option<String> {
    match (format, value) {
        (_, Value::Null) => None,
        (Format::Percent, v) => v.as_f64().map(|f| format!("{:.0}%", f * 100.0)),
        (Format::Watts, v) => v.as_f64().map(|f| si(f, "W")),
        (Format::Joules, v) => v.as_f64().map(|f| si(f, "J")),
        (Format::Bytes, v) => v.as_f64().map(bytes),
        (Format::Count, Value::Array(items)) => Some(items.len().to_string()),
        (Format::ShortHash, Value::String(s)) => Some(s.chars().take(12).collect()),
        (_, Value::String(s)) => Some(s.clone()),
        (_, other) => Some(other.to_string()),
    }
}

/// A quantity with an SI prefix: `950W`, `1.2kW`, `35kJ`, `4.1MJ`.
pub fn si(value: f64, unit: &str) -> String {
    const PREFIXES: [&str; 6] = ["", "k", "M", "G", "T", "P"];
    let mut scaled = value;
    let mut prefix = 0;
    while scaled.abs() >= 999.5 && prefix + 1 < PREFIXES.len() {
        scaled /= 1000.0;
        prefix += 1;
    }
    scaled_number(scaled, prefix > 0) + PREFIXES[prefix] + unit
}

/// A byte count with a binary prefix: `512B`, `1.5KiB`, `20MiB`.
pub fn bytes(value: f64) -> String {
    const PREFIXES: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut scaled = value;
    let mut prefix = 0;
    while scaled.abs() >= 1023.5 && prefix + 1 < PREFIXES.len() {
        scaled /= 1024.0;
        prefix += 1;
    }
    scaled_number(scaled, prefix > 0) + PREFIXES[prefix]
}

/// One decimal below 10 when a prefix was applied (`1.2k`), whole numbers otherwise.
fn scaled_number(scaled: f64, prefixed: bool) -> String {
    if prefixed && scaled.abs() < 9.95 {
        let text = format!("{scaled:.1}");
        text.strip_suffix(".0").map(str::to_string).unwrap_or(text)
    } else {
        format!("{scaled:.0}")
    }
}

fn ready(object: &Value) -> Option<String> {
    let from_condition = object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        })
        .and_then(|c| c.get("status").and_then(Value::as_str))
        .map(str::to_string);
    from_condition.or_else(|| {
        let phase = object.pointer("/status/phase").and_then(Value::as_str)?;
        Some(if phase == "Ready" { "True" } else { "False" }.to_string())
    })
}

fn number(object: &Value, pointer: &str) -> Option<String> {
    match object.pointer(pointer)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn cpu(object: &Value) -> Option<String> {
    let capacity = number(object, "/spec/capacity/cpu")?;
    Some(match number(object, "/status/allocatable/cpu") {
        Some(free) => format!("{free}/{capacity}"),
        None => capacity,
    })
}

/// An astro-fit application's stage in progress (`fit 7/9`), else `done/total` tasks; failures
/// are appended either way.
fn progress(object: &Value) -> Option<String> {
    let failed = object
        .pointer("/status/progress/failed")
        .and_then(Value::as_u64)
        .filter(|&failed| failed > 0);
    let counts = stage_in_progress(object).or_else(|| task_counts(object))?;
    Some(match failed {
        Some(failed) => format!("{counts} ({failed} failed)"),
        None => counts,
    })
}

/// `NAME done/total` of the first stage not yet complete (a stage whose total is still 0 is
/// not planned yet, so not complete); the last stage once all are. `None` without stages.
pub fn stage_in_progress(object: &Value) -> Option<String> {
    let stages = object.pointer("/status/stages")?.as_array()?;
    let count = |stage: &Value, key: &str| stage.get(key).and_then(Value::as_u64).unwrap_or(0);
    let complete = |stage: &&Value| {
        let total = count(stage, "total");
        total > 0 && count(stage, "done") >= total
    };
    let current = stages
        .iter()
        .find(|stage| !complete(stage))
        .or_else(|| stages.last())?;
    let name = current.get("name").and_then(Value::as_str)?;
    Some(format!(
        "{name} {}/{}",
        count(current, "done"),
        count(current, "total")
    ))
}

/// `done/total` tasks of `status.progress`.
fn task_counts(object: &Value) -> Option<String> {
    let done = number(object, "/status/progress/done")?;
    let total = number(object, "/status/progress/total")?;
    Some(format!("{done}/{total}"))
}

fn placement_regions(object: &Value) -> Option<String> {
    let placements = object.pointer("/status/placements")?.as_array()?;
    let names: Vec<&str> = placements
        .iter()
        .filter_map(|p| p.get("region").and_then(Value::as_str))
        .collect();
    Some(names.join(","))
}

fn involved_object(object: &Value) -> Option<String> {
    let kind = object.pointer("/involvedObject/kind")?.as_str()?;
    let name = object.pointer("/involvedObject/name")?.as_str()?;
    Some(format!("{}/{name}", kind.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::by_kind;
    use serde_json::json;

    const NOW: &str = "2026-11-21T12:00:00Z";

    fn now() -> i64 {
        time::parse_rfc3339(NOW).unwrap()
    }

    fn table(kind: &str, wide: bool, objects: &[Value]) -> String {
        let cols = columns(by_kind(kind).unwrap(), wide);
        render(&rows(&cols, objects, now()))
    }

    #[test]
    fn region_table_is_aligned_like_kubectl() {
        let regions = [
            json!({"metadata": {"name": "edge-caha", "creationTimestamp": "2026-11-21T11:59:55Z"},
                   "spec": {"tier": "edge", "capacity": {"cpu": 8}},
                   "status": {"phase": "Ready", "allocatable": {"cpu": 6}, "load": 0.25, "powerWatts": 1234.0}}),
            json!({"metadata": {"name": "cloud", "creationTimestamp": "2026-11-17T12:00:00Z"},
                   "spec": {"tier": "cloud", "capacity": {"cpu": 128}},
                   "status": {"phase": "NotReady",
                              "conditions": [{"type": "Ready", "status": "Unknown"}]}}),
        ];
        assert_eq!(
            table("Region", false, &regions),
            "NAME        TIER    READY     CPU   LOAD     POWER    AGE\n\
             edge-caha   edge    True      6/8   25%      1.2kW    5s\n\
             cloud       cloud   Unknown   128   <none>   <none>   4d\n"
        );
    }

    #[test]
    fn application_table_shows_progress_regions_and_energy() {
        let apps = [json!({
            "metadata": {"name": "m51", "creationTimestamp": "2026-11-21T11:57:00Z"},
            "spec": {"app": "astro-fit", "objective": "energy", "parallelism": 4},
            "status": {"phase": "Running", "progress": {"done": 3, "failed": 1, "total": 10},
                       "placements": [{"region": "edge-caha"}, {"region": "cloud"}],
                       "energyJoules": 35210.0}
        })];
        assert_eq!(
            table("Application", true, &apps),
            "NAME   APP         PHASE     PROGRESS          REGIONS           ENERGY   AGE   OBJECTIVE   PARALLELISM\n\
             m51    astro-fit   Running   3/10 (1 failed)   edge-caha,cloud   35kJ     3m    energy      4\n"
        );
    }

    #[test]
    fn event_table_names_the_object() {
        let events = [json!({
            "metadata": {"name": "m51.1"}, "type": "Warning", "reason": "FailedScheduling",
            "involvedObject": {"kind": "Application", "name": "m51"},
            "message": "no region fits", "lastTimestamp": "2026-11-21T10:00:00Z"
        })];
        assert_eq!(
            table("Event", false, &events),
            "LAST SEEN   TYPE      REASON             OBJECT            MESSAGE\n\
             120m        Warning   FailedScheduling   application/m51   no region fits\n"
        );
    }

    #[test]
    fn the_last_column_carries_no_trailing_blanks() {
        let out = render(&[vec!["A".into(), "B".into()], vec!["long".into(), "".into()]]);
        assert_eq!(out, "A      B\nlong\n");
    }

    #[test]
    fn units_scale_with_prefixes() {
        assert_eq!(si(0.0, "W"), "0W");
        assert_eq!(si(950.0, "W"), "950W");
        assert_eq!(si(1000.0, "J"), "1kJ");
        assert_eq!(si(1234.0, "W"), "1.2kW");
        assert_eq!(si(35_210.0, "J"), "35kJ");
        assert_eq!(si(4.1e6, "J"), "4.1MJ");
        assert_eq!(bytes(512.0), "512B");
        assert_eq!(bytes(1536.0), "1.5KiB");
        assert_eq!(bytes(20.0 * 1024.0 * 1024.0), "20MiB");
    }

    #[test]
    fn missing_and_null_values_print_none() {
        let obj = json!({"metadata": {"name": "x"}, "spec": {"tier": null}});
        assert_eq!(
            cell(&obj, Cell::Field("/spec/tier", Format::Text), now()),
            "<none>"
        );
        assert_eq!(cell(&obj, Cell::Progress, now()), "<none>");
        assert_eq!(
            cell(&obj, Cell::Age("/metadata/creationTimestamp"), now()),
            "<none>"
        );
        let workers = json!({"status": {"workers": ["a", "b"]}});
        assert_eq!(
            cell(
                &workers,
                Cell::Field("/status/workers", Format::Count),
                now()
            ),
            "2"
        );
    }

    fn astro_fit(phase: &str, stages: [(u64, u64); 3], failed: u64) -> Value {
        let stages: Vec<Value> = ["prepare", "fit", "assemble"]
            .iter()
            .zip(stages)
            .map(|(name, (done, total))| json!({"name": name, "done": done, "total": total}))
            .collect();
        json!({"metadata": {"name": "m51", "creationTimestamp": "2026-11-21T11:57:00Z"},
               "spec": {"app": "astro-fit"},
               "status": {"phase": phase, "stages": stages,
                          "progress": {"done": 0, "failed": failed, "total": 11}}})
    }

    #[test]
    fn astro_fit_progress_is_the_stage_in_progress() {
        let progress = |app: &Value| cell(app, Cell::Progress, now());
        // Before the plan is known the fit stage counts 0/0: prepare is what runs.
        assert_eq!(
            progress(&astro_fit("Running", [(0, 1), (0, 0), (0, 1)], 0)),
            "prepare 0/1"
        );
        assert_eq!(
            progress(&astro_fit("Running", [(1, 1), (0, 0), (0, 1)], 0)),
            "fit 0/0"
        );
        assert_eq!(
            progress(&astro_fit("Running", [(1, 1), (7, 9), (0, 1)], 0)),
            "fit 7/9"
        );
        assert_eq!(
            progress(&astro_fit("Running", [(1, 1), (9, 9), (0, 1)], 2)),
            "assemble 0/1 (2 failed)"
        );
        assert_eq!(
            progress(&astro_fit("Succeeded", [(1, 1), (9, 9), (1, 1)], 0)),
            "assemble 1/1"
        );
        let table = table(
            "Application",
            false,
            &[astro_fit("Running", [(1, 1), (7, 9), (0, 1)], 0)],
        );
        assert_eq!(
            table,
            "NAME   APP         PHASE     PROGRESS   REGIONS   ENERGY   AGE\n\
             m51    astro-fit   Running   fit 7/9    <none>    <none>   3m\n"
        );
    }

    #[test]
    fn a_row_identity_ignores_the_clock_but_not_what_is_shown() {
        let cols = columns(by_kind("Application").unwrap(), false);
        let app = json!({"metadata": {"name": "m51", "creationTimestamp": "2026-11-21T11:57:00Z"},
                         "spec": {"app": "container"},
                         "status": {"phase": "Running", "energyJoules": 35_210.0,
                                    "progress": {"done": 3, "total": 10}}});
        let identity = row_identity(&cols, &app);
        assert_eq!(
            identity,
            [
                "m51",
                "container",
                "Running",
                "3/10",
                "<none>",
                "35kJ",
                "2026-11-21T11:57:00Z"
            ]
        );
        // The energy grew, but not enough to change what the ENERGY column prints.
        let mut warmer = app.clone();
        warmer["status"]["energyJoules"] = json!(35_290.0);
        warmer["status"]["startTime"] = json!("2026-11-21T11:58:00Z");
        assert_eq!(row_identity(&cols, &warmer), identity);
        let mut further = app.clone();
        further["status"]["progress"]["done"] = json!(4);
        assert_ne!(row_identity(&cols, &further), identity);
        // An event seen again has a new lastTimestamp: news, though its text is the same.
        let events = columns(by_kind("Event").unwrap(), false);
        let event = json!({"type": "Normal", "reason": "Pulled", "message": "m",
                           "lastTimestamp": "2026-11-21T11:57:00Z"});
        let mut again = event.clone();
        again["lastTimestamp"] = json!("2026-11-21T11:58:00Z");
        assert_ne!(row_identity(&events, &event), row_identity(&events, &again));
    }
}
