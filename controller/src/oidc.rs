//! OIDC ID tokens: a second way in, for sites with an identity provider (IRIS and CASU use
//! IAM), as the Kubernetes API server's `--oidc-*` flags.
//!
//! `ceccm server --oidc-issuer URL --oidc-audience AUD --oidc-jwks FILE_OR_URL` accepts, besides
//! ceccm's own tokens, a bearer token that is a JWT signed with RS256 or ES256 by one of the
//! keys of the JWKS, whose `iss` is the issuer, whose `aud` names the audience, and which is
//! within `nbf`..`exp` (with [`LEEWAY_SECONDS`] of leeway). Anything else is a 401 with the
//! error JSON. The user is the `--oidc-username-claim` (`sub` by default; `email` only when
//! `email_verified` is not false) behind `--oidc-username-prefix` (`oidc:` by default), so an
//! identity provider's user can never be mistaken for a token user (whose names are DNS
//! labels, without a colon). The role comes from the `--oidc-groups-claim` (`groups`) through
//! `--oidc-role GROUP=ROLE`: the highest role any group maps to. A token whose groups map to
//! none authenticates but may do nothing: 403, as a Kubernetes user without bindings.
//!
//! Signatures are checked by `jsonwebtoken` (maintained, the most used JWT crate; it refuses
//! `alg: none` and checks that the key's family fits the algorithm) over its pure-Rust
//! RustCrypto backend. A token naming a `kid` the keys do not hold makes the server read the
//! JWKS again (a file when it changed, a URL at most once a minute), so an identity provider
//! may rotate its keys without a restart.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::RwLock;

use crate::auth::Role;
use crate::error::{ApiError, ErrorCode};

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 30;

/// The algorithms an ID token may be signed with.
pub const ALGORITHMS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

/// How often a JWKS URL may be fetched again for an unknown key id.
const URL_REFRESH: Duration = Duration::from_secs(60);

/// `ceccm server`'s OIDC options.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OidcArgs {
    /// Accept OIDC ID tokens from this issuer (the tokens' `iss`, exactly)
    #[arg(long, value_name = "URL", requires_all = ["oidc_audience", "oidc_jwks"])]
    pub oidc_issuer: Option<String>,
    /// The audience ID tokens must name in `aud` (the client id)
    #[arg(long, value_name = "AUD", requires = "oidc_issuer")]
    pub oidc_audience: Option<String>,
    /// The issuer's signing keys: a JWKS file, or an https URL (its jwks_uri)
    #[arg(long, value_name = "FILE_OR_URL", requires = "oidc_issuer")]
    pub oidc_jwks: Option<String>,
    /// The claim that names the user: sub or email
    #[arg(long, value_name = "CLAIM", default_value = "sub", value_parser = ["sub", "email"])]
    pub oidc_username_claim: String,
    /// Put before every OIDC user name, so none is mistaken for a token user
    #[arg(long, value_name = "PREFIX", default_value = "oidc:")]
    pub oidc_username_prefix: String,
    /// The claim that lists the user's groups
    #[arg(long, value_name = "CLAIM", default_value = "groups")]
    pub oidc_groups_claim: String,
    /// GROUP=ROLE: members of GROUP get ROLE (viewer, user, operator or admin); may repeat.
    /// The highest role of a user's groups counts; with none, every request is a 403
    #[arg(long = "oidc-role", value_name = "GROUP=ROLE")]
    pub oidc_roles: Vec<String>,
}

/// Where the keys are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

impl JwksSource {
    pub fn parse(text: &str) -> JwksSource {
        if text.starts_with("https://") || text.starts_with("http://") {
            JwksSource::Url(text.to_string())
        } else {
            JwksSource::File(PathBuf::from(text))
        }
    }
}

/// What the server checks ID tokens against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub username_claim: String,
    pub username_prefix: String,
    pub groups_claim: String,
    /// Group to role, in the order given.
    pub roles: Vec<(String, Role)>,
}

/// A configuration that cannot work; the server refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error(
        "--oidc-role {0:?}: expected GROUP=ROLE with ROLE one of viewer, user, operator, admin"
    )]
    BadRole(String),
    #[error(
        "--oidc-username-prefix {0:?}: must end in ':' and hold no other ':' (token users' names are DNS labels; the prefix keeps OIDC users apart from them)"
    )]
    BadPrefix(String),
    #[error("cannot read the JWKS {path}: {reason}")]
    Jwks { path: String, reason: String },
}

