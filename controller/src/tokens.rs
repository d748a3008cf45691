//! Tokens at the API's edge: the middleware that authenticates each request, the token
//! endpoints (`/api/v1/tokens`), and the administrator token of a data directory.
//!
//! Two kinds of tokens, as the Kubernetes API server has a static token file beside its
//! dynamic credentials: *static* tokens held in memory by the server (the administrator's,
//! read from `DATA_DIR/admin.token`, and the local driver's worker token, new at each start),
//! and *stored* tokens that administrators make and revoke through the API (`Token` objects
//! holding the sha256 of their secret).

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::auth::{
    ADMIN_TOKEN_FILE, JOIN_TOKEN_FILE, PresentedToken, Principal, Rejected, Role, TokenSpec,
    check_token, new_token, secret_hash, unauthenticated,
};
use crate::error::ApiError;
use crate::resources::Kind;
use crate::store::{Change, Store};

/// A token the server holds in memory: its id and record.
#[derive(Debug, Clone)]
pub struct StaticToken {
    pub id: String,
    pub spec: TokenSpec,
}

impl StaticToken {
    /// A static token for `token` (a whole `ceccm_<id>_<secret>` string).
    pub fn new(token: &str, user: &str, role: Role) -> Option<StaticToken> {
        let presented = PresentedToken::parse(token)?;
        Some(StaticToken {
            id: presented.id.to_string(),
            spec: TokenSpec {
                user: user.to_string(),
                role,
                expires_at: None,
                secret_sha256: secret_hash(presented.secret),
                region: None,
            },
        })
    }
}

/// The administrator token of `data_dir`: read from `admin.token`, or made and written there
/// (mode 0600) on first start.
pub fn ensure_admin_token(data_dir: &Path) -> std::io::Result<StaticToken> {
    ensure_static_token(data_dir, ADMIN_TOKEN_FILE, "admin", Role::Admin)
}

/// The join token of `data_dir` (`join.token`, made on first start like k3s's node-token):
/// agents exchange it for a token bound to their region.
pub fn ensure_join_token(data_dir: &Path) -> std::io::Result<StaticToken> {
    ensure_static_token(data_dir, JOIN_TOKEN_FILE, "join", Role::Join)
}

fn ensure_static_token(
    data_dir: &Path,
    file: &str,
    user: &str,
    role: Role,
) -> std::io::Result<StaticToken> {
    let path = data_dir.join(file);
    let token = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (_, token) = new_token();
            write_private(&path, &format!("{token}\n"))?;
            token
        }
        Err(e) => return Err(e),
    };
    StaticToken::new(&token, user, role).ok_or_else(|| {
        std::io::Error::other(format!(
            "{} does not hold a ceccm token (ceccm_<id>_<secret>); remove it to make a new one",
            path.display()
        ))
    })
}

/// Writes `text` to a new file readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Finds who presents `authorization` (the header's value) or, without one, the verified
/// client certificate of the connection (`subject`).
async fn principal_of(
    state: &AppState,
    authorization: Option<&str>,
    subject: Option<crate::tls::CertificateSubject>,
) -> Result<Principal, ApiError> {
    let Some(value) = authorization else {
        return match subject {
            Some(subject) => crate::auth::certificate_principal(&subject),
            None => Err(unauthenticated(Rejected::Missing)),
        };
    };
    let token = value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or_else(|| unauthenticated(Rejected::Malformed))?;
    if let Some(oidc) = &state.config.oidc
        && !token.starts_with("ceccm_")
        && crate::oidc::looks_like_jwt(token)
    {
        let identity = oidc.verify(token).await.map_err(|why| {
            tracing::info!(?why, "refused an OIDC ID token");
            why.into_error()
        })?;
        return crate::auth::oidc_principal(identity, &oidc.config().roles);
    }
    let presented =
        PresentedToken::parse(token).ok_or_else(|| unauthenticated(Rejected::Malformed))?;
    let now = crate::time::now_millis();
    if let Some(known) = state
        .config
        .static_tokens
        .iter()
        .find(|t| t.id == presented.id)
    {
        return check_token(&presented, Some(&known.spec), now).map_err(unauthenticated);
    }
    let stored = state.store.get(Kind::Token, presented.id).await?;
    let spec = stored.and_then(|o| serde_json::from_value::<TokenSpec>(o["spec"].clone()).ok());
    check_token(&presented, spec.as_ref(), now).map_err(|why| {
        // The id only: a token's secret never reaches a log.
        tracing::info!(token = presented.id, ?why, "refused a bearer token");
        unauthenticated(why)
    })
}

