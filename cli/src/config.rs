//! Contexts: named servers (URL, token, TLS CA) kept in a YAML file under the user's config dir.
//!
//! Where the file is: `$CECCM_CONFIG`, else `$XDG_CONFIG_HOME/ceccm/config.yaml`, else
//! `~/.config/ceccm/config.yaml` (`%APPDATA%\ceccm\config.yaml` on Windows). Which server a
//! command talks to: `--server` or `$CECCM_SERVER`, else the chosen context (`--context`, else
//! the current one), else [`DEFAULT_SERVER`]. The token follows the same order with `--token`
//! and `$CECCM_TOKEN`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, failed, usage};

/// Where `ceccm server` listens unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Context {
    pub name: String,
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM file of a CA to trust beyond the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<PathBuf>,
    /// Accept any certificate the server shows (like kubectl's; for tests only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_tls_verify: bool,
    /// PEM files of a client certificate and its key, for a server that takes them (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

/// What the command line and environment say, before the config file is consulted.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub server: Option<String>,
    pub token: Option<String>,
    pub context: Option<String>,
    pub certificate_authority: Option<PathBuf>,
    pub insecure_skip_tls_verify: Option<bool>,
    /// A client certificate and its key (PEM) for a server that takes them (mTLS).
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The server a command talks to, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub server: String,
    pub token: Option<String>,
    pub certificate_authority: Option<PathBuf>,
    /// Whether the server's certificate goes unverified (then `certificate_authority` is unused).
    pub insecure_skip_tls_verify: bool,
    /// The client certificate and key to present (flags or environment only).
    pub client_certificate: Option<(PathBuf, PathBuf)>,
}

/// The config file's path from the environment (see the module docs).
pub fn path() -> Result<PathBuf> {
    path_from(|name| std::env::var_os(name))
}

/// [`path`] over any source of environment variables.
fn path_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(explicit) = var("CECCM_CONFIG") {
        return Ok(PathBuf::from(explicit));
    }
    let base = if cfg!(windows) {
        var("APPDATA").map(PathBuf::from)
    } else {
        var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".config")))
    };
    base.map(|b| b.join("ceccm").join("config.yaml"))
        .ok_or_else(|| {
            usage!("cannot locate the config file: set CECCM_CONFIG, XDG_CONFIG_HOME or HOME")
        })
}

/// Reads the config file; a missing file is an empty config.
pub fn load(path: &Path) -> Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(Config::default()),
        Ok(text) => yaml_serde::from_str(&text)
            .map_err(|e| usage!("config file {} is invalid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(usage!("cannot read config file {}: {e}", path.display())),
    }
}

/// Writes the config file, creating its directory; readable by the owner only (it holds tokens).
pub fn save(path: &Path, config: &Config) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| failed!("cannot create {}: {e}", dir.display()))?;
    }
    let text = yaml_serde::to_string(config).map_err(|e| failed!("cannot encode config: {e}"))?;
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).map_err(|e| failed!("cannot write {}: {e}", tmp.display()))?;
    restrict_to_owner(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| failed!("cannot write {}: {e}", path.display()))
}

#[cfg(unix)]
fn restrict_to_owner(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| failed!("cannot set permissions of {}: {e}", path.display()))
}

#[cfg(not(unix))]
fn restrict_to_owner(_path: &Path) -> Result<()> {
    Ok(())
}

impl Config {
    pub fn context(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }

    /// Decides the target from the overrides, then the config, then the default.
    pub fn resolve(&self, overrides: &Overrides) -> Result<Target> {
        let context = match (&overrides.context, &self.current_context) {
            (Some(name), _) => Some(
                self.context(name)
                    .ok_or_else(|| usage!("context \"{name}\" is not in the config file"))?,
            ),
            (None, Some(name)) => Some(self.context(name).ok_or_else(|| {
                usage!("the current context \"{name}\" is not in the config file")
            })?),
            (None, None) => None,
        };
        let server = overrides
            .server
            .clone()
            .or_else(|| context.map(|c| c.server.clone()))
            .unwrap_or_else(|| DEFAULT_SERVER.to_string());
        Ok(Target {
            server: normalise_server(&server)?,
            token: overrides
                .token
                .clone()
                .or_else(|| context.and_then(|c| c.token.clone())),
            certificate_authority: overrides
                .certificate_authority
                .clone()
                .or_else(|| context.and_then(|c| c.certificate_authority.clone())),
            insecure_skip_tls_verify: overrides
                .insecure_skip_tls_verify
                .or_else(|| context.map(|c| c.insecure_skip_tls_verify))
                .unwrap_or(false),
            client_certificate: match client_pair(
                overrides.client_certificate.as_ref(),
                overrides.client_key.as_ref(),
            )? {
                Some(pair) => Some(pair),
                None => {
                    context.and_then(|c| c.client_certificate.clone().zip(c.client_key.clone()))
                }
            },
        })
    }