impl OidcArgs {
    /// The configuration, or `None` without `--oidc-issuer`.
    pub fn config(&self) -> Result<Option<OidcConfig>, OidcError> {
        let (Some(issuer), Some(audience), Some(jwks)) =
            (&self.oidc_issuer, &self.oidc_audience, &self.oidc_jwks)
        else {
            return Ok(None);
        };
        let prefix = &self.oidc_username_prefix;
        if !prefix.ends_with(':') || prefix.matches(':').count() != 1 {
            return Err(OidcError::BadPrefix(prefix.clone()));
        }
        if jwks.starts_with("http://") {
            return Err(OidcError::Jwks {
                path: jwks.clone(),
                reason: "keys are fetched over https only (or give a file)".into(),
            });
        }
        let roles = self
            .oidc_roles
            .iter()
            .map(|m| parse_role_mapping(m).ok_or_else(|| OidcError::BadRole(m.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(OidcConfig {
            issuer: issuer.clone(),
            audience: audience.clone(),
            jwks: JwksSource::parse(jwks),
            username_claim: self.oidc_username_claim.clone(),
            username_prefix: prefix.clone(),
            groups_claim: self.oidc_groups_claim.clone(),
            roles,
        }))
    }
}

/// `GROUP=ROLE`, ROLE a human role (workers and agents have tokens of their own).
pub fn parse_role_mapping(text: &str) -> Option<(String, Role)> {
    let (group, role) = text.rsplit_once('=')?;
    let role = Role::parse(role)?;
    let human = matches!(
        role,
        Role::Viewer | Role::User | Role::Operator | Role::Admin
    );
    (!group.is_empty() && human).then(|| (group.to_string(), role))
}

/// The highest role that any of `groups` maps to; `None` when none does.
pub fn role_of(groups: &[String], roles: &[(String, Role)]) -> Option<Role> {
    roles
        .iter()
        .filter(|(group, _)| groups.contains(group))
        .map(|(_, role)| *role)
        .max()
}

/// Whether a bearer token has the shape of a JWT (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && !parts[0].is_empty()
        && !parts[1].is_empty()
}

/// Why an ID token does not authenticate (each a 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OidcRejected {
    /// Not a JWT, or its header names an algorithm other than RS256 and ES256 (`none` too).
    Algorithm,
    /// No key of the JWKS has the token's `kid` (or fits its algorithm).
    UnknownKey,
    /// No key's signature check passes.
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    /// A claim is missing or of the wrong type (named).
    Claim(String),
}

impl OidcRejected {
    pub fn message(&self) -> String {
        let what = match self {
            OidcRejected::Algorithm => "is not a JWT signed with RS256 or ES256".to_string(),
            OidcRejected::UnknownKey => "is signed by a key the issuer's JWKS does not hold".into(),
            OidcRejected::Signature => "has a signature that does not verify".into(),
            OidcRejected::Expired => "has expired".into(),
            OidcRejected::NotYetValid => "is not valid yet (nbf)".into(),
            OidcRejected::Issuer => "is not from the configured issuer (iss)".into(),
            OidcRejected::Audience => "is not for this server's audience (aud)".into(),
            OidcRejected::Claim(claim) => format!("lacks a valid {claim:?} claim"),
        };
        format!("the OIDC ID token {what}")
    }

    pub fn into_error(self) -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, self.message())
            .with_details(serde_json::json!({"authenticator": "oidc"}))
    }
}

/// Who an ID token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIdentity {
    /// With the prefix.
    pub user: String,
    pub groups: Vec<String>,
}

/// The user and groups of verified `claims`.
pub fn identity(config: &OidcConfig, claims: &Value) -> Result<OidcIdentity, OidcRejected> {
    let claim = &config.username_claim;
    let name = claims[claim]
        .as_str()
        .filter(|n| !n.is_empty() && n.len() <= 253 && !n.chars().any(char::is_control))
        .ok_or_else(|| OidcRejected::Claim(claim.clone()))?;
    // As Kubernetes: an email names the user only once the provider has verified it.
    if claim == "email" && claims["email_verified"] == Value::Bool(false) {
        return Err(OidcRejected::Claim("email_verified".into()));
    }
    let groups = match &claims[&config.groups_claim] {
        Value::Null => Vec::new(),
        Value::String(g) => vec![g.clone()],
        Value::Array(items) => items
            .iter()
            .map(|g| g.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| OidcRejected::Claim(config.groups_claim.clone()))?,
        _ => return Err(OidcRejected::Claim(config.groups_claim.clone())),
    };
    Ok(OidcIdentity {
        user: format!("{}{name}", config.username_prefix),
        groups,
    })
}

