//! TLS for `ceccm server` (rustls over ring) and for the clients that talk to it (workers, and
//! later agents).
//!
//! The server serves plain HTTP unless told otherwise. With `--tls-cert FILE --tls-key FILE` it
//! serves https with an operator's certificate; with `--tls-self-signed` it makes its own CA on
//! first start (`DATA_DIR/tls/ca.crt`, key `ca.key` with mode 0600), keeps it across restarts,
//! and issues itself a server certificate from it at every start, for `localhost`, `127.0.0.1`,
//! `::1` and every `--tls-san NAME`. Clients pin the CA file (`ceccmctl --ca-file`, `ceccm
//! worker --ca-file`, `$CECCM_CA_FILE`).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The environment variable a client (worker, agent, ceccmctl) finds the CA to trust in.
pub const CA_FILE_ENV: &str = "CECCM_CA_FILE";

/// The names every self-signed server certificate carries.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The CA's subject. Fixed: a restart re-creates the issuer from it and the stored key, so the
/// certificates it issues chain to the `ca.crt` clients already pin.
const CA_COMMON_NAME: &str = "ceccm self-signed CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not a usable certificate and key: {reason}", path.display())]
    Unusable { path: PathBuf, reason: String },
    #[error("--tls-san {name:?} is neither an IP address nor a DNS name")]
    BadName { name: String },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot set up the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// `ceccm server`'s TLS options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// Serve https with this PEM certificate (chain first, then intermediates)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve https with a certificate from a CA of this server's own, made on first start in
    /// DATA_DIR/tls (clients pin DATA_DIR/tls/ca.crt)
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub tls_self_signed: bool,
    /// A further name (DNS name or IP address) for the self-signed certificate, besides
    /// localhost, 127.0.0.1 and ::1; may repeat
    #[arg(long = "tls-san", value_name = "NAME", requires = "tls_self_signed")]
    pub tls_sans: Vec<String>,
}

impl TlsArgs {
    pub fn mode(&self) -> TlsMode {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsMode::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ if self.tls_self_signed => TlsMode::SelfSigned {
                sans: self.tls_sans.clone(),
            },
            _ => TlsMode::Plain,
        }
    }
}

/// How the server speaks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP (the default).
    #[default]
    Plain,
    /// https with an operator's certificate chain and key (PEM files).
    Files { cert: PathBuf, key: PathBuf },
    /// https with a certificate from the server's own CA in `DATA_DIR/tls`, naming the loopback
    /// addresses and `sans`.
    SelfSigned { sans: Vec<String> },
}

/// What the server serves with, once its files are in place.
pub struct ServingTls {
    pub config: axum_server::tls_rustls::RustlsConfig,
    /// The PEM file the local driver's workers trust: the self-signed CA, or the operator's
    /// certificate file (its chain; a certificate from a public CA is trusted anyway).
    pub trust: PathBuf,
}

/// The files of a self-signed setup, in `DATA_DIR/tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfSignedFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl SelfSignedFiles {
    pub fn in_data_dir(data_dir: &Path) -> SelfSignedFiles {
        let dir = data_dir.join("tls");
        SelfSignedFiles {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
        }
    }
}

/// Readies the server's TLS: `None` for plain HTTP.
pub async fn prepare(mode: &TlsMode, data_dir: &Path) -> Result<Option<ServingTls>, TlsError> {
    let (cert, key, trust) = match mode {
        TlsMode::Plain => return Ok(None),
        TlsMode::Files { cert, key } => (cert.clone(), key.clone(), cert.clone()),
        TlsMode::SelfSigned { sans } => {
            let files = ensure_self_signed(data_dir, sans)?;
            (files.cert, files.key, files.ca_cert)
        }
    };
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
        .await
        .map_err(|e| TlsError::Unusable {
            path: cert.clone(),
            reason: format!("{e} (key {})", key.display()),
        })?;
    Ok(Some(ServingTls { config, trust }))
}

