//! Writing to the terminal: objects in the `-o` formats, and errors on stderr.

use std::io::Write;

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result, failed};
use crate::kinds::KindInfo;
use crate::manifest::API_VERSION;
use crate::table;

/// `-o` formats.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns
    Table,
    /// Aligned columns, more of them
    Wide,
    Yaml,
    Json,
    /// KIND/NAME per line
    Name,
}

/// Writes to stdout. A closed pipe (`ceccmctl get rg | head -1`) ends the program quietly, as
/// ripgrep and kubectl do.
pub fn print_bytes(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(failed!("cannot write to stdout: {e}")),
    }
}

pub fn print(text: &str) -> Result<()> {
    print_bytes(text.as_bytes())
}

/// The line printed on stderr for a failed command.
pub fn error_line(error: &Error) -> String {
    match error {
        Error::Api { .. } => error.to_string(),
        other => format!("error: {other}"),
    }
}

pub fn to_yaml(value: &impl Serialize) -> Result<String> {
    yaml_serde::to_string(value).map_err(|e| failed!("cannot encode YAML: {e}"))
}

pub fn to_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| failed!("cannot encode JSON: {e}"))
}

/// `region/edge-caha`.
pub fn reference(kind: &KindInfo, object: &Value) -> String {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{}/{name}", kind.singular)
}

/// Objects in a format. A single object asked for by name prints alone in YAML and JSON; several
/// print as a `List`, which `apply -f` reads back.
pub fn objects(
    kind: &KindInfo,
    objects: &[Value],
    format: Format,
    single: bool,
    now: i64,
) -> Result<String> {
    let whole = || -> Value {
        match (single, objects) {
            (true, [one]) => one.clone(),
            _ => json!({"apiVersion": API_VERSION, "kind": "List", "items": objects}),
        }
    };
    match format {
        Format::Table | Format::Wide => {
            let columns = table::columns(kind, format == Format::Wide);
            Ok(table::render(&table::rows(&columns, objects, now)))
        }
        Format::Yaml => to_yaml(&whole()),
        Format::Json => to_json(&whole()),
        Format::Name => Ok(objects.iter().map(|o| reference(kind, o) + "\n").collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::resolve;

    #[test]
    fn formats_render_one_or_many_objects() {
        let kind = resolve("rg").unwrap();
        let a = json!({"metadata": {"name": "a"}, "spec": {"tier": "edge"}});
        let b = json!({"metadata": {"name": "b"}, "spec": {"tier": "hpc"}});
        let both = [a.clone(), b];
        assert_eq!(
            objects(kind, &both, Format::Name, false, 0).unwrap(),
            "region/a\nregion/b\n"
        );
        let one: Value = serde_json::from_str(
            &objects(kind, std::slice::from_ref(&a), Format::Json, true, 0).unwrap(),
        )
        .unwrap();
        assert_eq!(one, a);
        let list: Value =
            yaml_serde::from_str(&objects(kind, &both, Format::Yaml, false, 0).unwrap()).unwrap();
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"][1]["spec"]["tier"], "hpc");
        let wide = objects(kind, &both, Format::Wide, false, 0).unwrap();
        assert!(wide.starts_with("NAME   TIER   READY"), "{wide}");
        assert!(wide.contains("LOCATION"), "{wide}");
    }

    #[test]
    fn server_errors_print_like_kubectl_and_others_with_error_prefix() {
        let api = Error::Api {
            status: 422,
            code: "Invalid".into(),
            message: "spec.tier: unknown variant".into(),
        };
        assert_eq!(
            error_line(&api),
            "Error from server (Invalid): spec.tier: unknown variant"
        );
        assert_eq!(error_line(&Error::Usage("bad".into())), "error: bad");
    }
}
