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
    /// PEM file of the CA whose client certificates authenticate (mTLS, optional for
    /// clients): the subject's CN is the user, each O a role (viewer, user, operator, admin)
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
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
    /// The files served, read again when they change ([`reload_on_change`]).
    pub files: ServedFiles,
}

/// The files a TLS configuration is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl ServedFiles {
    /// The sha256 of the files' contents together: what tells a change (a file rewritten
    /// within the same second, or to the same length, still changes it).
    fn fingerprint(&self) -> Option<String> {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for path in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
        {
            hash.update(std::fs::read(path).ok()?);
            hash.update([0u8]);
        }
        Some(hex::encode(hash.finalize()))
    }
}

/// The rustls configuration of `files`: their certificate chain and key, and when a client CA
/// is given, client certificates verified against it (optional for clients: one without a
/// certificate authenticates with a bearer token; one with a certificate the CA did not
/// sign fails the handshake).
pub fn server_config(
    files: &ServedFiles,
) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use std::sync::Arc;
    let unusable = |path: &Path, reason: String| TlsError::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let chain = CertificateDer::pem_slice_iter(&read(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(&files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| unusable(&files.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable(&files.cert, e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
                let cert = cert.map_err(|e| unusable(ca, e.to_string()))?;
                roots.add(cert).map_err(|e| unusable(ca, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(TlsError::NoCertificate { path: ca.clone() });
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| unusable(ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| unusable(&files.cert, format!("{e} (key {})", files.key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves new connections with the files' new contents once they change (checked every
/// `every`) or on SIGHUP, without a restart; connections already open keep theirs. A change
/// that does not make a usable configuration (a certificate written before its key, say) is
/// logged and the old one stays until the next change.
pub async fn reload_on_change(
    config: axum_server::tls_rustls::RustlsConfig,
    files: ServedFiles,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut served = files.fingerprint();
    loop {
        let forced = tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = files.fingerprint();
        if now.is_none() || (now == served && !forced) {
            continue;
        }
        served = now;
        match server_config(&files) {
            Ok(new) => {
                config.reload_from_config(new);
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS files changed but are not usable; serving the previous ones")
            }
        }
    }
}

/// Who a verified client certificate names: its subject's CN and O values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSubject {
    pub common_name: Option<String>,
    pub organizations: Vec<String>,
}

/// The subject of a DER certificate (already verified by the TLS handshake).
pub fn subject_of(der: &[u8]) -> Option<CertificateSubject> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let text =
        |a: &x509_parser::x509::AttributeTypeAndValue<'_>| a.as_str().ok().map(str::to_string);
    Some(CertificateSubject {
        common_name: subject.iter_common_name().next().and_then(text),
        organizations: subject.iter_organization().filter_map(text).collect(),
    })
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

/// Readies the server's TLS: `None` for plain HTTP. With `client_ca`, clients may
/// authenticate with a certificate it signed.
pub async fn prepare(
    mode: &TlsMode,
    data_dir: &Path,
    client_ca: Option<&Path>,
) -> Result<Option<ServingTls>, TlsError> {
    let (cert, key, trust) = match mode {
        TlsMode::Plain => return Ok(None),
        TlsMode::Files { cert, key } => (cert.clone(), key.clone(), cert.clone()),
        TlsMode::SelfSigned { sans } => {
            let files = ensure_self_signed(data_dir, sans)?;
            (files.cert, files.key, files.ca_cert)
        }
    };
    let files = ServedFiles {
        cert,
        key,
        client_ca: client_ca.map(Path::to_path_buf),
    };
    let config = axum_server::tls_rustls::RustlsConfig::from_config(server_config(&files)?);
    Ok(Some(ServingTls {
        config,
        trust,
        files,
    }))
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
            tls_client_ca: None,
            oidc: None,
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

    /// A CA for client certificates, and certificates it issues: PEM of the certificate and
    /// its key together, as `reqwest::Identity::from_pem` takes them.
    struct ClientCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl ClientCa {
        fn new() -> ClientCa {
            let key = KeyPair::generate().expect("key");
            let pem = ca_params().self_signed(&key).expect("CA").pem();
            ClientCa {
                issuer: Issuer::new(ca_params(), key),
                pem,
            }
        }

        fn identity(&self, cn: &str, organizations: &[&str]) -> reqwest::Identity {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.distinguished_name.push(DnType::CommonName, cn);
            for o in organizations {
                params.distinguished_name.push(DnType::OrganizationName, *o);
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.use_authority_key_identifier_extension = true;
            set_validity(&mut params, 1);
            let key = KeyPair::generate().expect("key");
            let cert = params
                .signed_by(&key, &self.issuer)
                .expect("client certificate");
            let pem = format!("{}{}", cert.pem(), key.serialize_pem());
            reqwest::Identity::from_pem(pem.as_bytes()).expect("identity")
        }
    }

    #[tokio::test]
    async fn client_certificates_authenticate_by_their_subject() {
        let data = tempfile::tempdir().expect("data dir");
        let clients = ClientCa::new();
        let ca_file = data.path().join("clients-ca.crt");
        std::fs::write(&ca_file, &clients.pem).expect("write the client CA");
        let mut served = options(data.path(), TlsMode::SelfSigned { sans: vec![] });
        served.tls_client_ca = Some(ca_file);
        let server = start(served).await.expect("start");
        let server_ca = SelfSignedFiles::in_data_dir(data.path()).ca_cert;
        let with = |identity: Option<reqwest::Identity>| {
            let builder = trusting(reqwest::Client::builder(), Some(&server_ca)).expect("trust");
            match identity {
                Some(identity) => builder.identity(identity),
                None => builder,
            }
            .build()
            .expect("client")
        };
        let url = |path: &str| format!("{}{path}", server.url());
        let dataset = serde_json::json!({"apiVersion": "ceccm/v1", "kind": "Dataset",
            "metadata": {"name": "cube-ana"}, "spec": {"format": "cube"}});

        // CN ana, O user (and a group that is no role): a user named ana.
        let ana = with(Some(clients.identity("ana", &["astro", "user"])));
        let made = ana
            .post(url("/api/v1/datasets"))
            .json(&dataset)
            .send()
            .await
            .expect("create");
        assert_eq!(made.status(), reqwest::StatusCode::CREATED);
        let made: serde_json::Value = made.json().await.expect("json");
        assert_eq!(made["metadata"]["owner"], "ana");
        let region = serde_json::json!({"apiVersion": "ceccm/v1", "kind": "Region",
            "metadata": {"name": "r1"}, "spec": {"tier": "edge", "driver": "local", "capacity": {"cpu": 1}}});
        let refused = ana
            .post(url("/api/v1/regions"))
            .json(&region)
            .send()
            .await
            .expect("request");
        assert_eq!(refused.status(), reqwest::StatusCode::FORBIDDEN);

        // A bearer token, when sent, decides over the certificate.
        let admin = crate::auth::read_admin_token(data.path()).expect("admin token");
        let as_admin = ana
            .post(url("/api/v1/regions"))
            .bearer_auth(&admin)
            .json(&region)
            .send()
            .await
            .expect("request");
        assert_eq!(as_admin.status(), reqwest::StatusCode::CREATED);

        // No role among the O values: 403 with the error JSON; no certificate and no token: 401.
        for (client, status) in [
            (
                with(Some(clients.identity("bo", &["astro"]))),
                reqwest::StatusCode::FORBIDDEN,
            ),
            (
                with(Some(clients.identity("Not A Name", &["admin"]))),
                reqwest::StatusCode::UNAUTHORIZED,
            ),
            (with(None), reqwest::StatusCode::UNAUTHORIZED),
        ] {
            let answer = client
                .get(url("/api/v1/datasets"))
                .send()
                .await
                .expect("request");
            assert_eq!(answer.status(), status);
            let body: serde_json::Value = answer.json().await.expect("error JSON");
            assert!(body["error"]["message"].is_string(), "{body}");
        }
        // Without a token the health checks still answer.
        let health = with(None)
            .get(url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status(), reqwest::StatusCode::OK);

        // A certificate from another CA fails the handshake: no request reaches the API.
        let stranger = ClientCa::new().identity("ana", &["admin"]);
        let error = with(Some(stranger))
            .get(url("/api/v1/datasets"))
            .send()
            .await
            .expect_err("a certificate of another CA is refused");
        assert!(error.is_connect() || error.is_request(), "{error:?}");
        server.shutdown().await;

        // A client CA needs https.
        let plain = tempfile::tempdir().expect("data dir");
        let mut plain_options = options(plain.path(), TlsMode::Plain);
        plain_options.tls_client_ca = Some(plain.path().join("ca.crt"));
        let error = start(plain_options).await.err().expect("refused");
        assert!(
            error.to_string().contains("--tls-client-ca needs https"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn new_connections_get_the_certificate_files_new_contents() {
        // Two certificates from two CAs; the server starts with the first.
        let first = tempfile::tempdir().expect("dir");
        let second = tempfile::tempdir().expect("dir");
        let first = ensure_self_signed(first.path(), &[]).expect("first");
        let second = ensure_self_signed(second.path(), &[]).expect("second");
        let served = tempfile::tempdir().expect("dir");
        let (cert, key) = (served.path().join("tls.crt"), served.path().join("tls.key"));
        std::fs::copy(&first.cert, &cert).expect("copy");
        std::fs::copy(&first.key, &key).expect("copy");
        let data = tempfile::tempdir().expect("data dir");
        let server = start(options(
            data.path(),
            TlsMode::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
        ))
        .await
        .expect("start");
        // A new client per request: a new connection, so a new handshake.
        let healthz = |ca: PathBuf| {
            let url = format!("{}/healthz", server.url());
            async move { client(&ca).get(url).send().await.map(|r| r.status()) }
        };
        assert_eq!(
            healthz(first.ca_cert.clone())
                .await
                .expect("first certificate"),
            reqwest::StatusCode::OK
        );
        assert!(healthz(second.ca_cert.clone()).await.is_err());

        // The files are replaced (the key first: a moment of a mismatched pair, which the
        // server must ride out); new connections get the second certificate.
        std::fs::copy(&second.key, &key).expect("copy");
        std::fs::copy(&second.cert, &cert).expect("copy");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while healthz(second.ca_cert.clone()).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the new certificate is served within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(
            healthz(first.ca_cert.clone()).await.is_err(),
            "the old certificate is no longer served"
        );
        server.shutdown().await;
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