    /// Sets the client certificate and key of an existing context.
    pub fn set_client_certificate(
        &mut self,
        name: &str,
        cert: PathBuf,
        key: PathBuf,
    ) -> Result<()> {
        let context = self
            .contexts
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| usage!("no context \"{name}\""))?;
        context.client_certificate = Some(cert);
        context.client_key = Some(key);
        Ok(())
    }

    /// Creates or updates a context with the fields given.
    pub fn set_context(
        &mut self,
        name: &str,
        server: Option<String>,
        token: Option<String>,
        certificate_authority: Option<PathBuf>,
        insecure_skip_tls_verify: Option<bool>,
    ) -> Result<()> {
        if let Some(server) = &server {
            normalise_server(server)?;
        }
        match self.contexts.iter_mut().find(|c| c.name == name) {
            Some(context) => {
                if let Some(server) = server {
                    context.server = server;
                }
                if token.is_some() {
                    context.token = token;
                }
                if certificate_authority.is_some() {
                    context.certificate_authority = certificate_authority;
                }
                if let Some(insecure) = insecure_skip_tls_verify {
                    context.insecure_skip_tls_verify = insecure;
                }
            }
            None => self.contexts.push(Context {
                name: name.to_string(),
                server: server.ok_or_else(|| {
                    usage!("context \"{name}\" is new: give its server with --server URL")
                })?,
                token,
                certificate_authority,
                insecure_skip_tls_verify: insecure_skip_tls_verify.unwrap_or(false),
                client_certificate: None,
                client_key: None,
            }),
        }
        Ok(())
    }

    pub fn use_context(&mut self, name: &str) -> Result<()> {
        if self.context(name).is_none() {
            return Err(usage!("no context named \"{name}\""));
        }
        self.current_context = Some(name.to_string());
        Ok(())
    }

    /// A copy safe to print: tokens replaced by `REDACTED`.
    pub fn redacted(&self) -> Config {
        let mut copy = self.clone();
        for context in &mut copy.contexts {
            if context.token.is_some() {
                context.token = Some("REDACTED".into());
            }
        }
        copy
    }
}

/// A client certificate comes with its key, or neither is given.
pub fn client_pair(
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert.clone(), key.clone()))),
        (None, None) => Ok(None),
        _ => Err(usage!(
            "give both --client-certificate and --client-key (or $CECCM_CLIENT_CERTIFICATE \
             and $CECCM_CLIENT_KEY), or neither"
        )),
    }
}