/// Makes the CA on first use (kept afterwards) and issues a new server certificate from it for
/// the loopback names and `sans`.
pub fn ensure_self_signed(data_dir: &Path, sans: &[String]) -> Result<SelfSignedFiles, TlsError> {
    let files = SelfSignedFiles::in_data_dir(data_dir);
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir).map_err(|source| TlsError::Write {
        path: dir.clone(),
        source,
    })?;
    let ca_key = match (files.ca_key.exists(), files.ca_cert.exists()) {
        (true, true) => {
            let pem = read_text(&files.ca_key)?;
            KeyPair::from_pem(&pem).map_err(|e| TlsError::Unusable {
                path: files.ca_key.clone(),
                reason: e.to_string(),
            })?
        }
        (false, false) => {
            let key = KeyPair::generate()?;
            let ca = ca_params().self_signed(&key)?;
            write_private(&files.ca_key, key.serialize_pem().as_bytes())?;
            write_public(&files.ca_cert, ca.pem().as_bytes())?;
            key
        }
        // Clients pin ca.crt: never replace it behind their back.
        _ => {
            return Err(TlsError::Unusable {
                path: dir,
                reason: "it holds only one of ca.crt and ca.key; restore the other, or remove \
                         both to make a new CA (clients must then pin the new ca.crt)"
                    .into(),
            });
        }
    };
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut names: Vec<String> = LOOPBACK_NAMES.iter().map(|n| n.to_string()).collect();
    for name in sans {
        check_name(name)?;
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ceccm server");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, 2);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    write_public(&files.cert, cert.pem().as_bytes())?;
    Ok(files)
}

/// A SAN is an IP address or a DNS name (letters, digits, `-`, `.`, a leading `*.`).
fn check_name(name: &str) -> Result<(), TlsError> {
    let dns = !name.is_empty()
        && name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (i == 0 && label == "*")
                || (!label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        });
    if dns || name.parse::<IpAddr>().is_ok() {
        Ok(())
    } else {
        Err(TlsError::BadName {
            name: name.to_string(),
        })
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, 10);
    params
}

/// Valid from the first of January of last year (safe against a clock near New Year) to
/// `years` years after this one.
fn set_validity(params: &mut CertificateParams, years: i32) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A mean Gregorian year: off by at most a day or so, which the margins absorb.
    let year = 1970 + i32::try_from(now / 31_556_952).unwrap_or(0);
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a key: readable by the owner only, replaced atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// `builder`, trusting the certificates of the PEM file `ca_file` besides the built-in roots.
pub fn trusting(
    builder: reqwest::ClientBuilder,
    ca_file: Option<&Path>,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let Some(path) = ca_file else {
        return Ok(builder);
    };
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| TlsError::Unusable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certificates
        .into_iter()
        .fold(builder, reqwest::ClientBuilder::add_root_certificate))
}

