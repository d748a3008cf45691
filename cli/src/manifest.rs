//! Manifests: the objects `apply -f` and `delete -f` read from files, directories or stdin.
//!
//! A source holds any number of documents: YAML separated by `---`, or JSON values one after
//! another; a `List` (kubectl's `{"kind":"List","items":[...]}`) or a JSON array stands for its
//! items. Every problem names the source, and the line for syntax errors.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result, usage};
use crate::kinds::{self, KindInfo};

pub const API_VERSION: &str = "ceccm/v1";

/// One object read from a manifest, with where it came from.
#[derive(Debug, Clone)]
pub struct Document {
    /// The file it was read from, or `-` for stdin.
    pub source: String,
    /// 1-based position among the objects of its source.
    pub index: usize,
    pub object: Value,
}

impl Document {
    /// `file.yaml (document 2)`, for messages.
    pub fn origin(&self) -> String {
        format!("{} (document {})", self.source, self.index)
    }
}

/// A validated document: a known, writable kind and a name.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub kind: &'static KindInfo,
    pub name: String,
    pub document: Document,
}

impl Manifest {
    /// `region/edge-caha`, as apply and delete print it.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.kind.singular, self.name)
    }
}

/// Reads every `-f` argument: a file, a directory (its `.yaml`, `.yml` and `.json` files in
/// name order, not recursing) or `-` for stdin.
pub fn read_all(args: &[String]) -> Result<Vec<Document>> {
    let mut documents = Vec::new();
    for arg in args {
        if arg == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| usage!("cannot read manifests from stdin: {e}"))?;
            documents.extend(parse(&text, "-", looks_like_json(&text))?);
            continue;
        }
        for path in expand(Path::new(arg))? {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| usage!("cannot read {}: {e}", path.display()))?;
            let json = path.extension().is_some_and(|e| e == "json");
            documents.extend(parse(&text, &path.display().to_string(), json)?);
        }
    }
    Ok(documents)
}

fn expand(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| usage!("the path \"{}\" cannot be read: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| usage!("cannot list directory {}: {e}", path.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(usage!(
            "directory {} holds no .yaml, .yml or .json file",
            path.display()
        ));
    }
    Ok(files)
}

fn looks_like_json(text: &str) -> bool {
    matches!(text.trim_start().chars().next(), Some('{' | '['))
}

/// Parses the documents of one source. Empty YAML documents are skipped.
pub fn parse(text: &str, source: &str, json: bool) -> Result<Vec<Document>> {
    let mut values = Vec::new();
    if json {
        for value in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
            let value =
                value.map_err(|e| usage!("{source}:{}: JSON syntax error: {e}", e.line()))?;
            values.push(value);
        }
    } else {
        for document in yaml_serde::Deserializer::from_str(text) {
            let value = Value::deserialize(document).map_err(|e| {
                let line = e.location().map_or(0, |l| l.line());
                usage!("{source}:{line}: YAML syntax error: {e}")
            })?;
            if !value.is_null() {
                values.push(value);
            }
        }
    }
    let mut documents = Vec::new();
    for value in values {
        flatten(value, &mut documents);
    }
    Ok(documents
        .into_iter()
        .enumerate()
        .map(|(i, object)| Document {
            source: source.to_string(),
            index: i + 1,
            object,
        })
        .collect())
}

fn flatten(value: Value, out: &mut Vec<Value>) {
    match value {
        Value::Array(items) => items.into_iter().for_each(|v| flatten(v, out)),
        Value::Object(mut map)
            if map.get("kind").and_then(Value::as_str) == Some("List")
                && map.get("items").is_some_and(Value::is_array) =>
        {
            if let Some(Value::Array(items)) = map.remove("items") {
                items.into_iter().for_each(|v| flatten(v, out));
            }
        }
        other => out.push(other),
    }
}

/// Checks what the client can check without the server: an object with `apiVersion: ceccm/v1`,
/// a kind users may write, and a name. Field-level validation is the server's (dry run).
pub fn validate(document: Document) -> Result<Manifest> {
    let origin = document.origin();
    let object = document
        .object
        .as_object()
        .ok_or_else(|| usage!("{origin}: expected an object, found {}", document.object))?;
    match object.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(usage!(
                "{origin}: unknown apiVersion \"{other}\": expected \"{API_VERSION}\""
            ));
        }
        None => return Err(usage!("{origin}: apiVersion is not set")),
    }
    let kind_name = object
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| usage!("{origin}: kind is not set"))?;
    let kind = kinds::by_kind(kind_name)
        .filter(|k| k.writable)
        .ok_or_else(|| unknown_kind(&origin, kind_name))?;
    let name = document
        .object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| usage!("{origin}: metadata.name is not set"))?
        .to_string();
    Ok(Manifest {
        kind,
        name,
        document,
    })
}