/// `host:port` becomes `http://host:port`; a trailing `/` goes; other schemes are refused.
pub fn normalise_server(server: &str) -> Result<String> {
    let server = server.trim().trim_end_matches('/');
    if server.is_empty() {
        return Err(usage!("the server address is empty"));
    }
    if server.starts_with("http://") || server.starts_with("https://") {
        return Ok(server.to_string());
    }
    if server.contains("://") {
        return Err(usage!(
            "server \"{server}\" must be an http:// or https:// URL"
        ));
    }
    Ok(format!("http://{server}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_contexts() -> Config {
        let mut config = Config::default();
        config
            .set_context("local", Some("127.0.0.1:8080".into()), None, None, None)
            .unwrap();
        config
            .set_context(
                "caha",
                Some("https://ceccm.caha.es/".into()),
                Some("s3cret".into()),
                Some("/etc/ceccm/ca.pem".into()),
                None,
            )
            .unwrap();
        config.use_context("caha").unwrap();
        config
    }

    #[test]
    fn the_current_context_decides_unless_overridden() {
        let config = two_contexts();
        let target = config.resolve(&Overrides::default()).unwrap();
        assert_eq!(target.server, "https://ceccm.caha.es");
        assert_eq!(target.token.as_deref(), Some("s3cret"));
        assert_eq!(
            target.certificate_authority.as_deref(),
            Some(Path::new("/etc/ceccm/ca.pem"))
        );

        let by_flag = Overrides {
            server: Some("http://10.0.0.1:9000".into()),
            token: Some("other".into()),
            ..Overrides::default()
        };
        let target = config.resolve(&by_flag).unwrap();
        assert_eq!(target.server, "http://10.0.0.1:9000");
        assert_eq!(target.token.as_deref(), Some("other"));

        let other_context = Overrides {
            context: Some("local".into()),
            ..Overrides::default()
        };
        let target = config.resolve(&other_context).unwrap();
        assert_eq!(target.server, "http://127.0.0.1:8080");
        assert_eq!(target.token, None);
    }

    #[test]
    fn skipping_tls_verification_follows_flag_then_context() {
        let mut config = two_contexts();
        assert!(
            !config
                .resolve(&Overrides::default())
                .unwrap()
                .insecure_skip_tls_verify
        );
        config
            .set_context("caha", None, None, None, Some(true))
            .unwrap();
        assert!(
            config
                .resolve(&Overrides::default())
                .unwrap()
                .insecure_skip_tls_verify
        );
        let verify = Overrides {
            insecure_skip_tls_verify: Some(false),
            ..Overrides::default()
        };
        assert!(!config.resolve(&verify).unwrap().insecure_skip_tls_verify);
        let text = yaml_serde::to_string(&config).unwrap();
        assert!(text.contains("insecureSkipTlsVerify: true"), "{text}");
    }

    #[test]
    fn a_client_certificate_comes_with_its_key_or_not_at_all() {
        let config = two_contexts();
        let both = Overrides {
            client_certificate: Some("/c.pem".into()),
            client_key: Some("/k.pem".into()),
            ..Overrides::default()
        };
        assert_eq!(
            config.resolve(&both).unwrap().client_certificate,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(
            config
                .resolve(&Overrides::default())
                .unwrap()
                .client_certificate,
            None
        );
        let half = Overrides {
            client_certificate: Some("/c.pem".into()),
            ..Overrides::default()
        };
        assert!(config.resolve(&half).is_err());
        // The context's pair, unless the flags give one.
        let mut config = config;
        let current = config.current_context.clone().unwrap();
        config
            .set_client_certificate(&current, "/ctx.pem".into(), "/ctx.key".into())
            .unwrap();
        assert_eq!(
            config
                .resolve(&Overrides::default())
                .unwrap()
                .client_certificate,
            Some((PathBuf::from("/ctx.pem"), PathBuf::from("/ctx.key")))
        );
        assert_eq!(
            config.resolve(&both).unwrap().client_certificate,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let text = yaml_serde::to_string(&config).unwrap();
        assert!(text.contains("clientCertificate: /ctx.pem"), "{text}");
        assert!(
            config
                .set_client_certificate("nope", "/a".into(), "/b".into())
                .is_err()
        );
    }

    #[test]
    fn no_config_means_the_default_server() {
        let target = Config::default().resolve(&Overrides::default()).unwrap();
        assert_eq!(target.server, DEFAULT_SERVER);
    }

    #[test]
    fn unknown_contexts_are_usage_errors() {
        let mut config = two_contexts();
        let missing = Overrides {
            context: Some("nope".into()),
            ..Overrides::default()
        };
        assert!(
            config
                .resolve(&missing)
                .unwrap_err()
                .to_string()
                .contains("\"nope\"")
        );
        assert!(config.use_context("nope").is_err());
        let err = config
            .set_context("new", None, None, None, None)
            .unwrap_err();
        assert!(err.to_string().contains("--server"), "{err}");
        config.current_context = Some("gone".into());
        assert!(config.resolve(&Overrides::default()).is_err());
    }

    #[test]
    fn set_context_updates_only_what_is_given() {
        let mut config = two_contexts();
        config
            .set_context("caha", None, Some("rotated".into()), None, None)
            .unwrap();
        let caha = config.context("caha").unwrap();
        assert_eq!(caha.server, "https://ceccm.caha.es/");
        assert_eq!(caha.token.as_deref(), Some("rotated"));
        assert_eq!(config.contexts.len(), 2);
    }

    #[test]
    fn the_file_round_trips_and_hides_tokens_when_viewed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("config.yaml");
        assert_eq!(load(&path).unwrap(), Config::default());
        let config = two_contexts();
        save(&path, &config).unwrap();
        assert_eq!(load(&path).unwrap(), config);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let shown = yaml_serde::to_string(&config.redacted()).unwrap();
        assert!(
            shown.contains("REDACTED") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(shown.contains("currentContext: caha"), "{shown}");

        std::fs::write(&path, "contexts: [{name: x, server: y, colour: red}]").unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn the_config_path_follows_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        static ALL: [(&str, &str); 3] = [
            ("CECCM_CONFIG", "/tmp/c.yaml"),
            ("XDG_CONFIG_HOME", "/xdg"),
            ("HOME", "/home/ana"),
        ];
        static EMPTY_XDG: [(&str, &str); 2] = [("XDG_CONFIG_HOME", ""), ("HOME", "/h")];
        assert_eq!(path_from(env(&ALL[..])).unwrap(), Path::new("/tmp/c.yaml"));
        if cfg!(unix) {
            assert_eq!(
                path_from(env(&ALL[1..])).unwrap(),
                Path::new("/xdg/ceccm/config.yaml")
            );
            assert_eq!(
                path_from(env(&ALL[2..])).unwrap(),
                Path::new("/home/ana/.config/ceccm/config.yaml")
            );
            assert_eq!(
                path_from(env(&EMPTY_XDG[..])).unwrap(),
                Path::new("/h/.config/ceccm/config.yaml")
            );
            assert!(path_from(env(&[])).is_err());
        }
    }

    #[test]
    fn servers_are_normalised() {
        assert_eq!(
            normalise_server("localhost:8080").unwrap(),
            "http://localhost:8080"
        );
        assert_eq!(normalise_server("https://x/").unwrap(), "https://x");
        assert!(normalise_server("ftp://x").is_err());
        assert!(normalise_server(" ").is_err());
    }
}