/// The URL the server's own workers reach it at: its address, with loopback in place of an
/// unspecified one (`0.0.0.0` is in no certificate).
pub fn local_url(addr: SocketAddr, tls: bool) -> String {
    if !tls {
        return format!("http://{addr}");
    }
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        });
    }
    format!("https://{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{ServerOptions, start};

    fn options(data_dir: &Path, tls: TlsMode) -> ServerOptions {
        ServerOptions {
            listen: "127.0.0.1:0".parse().expect("address"),
            data_dir: data_dir.to_path_buf(),
            database_url: None,
            lease_seconds: 30,
            worker_program: PathBuf::from("/nonexistent/ceccm"),
            anonymous_metrics: false,
            tls,
            user_quota_bytes: None,
            region_grace: crate::server::DEFAULT_REGION_GRACE,
            transport: Default::default(),
        }
    }

    fn client(ca_file: &Path) -> reqwest::Client {
        trusting(reqwest::Client::builder(), Some(ca_file))
            .expect("trust the CA")
            .build()
            .expect("client")
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn a_self_signed_server_is_trusted_through_its_ca_and_keeps_it_across_restarts() {
        let data = tempfile::tempdir().expect("data dir");
        let self_signed = TlsMode::SelfSigned {
            sans: vec!["ceccm.example.org".into(), "10.1.2.3".into()],
        };
        let server = start(options(data.path(), self_signed.clone()))
            .await
            .expect("start");
        assert!(
            server.url().starts_with("https://127.0.0.1:"),
            "{}",
            server.url()
        );
        let files = SelfSignedFiles::in_data_dir(data.path());
        assert_eq!(mode(&files.ca_key), 0o600, "the CA's key is private");
        assert_eq!(mode(&files.key), 0o600, "the server's key is private");
        let ca = std::fs::read(&files.ca_cert).expect("ca.crt");
        let answer = client(&files.ca_cert)
            .get(format!("{}/healthz", server.url()))
            .send()
            .await
            .expect("https with the CA");
        assert_eq!(answer.status(), reqwest::StatusCode::OK);
        server.shutdown().await;

        // Restart: the same CA, a new server certificate that still chains to it.
        let server = start(options(data.path(), self_signed))
            .await
            .expect("restart");
        assert_eq!(
            std::fs::read(&files.ca_cert).expect("ca.crt"),
            ca,
            "CA kept"
        );
        let answer = client(&files.ca_cert)
            .get(format!("{}/healthz", server.url()))
            .send()
            .await
            .expect("https with the same CA after a restart");
        assert_eq!(answer.status(), reqwest::StatusCode::OK);

        // Another server's CA is refused, and so is no CA at all (the built-in roots).
        let other = tempfile::tempdir().expect("other dir");
        let other_files = ensure_self_signed(other.path(), &[]).expect("another CA");
        for refused in [
            client(&other_files.ca_cert),
            reqwest::Client::builder().build().expect("client"),
        ] {
            let error = refused
                .get(format!("{}/healthz", server.url()))
                .send()
                .await
                .expect_err("a wrong CA is refused");
            let chain =
                std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            assert!(chain.contains("certificate"), "{chain}");
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn an_operators_certificate_files_are_served() {
        // An operator's files: here a chain made by another self-signed setup.
        let issued = tempfile::tempdir().expect("issuer dir");
        let files = ensure_self_signed(issued.path(), &[]).expect("certificate");
        let data = tempfile::tempdir().expect("data dir");
        let server = start(options(
            data.path(),
            TlsMode::Files {
                cert: files.cert.clone(),
                key: files.key.clone(),
            },
        ))
        .await
        .expect("start");
        let answer = client(&files.ca_cert)
            .get(format!("{}/healthz", server.url()))
            .send()
            .await
            .expect("https");
        assert_eq!(answer.status(), reqwest::StatusCode::OK);
        assert!(!data.path().join("tls").exists(), "no CA of its own");
        server.shutdown().await;

        // A key that does not match the certificate is refused at start, naming the file.
        let data = tempfile::tempdir().expect("data dir");
        let error = start(options(
            data.path(),
            TlsMode::Files {
                cert: files.cert.clone(),
                key: files.ca_key.clone(),
            },
        ))
        .await
        .err()
        .expect("mismatched key refused");
        assert!(error.to_string().contains("server.crt"), "{error}");
    }

    #[test]
    fn names_are_checked_and_a_half_ca_is_never_replaced() {
        let data = tempfile::tempdir().expect("data dir");
        for bad in ["", "a b", "-x.org", "x..org", "ex ample"] {
            assert!(
                matches!(
                    ensure_self_signed(data.path(), &[bad.to_string()]),
                    Err(TlsError::BadName { .. })
                ),
                "{bad:?}"
            );
        }
        for good in [
            "ceccm.caha.es",
            "*.caha.es",
            "fe80::1",
            "192.168.0.7",
            "node-1",
        ] {
            ensure_self_signed(data.path(), &[good.to_string()]).expect(good);
        }
        let files = SelfSignedFiles::in_data_dir(data.path());
        std::fs::remove_file(&files.ca_key).expect("remove the CA key");
        let error = ensure_self_signed(data.path(), &[]).expect_err("half a CA");
        assert!(
            error.to_string().contains("only one of ca.crt and ca.key"),
            "{error}"
        );
        assert!(files.ca_cert.exists(), "ca.crt is left alone");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").expect("write");
        assert!(matches!(
            trusting(reqwest::Client::builder(), Some(&empty)),
            Err(TlsError::NoCertificate { .. })
        ));
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            trusting(reqwest::Client::builder(), Some(&missing)),
            Err(TlsError::Read { .. })
        ));
    }

    #[test]
    fn workers_reach_an_unspecified_address_over_loopback() {
        let any: SocketAddr = "0.0.0.0:8443".parse().expect("address");
        assert_eq!(local_url(any, true), "https://127.0.0.1:8443");
        assert_eq!(local_url(any, false), "http://0.0.0.0:8443");
        let any6: SocketAddr = "[::]:8443".parse().expect("address");
        assert_eq!(local_url(any6, true), "https://[::1]:8443");
    }
}