fn unknown_kind(origin: &str, kind: &str) -> Error {
    let writable: Vec<&str> = kinds::KINDS
        .iter()
        .filter(|k| k.writable)
        .map(|k| k.kind)
        .collect();
    usage!(
        "{origin}: unknown kind \"{kind}\": manifests may hold {}",
        writable.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_REGIONS: &str = "\
apiVersion: ceccm/v1
kind: Region
metadata:
  name: edge-caha
spec:
  tier: edge
---
apiVersion: ceccm/v1
kind: Region
metadata:
  name: cloud
spec:
  tier: cloud
---
";

    #[test]
    fn multi_document_yaml_yields_each_object() {
        let docs = parse(TWO_REGIONS, "regions.yaml", false).unwrap();
        assert_eq!(docs.len(), 2, "the empty trailing document is skipped");
        let names: Vec<String> = docs
            .into_iter()
            .map(|d| validate(d).unwrap().reference())
            .collect();
        assert_eq!(names, ["region/edge-caha", "region/cloud"]);
    }

    #[test]
    fn json_values_arrays_and_lists_are_flattened() {
        let text = r#"
            {"apiVersion":"ceccm/v1","kind":"Dataset","metadata":{"name":"a"}}
            [{"apiVersion":"ceccm/v1","kind":"Dataset","metadata":{"name":"b"}}]
            {"kind":"List","items":[{"apiVersion":"ceccm/v1","kind":"Application","metadata":{"name":"c"}}]}
        "#;
        let docs = parse(text, "-", true).unwrap();
        let refs: Vec<String> = docs
            .iter()
            .map(|d| validate(d.clone()).unwrap().reference())
            .collect();
        assert_eq!(refs, ["dataset/a", "dataset/b", "application/c"]);
        assert_eq!(docs[2].origin(), "- (document 3)");
        assert!(looks_like_json(text));
        assert!(!looks_like_json(TWO_REGIONS));
    }

    #[test]
    fn a_yaml_syntax_error_names_file_and_line() {
        let text = format!(
            "{TWO_REGIONS}apiVersion: ceccm/v1\nkind: Region\nmetadata:\n  name: [broken\n"
        );
        let err = parse(&text, "regions.yaml", false).unwrap_err();
        assert!(matches!(err, Error::Usage(_)));
        let msg = err.to_string();
        assert!(msg.starts_with("regions.yaml:"), "{msg}");
        // The flow sequence opened on line 18 never closes; libyaml reports where it noticed.
        let line: usize = msg["regions.yaml:".len()..]
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((18..=19).contains(&line), "{msg}");
        assert!(msg.contains("YAML syntax error"), "{msg}");
    }

    #[test]
    fn a_json_syntax_error_names_file_and_line() {
        let text = "{\"kind\": \"Region\",\n \"metadata\": {\"name\": \"x\"\n}";
        let msg = parse(text, "r.json", true).unwrap_err().to_string();
        assert!(msg.starts_with("r.json:3: JSON syntax error"), "{msg}");
    }

    #[test]
    fn unknown_and_read_only_kinds_are_named() {
        for kind in ["Pod", "Task", "Event"] {
            let text = format!("apiVersion: ceccm/v1\nkind: {kind}\nmetadata:\n  name: x\n");
            let doc = parse(&text, "x.yaml", false).unwrap().remove(0);
            let msg = validate(doc).unwrap_err().to_string();
            assert!(msg.contains(&format!("unknown kind \"{kind}\"")), "{msg}");
            assert!(msg.starts_with("x.yaml (document 1)"), "{msg}");
            assert!(msg.contains("Region, Application, Dataset"), "{msg}");
        }
    }

    #[test]
    fn missing_fields_are_named() {
        let cases = [
            (
                "kind: Region\nmetadata: {name: x}\n",
                "apiVersion is not set",
            ),
            (
                "apiVersion: v1\nkind: Region\n",
                "unknown apiVersion \"v1\"",
            ),
            (
                "apiVersion: ceccm/v1\nmetadata: {name: x}\n",
                "kind is not set",
            ),
            (
                "apiVersion: ceccm/v1\nkind: Region\n",
                "metadata.name is not set",
            ),
            ("- 1\n", "expected an object"),
        ];
        for (text, expected) in cases {
            let doc = parse(text, "m.yaml", false).unwrap().remove(0);
            let msg = validate(doc).unwrap_err().to_string();
            assert!(msg.contains(expected), "{text}: {msg}");
        }
    }

    #[test]
    fn directories_expand_to_their_manifests_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let region =
            |name: &str| format!("apiVersion: ceccm/v1\nkind: Region\nmetadata:\n  name: {name}\n");
        std::fs::write(dir.path().join("b.yml"), region("b")).unwrap();
        std::fs::write(dir.path().join("a.yaml"), region("a")).unwrap();
        std::fs::write(
            dir.path().join("c.json"),
            r#"{"apiVersion":"ceccm/v1","kind":"Region","metadata":{"name":"c"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let docs = read_all(&[dir.path().display().to_string()]).unwrap();
        let names: Vec<String> = docs
            .into_iter()
            .map(|d| validate(d).unwrap().name)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);

        let empty = tempfile::tempdir().unwrap();
        let err = read_all(&[empty.path().display().to_string()]).unwrap_err();
        assert!(err.to_string().contains("holds no .yaml"), "{err}");
        let err = read_all(&["/nonexistent/regions.yaml".to_string()]).unwrap_err();
        assert!(matches!(err, Error::Usage(_)));
        assert!(
            err.to_string().contains("/nonexistent/regions.yaml"),
            "{err}"
        );
    }
}
