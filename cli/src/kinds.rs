//! The kinds ceccmctl knows: their names as typed on the command line and their table columns.
//!
//! Everything else works on `serde_json::Value`, like kubectl's unstructured objects: a kind is
//! only a collection path, a set of aliases, and column definitions kept here as data.

use crate::error::{Result, usage};

/// How a kind is spelt and shown.
#[derive(Debug, PartialEq, Eq)]
pub struct KindInfo {
    /// The `kind` field of its objects, e.g. `Region`.
    pub kind: &'static str,
    /// The collection in `/api/v1/{plural}`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub short: &'static [&'static str],
    /// Whether users may create, update and delete it (`Task` and `Event` are read-only).
    pub writable: bool,
    /// JSON pointers of spec fields that name regions (a name or a list of names); the server
    /// rejects objects naming regions that do not exist.
    pub region_refs: &'static [&'static str],
    pub columns: &'static [Column],
}

/// One table column: its header, how its cell is computed, and whether only `-o wide` shows it.
#[derive(Debug, PartialEq, Eq)]
pub struct Column {
    pub header: &'static str,
    pub cell: Cell,
    pub wide: bool,
}

/// How a cell is computed from an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// `metadata.name`.
    Name,
    /// The value at a JSON pointer, formatted.
    Field(&'static str, Format),
    /// Time since the timestamp at a JSON pointer, as kubectl prints AGE.
    Age(&'static str),
    /// `True`/`False` from the `Ready` condition, else from `status.phase`.
    Ready,
    /// `allocatable/capacity` CPUs of a region.
    Cpu,
    /// `done/total` tasks of an application (with failures when there are some).
    Progress,
    /// Regions an application is placed on, comma-separated.
    PlacementRegions,
    /// `kind/name` of the object an event is about.
    InvolvedObject,
}

/// How a field's value is written in a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// A fraction in 0..1 written as a percentage.
    Percent,
    Watts,
    Joules,
    Bytes,
    /// A number as is, or the length of an array.
    Count,
    /// The first 12 characters, as `git log --oneline` shortens hashes.
    ShortHash,
}

const fn col(header: &'static str, cell: Cell) -> Column {
    Column {
        header,
        cell,
        wide: false,
    }
}

const fn wide(header: &'static str, cell: Cell) -> Column {
    Column {
        header,
        cell,
        wide: true,
    }
}

use Cell::{Age, Field, Name};
use Format::{Bytes, Count, Joules, Percent, ShortHash, Text, Watts};

pub static KINDS: &[KindInfo] = &[
    KindInfo {
        kind: "Region",
        plural: "regions",
        singular: "region",
        short: &["rg"],
        writable: true,
        region_refs: &[],
        columns: &[
            col("NAME", Name),
            col("TIER", Field("/spec/tier", Text)),
            col("READY", Cell::Ready),
            col("CPU", Cell::Cpu),
            col("LOAD", Field("/status/load", Percent)),
            col("POWER", Field("/status/powerWatts", Watts)),
            col("AGE", Age("/metadata/creationTimestamp")),
            wide("LOCATION", Field("/spec/location", Text)),
            wide("DRIVER", Field("/spec/driver", Text)),
            wide("WORKERS", Field("/status/workers", Count)),
            wide("ENERGY", Field("/status/energyJoules", Joules)),
        ],
    },
    KindInfo {
        kind: "Application",
        plural: "applications",
        singular: "application",
        short: &["app", "apps"],
        writable: true,
        region_refs: &["/spec/placement/regions"],
        columns: &[
            col("NAME", Name),
            col("APP", Field("/spec/app", Text)),
            col("PHASE", Field("/status/phase", Text)),
            col("PROGRESS", Cell::Progress),
            col("REGIONS", Cell::PlacementRegions),
            col("ENERGY", Field("/status/energyJoules", Joules)),
            col("AGE", Age("/metadata/creationTimestamp")),
            wide("OBJECTIVE", Field("/spec/objective", Text)),
            wide("PARALLELISM", Field("/spec/parallelism", Text)),
        ],
    },
    KindInfo {
        kind: "Dataset",
        plural: "datasets",
        singular: "dataset",
        short: &["ds"],
        writable: true,
        region_refs: &["/spec/region"],
        columns: &[
            col("NAME", Name),
            col("PHASE", Field("/status/phase", Text)),
            col("SIZE", Field("/status/size", Bytes)),
            col("SHA256", Field("/status/sha256", ShortHash)),
            col("AGE", Age("/metadata/creationTimestamp")),
            wide("FORMAT", Field("/spec/format", Text)),
            wide("REGION", Field("/spec/region", Text)),
        ],
    },
    KindInfo {
        kind: "Task",
        plural: "tasks",
        singular: "task",
        short: &[],
        writable: false,
        region_refs: &[],
        columns: &[
            col("NAME", Name),
            col("APPLICATION", Field("/spec/application", Text)),
            col("STATE", Field("/status/state", Text)),
            col("ATTEMPTS", Field("/status/attempts", Text)),
            col("REGION", Field("/status/region", Text)),
            col("AGE", Age("/metadata/creationTimestamp")),
            wide("WORKER", Field("/status/worker", Text)),
            wide("ENERGY", Field("/status/energyJoules", Joules)),
        ],
    },
    KindInfo {
        kind: "Event",
        plural: "events",
        singular: "event",
        short: &["ev"],
        writable: false,
        region_refs: &[],
        columns: &[
            col("LAST SEEN", Age("/lastTimestamp")),
            col("TYPE", Field("/type", Text)),
            col("REASON", Field("/reason", Text)),
            col("OBJECT", Cell::InvolvedObject),
            col("MESSAGE", Field("/message", Text)),
            wide("COUNT", Field("/count", Text)),
        ],
    },
];

