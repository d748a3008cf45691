//! What every `astro-fit` subcommand shares in what it prints: one `-o/--output` vocabulary
//! (`text` for people, `json` for scripts) and one way to say which files it wrote.

use std::path::Path;

/// `-o/--output`: how a subcommand prints its result (files are always named with `--out`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// A short summary for people.
    #[default]
    #[value(alias = "table")]
    Text,
    /// JSON on standard output, nothing else there (messages go to standard error).
    Json,
}

/// A byte count for people: `812 B`, `85.1 KB`, `4.7 MB`, `1.2 GB` (powers of 1000).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `PATH (SIZE)` of a written file; `PATH` alone when it cannot be read back.
pub fn file_with_size(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => format!("{} ({})", path.display(), human_bytes(m.len())),
        _ => path.display().to_string(),
    }
}

/// Writes `text` to standard output; a reader that went away (`| head`) ends the output
/// quietly instead of a panic.
pub fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Refuses an output file named like an output format: `-o` once named the output file of
/// some subcommands, and now always names a format, so `-o json` where a file is meant is
/// a mistake to report, not a file to write.
pub fn parse_out_file(text: &str) -> Result<std::path::PathBuf, String> {
    if ["text", "json", "table"].contains(&text) {
        return Err(format!(
            "'{text}' looks like an output format: name the output file with --out FILE \
             (-o/--output choose the printed format: text or json)"
        ));
    }
    Ok(std::path::PathBuf::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(85_100), "85.1 KB");
        assert_eq!(human_bytes(4_700_000), "4.7 MB");
        assert_eq!(human_bytes(1_200_000_000), "1.2 GB");
        assert!(parse_out_file("json").is_err());
        assert_eq!(
            parse_out_file("c.tarsis").unwrap(),
            std::path::PathBuf::from("c.tarsis")
        );
    }
}
