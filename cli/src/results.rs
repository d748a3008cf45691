//! `ceccmctl results`: the files an application produced, as the results index lists them
//! (`GET /api/v1/applications/{name}/results`), which `download` and `describe` read too.

use serde::{Deserialize, Serialize};

use crate::client::{Client, encode};
use crate::commands::application_names;
use crate::error::{Result, failed, usage};
use crate::output::{self, Format};
use crate::table;

/// The results index: `{"files":[{"name","size","sha256"}]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Index {
    pub files: Vec<ResultFile>,
}

/// One result file. The size and checksum are optional on the wire so that a server that omits
/// them still lists its files (`download` then skips the check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultFile {
    pub name: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Where the index of an application's results is served, under `/api/v1`; each file is at
/// `{index_path}/{file}`.
pub fn index_path(application: &str) -> String {
    format!("applications/{}/results", encode(application))
}

/// Reads the results index of an application.
pub async fn fetch_index(client: &Client, application: &str) -> Result<Index> {
    let value = client.get_path(&index_path(application)).await?;
    parse_index(value)
}

pub fn parse_index(value: serde_json::Value) -> Result<Index> {
    serde_json::from_value(value).map_err(|e| failed!("the results index is not valid: {e}"))
}

/// `ceccmctl results app/NAME [-o FORMAT]`.
pub async fn run(client: &Client, words: &[String], format: Format) -> Result<()> {
    let names = application_names(words, "have results")?;
    let [name] = names.as_slice() else {
        return Err(usage!(
            "results lists the files of one application at a time, not {}",
            names.len()
        ));
    };
    let index = fetch_index(client, name).await?;
    match format {
        // Scripts get the index as the server serves it, an empty list included.
        Format::Json => output::print(&output::to_json(&index)?),
        Format::Yaml => output::print(&output::to_yaml(&index)?),
        Format::Name => output::print(&names_text(&index)),
        Format::Table | Format::Wide if index.files.is_empty() => {
            eprintln!("No results for application/{name} yet.");
            Ok(())
        }
        Format::Table | Format::Wide => output::print(&table::render(&rows(&index))),
    }
}

/// `NAME SIZE SHA256`, sizes with binary prefixes as every table of ceccmctl writes them, and
/// the whole checksum, which is there to be compared with `sha256sum`.
pub fn rows(index: &Index) -> Vec<Vec<String>> {
    let header = ["NAME", "SIZE", "SHA256"].map(String::from).to_vec();
    std::iter::once(header)
        .chain(index.files.iter().map(|f| {
            vec![
                f.name.clone(),
                table::bytes(f.size as f64),
                f.sha256.clone().unwrap_or_else(|| "<none>".into()),
            ]
        }))
        .collect()
}

/// One file name per line, for `for f in $(ceccmctl results app/x -o name)`.
fn names_text(index: &Index) -> String {
    index
        .files
        .iter()
        .map(|f| format!("{}\n", f.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn astro_fit_index() -> Index {
        parse_index(json!({"files": [
            {"name": "maps.fits", "size": 1_258_291, "sha256": "a".repeat(64)},
            {"name": "maps.png", "size": 48_213, "sha256": "b".repeat(64)},
            {"name": "model.fits", "size": 3_670_016, "sha256": "c".repeat(64)},
            {"name": "summary.json", "size": 912, "sha256": "d".repeat(64)},
        ]}))
        .unwrap()
    }

    #[test]
    fn the_table_shows_names_sizes_and_whole_checksums() {
        let text = table::render(&rows(&astro_fit_index()));
        let a = "a".repeat(64);
        let d = "d".repeat(64);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("NAME           SIZE     SHA256"));
        assert_eq!(
            lines.next().map(str::to_string),
            Some(format!("maps.fits      1.2MiB   {a}"))
        );
        assert_eq!(
            lines.nth(2).map(str::to_string),
            Some(format!("summary.json   912B     {d}"))
        );
        assert_eq!(lines.next(), None);
    }

    #[test]
    fn names_print_one_per_line() {
        assert_eq!(
            names_text(&astro_fit_index()),
            "maps.fits\nmaps.png\nmodel.fits\nsummary.json\n"
        );
    }

    #[test]
    fn the_index_reads_back_as_served() {
        let index = astro_fit_index();
        let again: Index =
            serde_json::from_str(&output::to_json(&index).unwrap()).expect("round trip");
        assert_eq!(again, index);
        let sparse = parse_index(json!({"files": [{"name": "v.png"}]})).unwrap();
        assert_eq!(sparse.files[0].size, 0);
        assert_eq!(sparse.files[0].sha256, None);
        assert!(parse_index(json!({})).is_err());
        assert!(parse_index(json!({"files": [{"size": 1}]})).is_err());
    }
}