/// Columns of `ceccmctl top`, per kind: what a region or an application consumes.
pub static TOP: &[(&str, &[Column])] = &[
    (
        "Region",
        &[
            col("NAME", Name),
            col("TIER", Field("/spec/tier", Text)),
            col("READY", Cell::Ready),
            col("CPU", Cell::Cpu),
            col("LOAD", Field("/status/load", Percent)),
            col("POWER", Field("/status/powerWatts", Watts)),
            col("ENERGY", Field("/status/energyJoules", Joules)),
            col("WORKERS", Field("/status/workers", Count)),
        ],
    ),
    (
        "Application",
        &[
            col("NAME", Name),
            col("PHASE", Field("/status/phase", Text)),
            col("PROGRESS", Cell::Progress),
            col("REGIONS", Cell::PlacementRegions),
            col("ENERGY", Field("/status/energyJoules", Joules)),
        ],
    ),
];

/// The kind a word names: its `kind`, singular, plural or a short alias, in any case.
pub fn resolve(word: &str) -> Result<&'static KindInfo> {
    let lower = word.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|k| {
            k.kind.eq_ignore_ascii_case(&lower)
                || k.singular == lower
                || k.plural == lower
                || k.short.contains(&lower.as_str())
        })
        .ok_or_else(|| {
            usage!(
                "unknown kind \"{word}\": known kinds are {}",
                KINDS
                    .iter()
                    .map(|k| k.singular)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The kind of a manifest's `kind` field (exact, as the API spells it).
pub fn by_kind(kind: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.kind == kind)
}

/// Splits `KIND/NAME` (as in `application/m51`); a word without `/` has no name.
pub fn split_ref(word: &str) -> Result<(&'static KindInfo, Option<&str>)> {
    match word.split_once('/') {
        Some((kind, "")) => Err(usage!("\"{kind}/\" names no object: write {kind}/NAME")),
        Some((kind, name)) => Ok((resolve(kind)?, Some(name))),
        None => Ok((resolve(word)?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn every_spelling_of_a_kind_resolves() {
        let cases: &[(&[&str], &str)] = &[
            (&["region", "regions", "rg", "Region", "RG"], "Region"),
            (
                &["application", "applications", "app", "apps", "Application"],
                "Application",
            ),
            (&["dataset", "datasets", "ds", "DATASET"], "Dataset"),
            (&["task", "tasks", "Task"], "Task"),
            (&["event", "events", "ev"], "Event"),
        ];
        for (words, kind) in cases {
            for word in *words {
                assert_eq!(resolve(word).unwrap().kind, *kind, "{word}");
            }
        }
    }

    #[test]
    fn an_unknown_kind_is_a_usage_error_naming_it() {
        let err = resolve("pods").unwrap_err();
        assert!(matches!(err, Error::Usage(_)));
        let text = err.to_string();
        assert!(text.contains("\"pods\""), "{text}");
        assert!(text.contains("region, application, dataset"), "{text}");
    }

    #[test]
    fn kind_slash_name_splits() {
        let (kind, name) = split_ref("app/m51").unwrap();
        assert_eq!((kind.plural, name), ("applications", Some("m51")));
        let (kind, name) = split_ref("rg").unwrap();
        assert_eq!((kind.plural, name), ("regions", None));
        assert!(matches!(split_ref("app/"), Err(Error::Usage(_))));
        assert!(matches!(split_ref("pod/x"), Err(Error::Usage(_))));
    }

    #[test]
    fn aliases_are_unique_across_kinds() {
        let mut seen = std::collections::HashSet::new();
        for k in KINDS {
            for word in [k.singular, k.plural].iter().chain(k.short) {
                assert!(seen.insert(*word), "{word} names two kinds");
            }
        }
    }

    #[test]
    fn the_issue_columns_are_present() {
        let headers = |kind: &str| -> Vec<&str> {
            by_kind(kind)
                .unwrap()
                .columns
                .iter()
                .filter(|c| !c.wide)
                .map(|c| c.header)
                .collect()
        };
        assert_eq!(
            headers("Region"),
            ["NAME", "TIER", "READY", "CPU", "LOAD", "POWER", "AGE"]
        );
        assert_eq!(
            headers("Application"),
            [
                "NAME", "APP", "PHASE", "PROGRESS", "REGIONS", "ENERGY", "AGE"
            ]
        );
    }
}