/// The keys fit for `alg` among `keys`, by `kid` when the token names one.
fn candidates<'a>(keys: &'a JwkSet, alg: Algorithm, kid: Option<&str>) -> Vec<&'a Jwk> {
    keys.keys
        .iter()
        .filter(|k| kid.is_none_or(|kid| k.common.key_id.as_deref() == Some(kid)))
        .filter(|k| {
            k.common.key_algorithm.is_none_or(|a| match alg {
                Algorithm::RS256 => a == KeyAlgorithm::RS256,
                Algorithm::ES256 => a == KeyAlgorithm::ES256,
                _ => false,
            })
        })
        .filter(|k| match (&k.algorithm, alg) {
            (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
            (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
                ec.curve == EllipticCurve::P256
            }
            _ => false,
        })
        .collect()
}

struct Keys {
    set: JwkSet,
    /// When the keys were read, and the file's modification time and length then.
    read_at: Instant,
    file_stamp: Option<(SystemTime, u64)>,
}

/// Checks ID tokens against the configuration and the issuer's keys.
pub struct Verifier {
    config: OidcConfig,
    keys: RwLock<Keys>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Reads the keys once: a server whose keys cannot be read does not start.
    pub async fn new(config: OidcConfig) -> Result<Verifier, OidcError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| OidcError::Jwks {
                path: format!("{:?}", config.jwks),
                reason: e.to_string(),
            })?;
        let keys = load(&client, &config.jwks).await?;
        Ok(Verifier {
            config,
            keys: RwLock::new(keys),
            client,
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// The identity of a valid ID token.
    pub async fn verify(&self, token: &str) -> Result<OidcIdentity, OidcRejected> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| OidcRejected::Algorithm)?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(OidcRejected::Algorithm);
        }
        let kid = header.kid.as_deref();
        let mut found = {
            let keys = self.keys.read().await;
            candidates(&keys.set, header.alg, kid)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        };
        if found.is_empty() && kid.is_some() && self.refresh().await {
            let keys = self.keys.read().await;
            found = candidates(&keys.set, header.alg, kid)
                .into_iter()
                .cloned()
                .collect();
        }
        if found.is_empty() {
            return Err(OidcRejected::UnknownKey);
        }
        let validation = self.validation(header.alg);
        let mut last = OidcRejected::Signature;
        for jwk in &found {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<Value>(token, &key, &validation) {
                Ok(data) => return identity(&self.config, &data.claims),
                Err(e) => {
                    last = rejection(e.kind());
                    // Another key may verify it; a claim error is final (the signature held).
                    if last != OidcRejected::Signature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.required_spec_claims = ["exp", "iss", "aud"]
            .into_iter()
            .map(str::to_string)
            .collect::<HashSet<_>>();
        validation
    }

    /// Reads the keys again if they may have changed: a file whose time or length changed,
    /// a URL not fetched in the last minute. Whether it read them.
    async fn refresh(&self) -> bool {
        let mut keys = self.keys.write().await;
        let due = match &self.config.jwks {
            JwksSource::File(path) => stamp(path) != keys.file_stamp,
            JwksSource::Url(_) => keys.read_at.elapsed() >= URL_REFRESH,
        };
        if !due {
            return false;
        }
        match load(&self.client, &self.config.jwks).await {
            Ok(new) => {
                *keys = new;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the OIDC keys again failed; the old ones stay");
                keys.read_at = Instant::now();
                false
            }
        }
    }
}

fn rejection(kind: &jsonwebtoken::errors::ErrorKind) -> OidcRejected {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => OidcRejected::Expired,
        K::ImmatureSignature => OidcRejected::NotYetValid,
        K::InvalidIssuer => OidcRejected::Issuer,
        K::InvalidAudience => OidcRejected::Audience,
        K::MissingRequiredClaim(c) => OidcRejected::Claim(c.clone()),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => OidcRejected::Algorithm,
        K::Json(_) | K::Utf8(_) | K::Base64(_) | K::InvalidToken => {
            OidcRejected::Claim("payload".into())
        }
        _ => OidcRejected::Signature,
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

async fn load(client: &reqwest::Client, source: &JwksSource) -> Result<Keys, OidcError> {
    let (name, text, file_stamp) = match source {
        JwksSource::File(path) => {
            let file_stamp = stamp(path);
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| OidcError::Jwks {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            (path.display().to_string(), text, file_stamp)
        }
        JwksSource::Url(url) => {
            let fetch = async {
                client
                    .get(url)
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await
            };
            let text = fetch.await.map_err(|e: reqwest::Error| OidcError::Jwks {
                path: url.clone(),
                reason: e.to_string(),
            })?;
            (url.clone(), text, None)
        }
    };
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| OidcError::Jwks {
        path: name.clone(),
        reason: format!("not a JWKS: {e}"),
    })?;
    if set.keys.is_empty() {
        return Err(OidcError::Jwks {
            path: name,
            reason: "it holds no keys".into(),
        });
    }
    Ok(Keys {
        set,
        read_at: Instant::now(),
        file_stamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_map_to_their_highest_role_and_mappings_are_checked() {
        let roles: Vec<(String, Role)> = ["astro=user", "ops=operator", "guests=viewer"]
            .into_iter()
            .map(|m| parse_role_mapping(m).unwrap())
            .collect();
        let groups = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(role_of(&groups(&["astro"]), &roles), Some(Role::User));
        assert_eq!(
            role_of(&groups(&["guests", "ops", "astro"]), &roles),
            Some(Role::Operator)
        );
        assert_eq!(role_of(&groups(&["other"]), &roles), None);
        assert_eq!(role_of(&[], &roles), None);
        assert_eq!(
            parse_role_mapping("cn=x,ou=y=admin"),
            Some(("cn=x,ou=y".into(), Role::Admin))
        );
        for bad in [
            "astro",
            "=user",
            "astro=root",
            "w=worker",
            "a=agent",
            "j=join",
        ] {
            assert_eq!(parse_role_mapping(bad), None, "{bad}");
        }
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        let args = |jwks: &str, prefix: &str, role: &str| OidcArgs {
            oidc_issuer: Some("https://iam.example.org/".into()),
            oidc_audience: Some("ceccm".into()),
            oidc_jwks: Some(jwks.into()),
            oidc_username_claim: "sub".into(),
            oidc_username_prefix: prefix.into(),
            oidc_groups_claim: "groups".into(),
            oidc_roles: vec![role.into()],
        };
        let config = args("https://iam.example.org/jwks", "oidc:", "astro=user")
            .config()
            .unwrap()
            .unwrap();
        assert_eq!(config.roles, [("astro".to_string(), Role::User)]);
        assert!(matches!(
            args("http://iam.example.org/jwks", "oidc:", "astro=user").config(),
            Err(OidcError::Jwks { .. })
        ));
        for prefix in ["", "oidc", "a:b:"] {
            assert!(matches!(
                args("/jwks.json", prefix, "astro=user").config(),
                Err(OidcError::BadPrefix(_))
            ));
        }
        assert!(matches!(
            args("/jwks.json", "oidc:", "astro=worker").config(),
            Err(OidcError::BadRole(_))
        ));
        assert!(OidcArgs::default().config().unwrap().is_none());
    }

    #[test]
    fn the_username_claim_is_prefixed_and_an_unverified_email_refused() {
        let mut config = OidcConfig {
            issuer: "https://iam.example.org/".into(),
            audience: "ceccm".into(),
            jwks: JwksSource::parse("/etc/jwks.json"),
            username_claim: "sub".into(),
            username_prefix: "oidc:".into(),
            groups_claim: "groups".into(),
            roles: vec![],
        };
        let claims = serde_json::json!({"sub": "ana", "email": "ana@x.org",
                                        "email_verified": false, "groups": ["a", "b"]});
        assert_eq!(
            identity(&config, &claims),
            Ok(OidcIdentity {
                user: "oidc:ana".into(),
                groups: vec!["a".into(), "b".into()]
            })
        );
        config.username_claim = "email".into();
        assert_eq!(
            identity(&config, &claims),
            Err(OidcRejected::Claim("email_verified".into()))
        );
        let verified = serde_json::json!({"email": "ana@x.org", "groups": "a"});
        assert_eq!(identity(&config, &verified).unwrap().user, "oidc:ana@x.org");
        assert_eq!(identity(&config, &verified).unwrap().groups, ["a"]);
        for bad in [
            serde_json::json!({"sub": "ana"}),
            serde_json::json!({"email": ""}),
            serde_json::json!({"email": 7}),
            serde_json::json!({"email": "a@b", "groups": [1]}),
        ] {
            assert!(identity(&config, &bad).is_err(), "{bad}");
        }
        assert_eq!(
            JwksSource::parse("https://iam.example.org/jwks"),
            JwksSource::Url("https://iam.example.org/jwks".into())
        );
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("ceccm_00_11"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a b.c.d"));
    }
}