/// The subject of the client certificate the connection's TLS handshake verified, when the
/// server takes client certificates.
fn client_subject(state: &AppState, request: &Request) -> Option<crate::tls::CertificateSubject> {
    if !state.config.client_certificates {
        return None;
    }
    let info = request
        .extensions()
        .get::<std::sync::Arc<axum_server::tls::TlsInfo>>()?;
    crate::tls::subject_of(info.peer_certificates.first()?)
}

/// Authenticates every request but the health checks (and `/metrics` when the server allows
/// it anonymously); handlers find the [`Principal`] in the request's extensions.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if path == "/healthz"
        || path == "/readyz"
        || (path == "/metrics" && state.config.anonymous_metrics)
    {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let subject = client_subject(&state, &request);
    match principal_of(&state, authorization.as_deref(), subject).await {
        Ok(principal) => {
            let audited = crate::audit::mutating(request.method()).then(|| {
                (
                    request.method().to_string(),
                    request.uri().path().to_string(),
                )
            });
            request.extensions_mut().insert(principal.clone());
            let response = next.run(request).await;
            if let Some((method, path)) = audited {
                let entry = crate::audit::AuditEntry {
                    time: crate::time::now_rfc3339(),
                    user: principal.user,
                    role: principal.role.as_str().to_string(),
                    method,
                    path,
                    status: response.status().as_u16(),
                };
                if let Err(e) = crate::audit::record(&state.config.data_dir, &entry).await {
                    tracing::error!(error = %e, "writing the audit log failed");
                }
            }
            response
        }
        Err(e) => {
            let unauthorized = e.code == crate::error::ErrorCode::Unauthorized;
            let mut response = e.into_response();
            if unauthorized {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            response
        }
    }
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenRequest {
    /// The user the token acts for.
    #[schema(max_length = 63, pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    pub user: String,
    /// viewer | user | operator | admin | worker
    #[schema(pattern = "^(viewer|user|operator|admin|worker)$")]
    pub role: String,
    /// Lifetime in seconds; none: never expires.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 315360000)]
    pub ttl_seconds: Option<u64>,
}

/// A token as listed (never its secret).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The region an agent's token acts for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

fn info(id: &str, spec: &TokenSpec) -> TokenInfo {
    TokenInfo {
        id: id.to_string(),
        user: spec.user.clone(),
        role: spec.role.as_str().to_string(),
        expires_at: spec.expires_at.clone(),
        region: spec.region.clone(),
        token: None,
    }
}

/// Makes a stored token; the answer is the only place its secret appears.
pub async fn create(store: &Store, request: TokenRequest) -> Result<TokenInfo, ApiError> {
    let invalid = |field: &str, message: String| {
        ApiError::invalid(
            "Token",
            &request.user,
            &[ceccm_federation::Violation::new(field, message)],
        )
    };
    crate::resources::validate_name(&request.user).map_err(|_| {
        invalid(
            "user",
            format!("{:?} is not a valid user name (a DNS label)", request.user),
        )
    })?;
    let role = Role::parse(&request.role)
        .filter(|r| Role::GRANTABLE.contains(r))
        .ok_or_else(|| {
            invalid(
                "role",
                format!(
                    "{:?} is not a role: viewer, user, operator, admin or worker",
                    request.role
                ),
            )
        })?;
    const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;
    if request.ttl_seconds.is_some_and(|t| t == 0 || t > TEN_YEARS) {
        return Err(invalid(
            "ttlSeconds",
            format!("must be 1 to {TEN_YEARS} seconds"),
        ));
    }
    let expires_at = request
        .ttl_seconds
        .map(|t| crate::time::format_millis(crate::time::now_millis() + 1000 * t as i64));
    mint(store, &request.user, role, expires_at, None).await
}

/// Stores a new token for `user` with `role` (bound to `region` for an agent); the answer is
/// the only place its secret appears.
pub async fn mint(
    store: &Store,
    user: &str,
    role: Role,
    expires_at: Option<String>,
    region: Option<String>,
) -> Result<TokenInfo, ApiError> {
    let (id, token) = new_token();
    let presented = PresentedToken::parse(&token).expect("a new token parses");
    let spec = TokenSpec {
        user: user.to_string(),
        role,
        expires_at,
        secret_sha256: secret_hash(presented.secret),
        region,
    };
    let object = serde_json::json!({
        "apiVersion": "ceccm/v1",
        "kind": "Token",
        "metadata": {"name": id, "creationTimestamp": crate::time::now_rfc3339()},
        "spec": spec,
    });
    store
        .write(Kind::Token, &id, |_| Ok::<_, ApiError>(Change::Put(object)))
        .await?;
    Ok(TokenInfo {
        token: Some(token),
        ..info(&id, &spec)
    })
}

/// Revokes every agent token of `region` (a new agent joining replaces the old one); returns
/// how many.
pub async fn revoke_agents_of(store: &Store, region: &str) -> Result<u32, ApiError> {
    let mut revoked = 0;
    for object in store.list(Kind::Token, &Default::default()).await? {
        let Ok(spec) = serde_json::from_value::<TokenSpec>(object["spec"].clone()) else {
            continue;
        };
        if spec.role == Role::Agent && spec.region.as_deref() == Some(region) {
            let id = object["metadata"]["name"].as_str().unwrap_or_default();
            store
                .write(Kind::Token, id, |_| Ok::<_, ApiError>(Change::Delete))
                .await?;
            revoked += 1;
        }
    }
    Ok(revoked)
}

/// Every stored token, without secrets.
pub async fn list(store: &Store) -> Result<TokenList, ApiError> {
    let items = store
        .list(Kind::Token, &Default::default())
        .await?
        .into_iter()
        .filter_map(|o| {
            let id = o["metadata"]["name"].as_str()?.to_string();
            let spec: TokenSpec = serde_json::from_value(o["spec"].clone()).ok()?;
            Some(info(&id, &spec))
        })
        .collect();
    Ok(TokenList { items })
}

/// Revokes a stored token; returns what it was.
pub async fn revoke(store: &Store, id: &str) -> Result<TokenInfo, ApiError> {
    let spec = store
        .get(Kind::Token, id)
        .await?
        .and_then(|o| serde_json::from_value::<TokenSpec>(o["spec"].clone()).ok())
        .ok_or_else(|| ApiError::not_found("Token", id))?;
    store
        .write(Kind::Token, id, |_| Ok::<_, ApiError>(Change::Delete))
        .await?;
    Ok(info(id, &spec))
}

/// An HTTP client that presents `token` on every request (the secret is marked sensitive, so
/// it stays out of debug output).
pub fn client_with_token(
    builder: reqwest::ClientBuilder,
    token: &str,
) -> anyhow::Result<reqwest::Client> {
    let mut bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
    bearer.set_sensitive(true);
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, bearer);
    Ok(builder.default_headers(headers).build()?)
}

/// A client acting as the administrator of the server on `data_dir` (the demo, the benchmarks).
pub fn admin_client(data_dir: &Path) -> anyhow::Result<reqwest::Client> {
    let token = crate::auth::read_admin_token(data_dir)?;
    client_with_token(reqwest::Client::builder(), &token)
}
