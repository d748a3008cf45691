//! The REST API under `/api/v1`, built as one `Router` (`app`) whose OpenAPI document
//! (`openapi`) comes from the same route table.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{Action, Principal};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::metrics::Metrics;
use crate::objects;
use crate::predictor::SharedPredictor;
use crate::queue::{self, CompleteRequest, FailRequest, HeartbeatRequest, LeaseRequest};
use crate::reconcile::application::results_dir;
use crate::resources::{ApiObject, Kind, ObjectMeta, parse_submitted, read_only, validate_name};
use crate::selector::Selector;
use crate::store::{ChangeEvent, ChangeType, Query as StoreQuery, Store};

/// Limits and locations the API works with.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub data_dir: PathBuf,
    /// Largest object body (JSON or YAML) accepted.
    pub max_body_bytes: usize,
    /// Largest dataset upload.
    pub max_upload_bytes: u64,
    /// Tokens held in memory (the administrator's, the local driver's workers').
    pub static_tokens: Vec<crate::tokens::StaticToken>,
    /// Whether `/metrics` answers without a token.
    pub anonymous_metrics: bool,
    /// Per-user storage quota (`crate::quota`); none by default.
    pub quotas: crate::quota::Quotas,
    /// OIDC ID tokens, when the server accepts them (`crate::oidc`).
    pub oidc: Option<Arc<crate::oidc::Verifier>>,
    /// Whether verified client certificates authenticate (`--tls-client-ca`).
    pub client_certificates: bool,
}

impl ApiConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ApiConfig {
            data_dir,
            max_body_bytes: 1024 * 1024,
            max_upload_bytes: 4 * 1024 * 1024 * 1024,
            static_tokens: Vec::new(),
            anonymous_metrics: false,
            quotas: crate::quota::Quotas::default(),
            oidc: None,
            client_certificates: false,
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub config: Arc<ApiConfig>,
    pub metrics: Arc<Metrics>,
    /// Learns from each completed task's telemetry; the reconciler prices placements with it.
    pub predictor: SharedPredictor,
    /// What workers have sent of their running tasks' output.
    pub live_logs: Arc<crate::logs::LiveLogs>,
}

#[derive(OpenApi)]
#[openapi(components(schemas(
    ApiObject,
    ObjectMeta,
    ErrorBody,
    ceccm_federation::RegionSpec,
    ceccm_federation::RegionStatus,
    crate::resources::ApplicationSpec,
    crate::resources::ApplicationStatus,
    crate::resources::DatasetSpec,
    crate::resources::DatasetStatus,
    crate::resources::TaskSpec,
    crate::resources::TaskStatus
)), modifiers(&BearerAuth), security(("bearer" = [])))]
struct ApiDoc;

/// Every route but the health checks takes `Authorization: Bearer TOKEN`.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "ceccm_<id>_<secret>; the administrator's is in DATA_DIR/admin.token. \
                         Where the server is set up for them, also an OIDC ID token \
                         (--oidc-issuer), or instead a client certificate (--tls-client-ca)",
                    ))
                    .build(),
            ),
        );
    }
}

fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_objects, create_object))
        .routes(routes!(get_object, apply_object, delete_object))
        .routes(routes!(patch_status))
        .routes(routes!(upload_content, download_content))
        .routes(routes!(send_uplink))
        .routes(routes!(results_index))
        .routes(routes!(cancel_application))
        .routes(routes!(retry_application))
        .routes(routes!(upload_artifact))
        .routes(routes!(download_artifact))
        .routes(routes!(result_file))
        .routes(routes!(application_logs))
        .routes(routes!(join_region))
        .routes(routes!(region_heartbeat))
        .routes(routes!(drain_region))
        .routes(routes!(lease_task))
        .routes(routes!(heartbeat_task))
        .routes(routes!(append_task_log))
        .routes(routes!(complete_task))
        .routes(routes!(fail_task))
        .routes(routes!(predictor))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(audit_log))
        .routes(routes!(revoke_token))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The whole HTTP surface, ready to serve.
pub fn app(state: AppState) -> axum::Router {
    let (router, _) = router().split_for_parts();
    router
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::tokens::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

/// The OpenAPI document of `app`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = router().split_for_parts().1;
    doc.info.title = "ceccm".into();
    doc.info.description = Some(
        "Control plane for the cloud-edge continuum of astronomy. Every error is \
         {\"error\":{\"code\",\"message\",\"details\"}}; see docs/architecture.md."
            .into(),
    );
    doc.info.license = None;
    doc
}

// ---- request reading ------------------------------------------------------------------------

/// Reads a JSON or YAML body (by Content-Type) of at most `limit` bytes.
fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("request body exceeds the limit of {limit} bytes"),
    )
    .with_details(json!({"limitBytes": limit}))
}

/// Refuses a request whose declared `Content-Length` is over `limit` before a byte of its body
/// is read or written.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

fn refuse_declared_over(headers: &HeaderMap, limit: u64) -> Result<(), ApiError> {
    match declared_length(headers) {
        Some(n) if n > limit => Err(too_large(limit)),
        _ => Ok(()),
    }
}

async fn read_document(headers: &HeaderMap, body: Body, limit: usize) -> Result<Value, ApiError> {
    let too_large = || too_large(limit as u64);
    refuse_declared_over(headers, limit as u64)?;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            too_large()
        } else {
            ApiError::bad_request(format!("reading the request body failed: {e}"))
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let yaml = match media_type(content_type) {
        Some(MediaType::Yaml) => true,
        Some(MediaType::Json) => false,
        None => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "Content-Type {content_type:?} is not accepted: send application/json \
                     (or application/merge-patch+json) or application/yaml"
                ),
            ));
        }
    };
    // Parsing is CPU work that grows with the input's nesting: off the async workers, and
    // bounded before it starts.
    tokio::task::spawn_blocking(move || parse_document(&bytes, yaml))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
}

enum MediaType {
    Json,
    Yaml,
}

/// The document type of a `Content-Type` (parameters such as `charset` ignored); none given
/// means JSON, as curl and most clients send.
fn media_type(content_type: &str) -> Option<MediaType> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "" | "application/json" | "application/merge-patch+json" => Some(MediaType::Json),
        "application/yaml" | "application/x-yaml" | "text/yaml" => Some(MediaType::Yaml),
        // curl's `-d` default; what the README's tour sends.
        "application/x-www-form-urlencoded" => Some(MediaType::Json),
        _ => None,
    }
}

/// Deepest nesting a manifest may use (flow brackets, or block indentation in columns).
const MAX_NESTING: usize = 64;
const MAX_INDENT: usize = 256;

/// Parses a request body as the API does (nesting bounds first, then JSON or YAML, no
/// non-finite numbers). Public for the fuzz targets (`fuzz/`).
pub fn parse_document(bytes: &[u8], yaml: bool) -> Result<Value, ApiError> {
    let too_deep = || {
        ApiError::bad_request(format!(
            "the document nests deeper than {MAX_NESTING} levels (or indents past column \
             {MAX_INDENT}); no manifest needs that"
        ))
    };
    if nesting_depth(bytes) > MAX_NESTING {
        return Err(too_deep());
    }
    if !yaml {
        let mut value = serde_json::from_slice::<Value>(bytes)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
        whole_numbers_as_integers(&mut value);
        return Ok(value);
    }
    let indent = bytes
        .split(|b| *b == b'\n')
        .map(|line| line.iter().take_while(|b| **b == b' ').count())
        .max()
        .unwrap_or(0);
    if indent > MAX_INDENT {
        return Err(too_deep());
    }
    let value: yaml_serde::Value = yaml_serde::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("malformed YAML: {e}")))?;
    // JSON has no NaN or infinity: YAML's `.nan` would silently become null.
    if let Some(path) = non_finite(&value, "") {
        return Err(ApiError::bad_request(format!(
            "{path}: .nan and .inf are not numbers the API accepts"
        ))
        .with_details(json!({"field": path})));
    }
    let mut value = serde_json::to_value(value)
        .map_err(|e| ApiError::bad_request(format!("malformed YAML: {e}")))?;
    whole_numbers_as_integers(&mut value);
    Ok(value)
}

/// `118.0` is the integer 118, as JSON Schema (and so the OpenAPI spec) counts it: a whole
/// number written with a fraction is stored as an integer, so an integer field accepts it.
fn whole_numbers_as_integers(value: &mut Value) {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                // Within +-2^63 (and [2^63, 2^64) for u64) the conversion is exact.
                let two_63 = 2f64.powi(63);
                if (-two_63..two_63).contains(&f) {
                    *value = Value::from(f as i64);
                } else if (0.0..2.0 * two_63).contains(&f) {
                    *value = Value::from(f as u64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers_as_integers),
        Value::Object(map) => map.values_mut().for_each(whole_numbers_as_integers),
        _ => {}
    }
}

/// Deepest `[`/`{` nesting outside quoted strings.
fn nesting_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    for &b in bytes {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if b == b'\\' && q == b'"' {
                    escaped = true;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'"' | b'\'' => quote = Some(b),
                b'[' | b'{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    deepest
}

/// The path of the first NaN or infinity in a YAML value.
fn non_finite(value: &yaml_serde::Value, path: &str) -> Option<String> {
    match value {
        yaml_serde::Value::Number(n) => n
            .as_f64()
            .is_some_and(|f| !f.is_finite())
            .then(|| path.trim_start_matches('.').to_string()),
        yaml_serde::Value::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| non_finite(v, &format!("{path}[{i}]"))),
        yaml_serde::Value::Mapping(map) => map.iter().find_map(|(k, v)| {
            let key = k.as_str().map_or_else(|| format!("{k:?}"), str::to_string);
            non_finite(v, &format!("{path}.{key}"))
        }),
        yaml_serde::Value::Tagged(tagged) => non_finite(&tagged.value, path),
        _ => None,
    }
}

async fn read_typed<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let value = read_document(headers, body, 64 * 1024).await?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("malformed request: {e}")))
}

fn query<T: serde::de::DeserializeOwned>(
    params: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    params
        .map(|Query(p)| p)
        .map_err(|e| ApiError::bad_request(format!("bad query parameters: {}", e.body_text())))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct WriteParams {
    /// `All`: validate and answer as if done, store nothing.
    #[param(pattern = "^All$")]
    pub dry_run: Option<String>,
}

impl WriteParams {
    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.dry_run.as_deref() {
            None => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "dryRun must be All, not {other:?}"
            ))),
        }
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// `k=v,k!=v,k in (a,b),k notin (a,b),k,!k`
    pub label_selector: Option<String>,
    /// Events only: `involvedObject.kind=K,involvedObject.name=N`
    pub field_selector: Option<String>,
    /// Page size, 1 to 10000 (larger pages are cut to 10000).
    #[param(minimum = 1, maximum = 2147483647)]
    pub limit: Option<i32>,
    /// Token from the previous page's `metadata.continue`.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    pub continue_token: Option<String>,
    /// Stream changes as newline-delimited JSON.
    pub watch: Option<bool>,
    /// With `watch`: start after this version.
    pub resource_version: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectList {
    pub api_version: String,
    pub kind: String,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub items: Vec<ApiObject>,
}

/// Filters a list by label and field selectors.
struct Filter {
    labels: Option<Selector>,
    involved_kind: Option<String>,
    involved_name: Option<String>,
    /// Only what this caller sees (`auth::sees`).
    seen_by: Option<(Principal, Kind)>,
}

impl Filter {
    fn parse(kind: Kind, params: &ListParams) -> Result<Filter, ApiError> {
        let labels = params
            .label_selector
            .as_deref()
            .map(Selector::parse)
            .transpose()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let (mut involved_kind, mut involved_name) = (None, None);
        for term in params
            .field_selector
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            match (kind, term.split_once('=')) {
                (Kind::Event, Some(("involvedObject.kind", v))) => {
                    involved_kind = Some(v.to_string())
                }
                (Kind::Event, Some(("involvedObject.name", v))) => {
                    involved_name = Some(v.to_string())
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "unsupported field selector {term:?}: events accept involvedObject.kind= and involvedObject.name="
                    )));
                }
            }
        }
        Ok(Filter {
            labels,
            involved_kind,
            involved_name,
            seen_by: None,
        })
    }

    fn owner(&self) -> Option<String> {
        match (&self.involved_kind, &self.involved_name) {
            (Some(k), Some(n)) => Some(format!("{k}/{n}")),
            _ => None,
        }
    }

    /// Whether what the store's mirror indexes decides this filter (no field selector).
    fn on_index(&self) -> bool {
        self.involved_kind.is_none() && self.involved_name.is_none()
    }

    fn matches_index(&self, index: &crate::store::ObjectIndex) -> bool {
        self.seen_by.as_ref().is_none_or(|(who, kind)| {
            crate::auth::sees_owned_by(who, *kind, index.owner.as_deref())
        }) && self
            .labels
            .as_ref()
            .is_none_or(|selector| selector.matches(&index.labels))
    }

    fn needs_parsing(&self) -> bool {
        self.labels.is_some()
            || self.involved_kind.is_some() != self.involved_name.is_some()
            || self.seen_by.is_some()
    }

    fn matches(&self, object: &Value) -> bool {
        if let Some((who, kind)) = &self.seen_by
            && !crate::auth::sees(who, *kind, object)
        {
            return false;
        }
        if let Some(selector) = &self.labels {
            let labels =
                serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default();
            if !selector.matches(&labels) {
                return false;
            }
        }
        let field = |f: &str, want: &Option<String>| {
            want.as_deref()
                .is_none_or(|w| object["involvedObject"][f] == w)
        };
        field("kind", &self.involved_kind) && field("name", &self.involved_name)
    }
}

// ---- objects ---------------------------------------------------------------------------------

#[utoipa::path(get, path = "/api/v1/{plural}", tag = "objects",
    params(("plural" = String, Path, description = "regions | applications | datasets | tasks | events"), ListParams),
    responses(
        (status = 200, description = "The list; with watch=true, newline-delimited JSON {\"type\":\"ADDED|MODIFIED|DELETED\",\"object\":{...}}", body = ObjectList),
        (status = "default", description = "Error", body = ErrorBody)))]
async fn list_objects(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(plural): Path<String>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let kind = Kind::from_plural(&plural)?;
    who.may(Action::Read(kind))?;
    let params = query(params)?;
    let mut filter = Filter::parse(kind, &params)?;
    filter.seen_by = Some((who.clone(), kind));
    if params.watch == Some(true) {
        return crate::watch::watch(
            state.store.clone(),
            kind,
            filter_fn(filter),
            params.resource_version.as_deref(),
        )
        .await;
    }
    if params.limit.is_some_and(|l| l < 1) {
        return Err(ApiError::bad_request("limit must be a positive integer"));
    }
    let limit = params.limit.map(|l| l.clamp(1, 10_000) as usize);
    let owner = filter.owner();
    // One extra item tells whether another page follows.
    let page = limit.map(|l| l as i64 + 1);
    let indexed = StoreQuery {
        after: params.continue_token.as_deref(),
        limit: page,
        ..Default::default()
    };
    let from_index = if filter.on_index() {
        state
            .store
            .list_indexed(kind, &indexed, |index| filter.matches_index(index))
            .await?
    } else {
        None
    };
    let (version, mut items) = match from_index {
        Some(found) => found,
        None => {
            let store_query = StoreQuery {
                owner: owner.as_deref(),
                limit: page.filter(|_| !filter.needs_parsing()),
                ..indexed
            };
            let (version, rows) = state.store.list_raw(kind, &store_query).await?;
            let items = if filter.needs_parsing() {
                rows.into_iter()
                    .filter(|(_, body)| {
                        serde_json::from_str::<Value>(body).is_ok_and(|o| filter.matches(&o))
                    })
                    .collect()
            } else {
                rows
            };
            (version, items)
        }
    };
    let mut next = None;
    if let Some(limit) = limit
        && items.len() > limit
    {
        items.truncate(limit);
        next = items.last().map(|(name, _)| name.clone());
    }
    let metadata = json!({"resourceVersion": version.to_string(), "continue": next});
    let mut body = format!(
        "{{\"apiVersion\":\"ceccm/v1\",\"kind\":\"{}List\",\"metadata\":{},\"items\":[",
        kind.as_str(),
        metadata
    );
    for (i, (_, item)) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

fn filter_fn(filter: Filter) -> impl Fn(&Value) -> bool + Send + Sync + 'static {
    move |object| filter.matches(object)
}

/// A name taken from a URL must be one an object can have (a DNS-1123 label) before it
/// addresses anything, files above all: anything else names no object (404).
fn object_name(kind: Kind, name: &str) -> Result<(), ApiError> {
    let valid = match kind {
        // Events are named `OBJECT.ID`: a DNS-1123 subdomain (labels joined by dots, so never
        // `..`). They name no file.
        Kind::Event => {
            name.len() <= 253 && name.split('.').all(|label| validate_name(label).is_ok())
        }
        _ => validate_name(name).is_ok(),
    };
    if valid {
        Ok(())
    } else {
        Err(ApiError::not_found(kind.as_str(), name))
    }
}

/// The stored object `kind`/`name` as `who` may see it: 404 when it does not exist or belongs
/// to another user.
async fn seen_object(
    store: &Store,
    who: &Principal,
    kind: Kind,
    name: &str,
) -> Result<Value, ApiError> {
    store
        .get(kind, name)
        .await?
        .filter(|o| crate::auth::sees(who, kind, o))
        .ok_or_else(|| ApiError::not_found(kind.as_str(), name))
}

/// Host commands (`app: container`, run by the process runtime with the server's rights) are
/// an administrator's choice; users run registered apps.
fn may_submit(
    who: &Principal,
    kind: Kind,
    submitted: &crate::resources::Submitted,
) -> Result<(), ApiError> {
    if kind == Kind::Application && submitted.spec["app"] == "container" {
        who.may(Action::RunHostCommands)?;
    }
    Ok(())
}

/// Fails with 422 when the spec names regions that do not exist.
async fn check_references(
    store: &Store,
    who: &Principal,
    kind: Kind,
    name: &str,
    submitted: &crate::resources::Submitted,
) -> Result<(), ApiError> {
    let mut missing = Vec::new();
    for region in &submitted.referenced_regions {
        if store.get_raw(Kind::Region, region).await?.is_none() {
            missing.push(ceccm_federation::Violation::new(
                "spec.placement.regions",
                format!("region {region:?} does not exist"),
            ));
        }
    }
    for (field, dataset) in &submitted.referenced_datasets {
        let seen = store
            .get(Kind::Dataset, dataset)
            .await?
            .is_some_and(|d| crate::auth::sees(who, Kind::Dataset, &d));
        if !seen {
            missing.push(ceccm_federation::Violation::new(
                field.as_str(),
                format!("dataset {dataset:?} does not exist"),
            ));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(kind.as_str(), name, &missing))
    }
}

#[utoipa::path(post, path = "/api/v1/{plural}", tag = "objects",
    params(("plural" = String, Path), WriteParams),
    request_body(content = ApiObject, content_type = "application/json", description = "JSON or application/yaml"),
    responses((status = 201, body = ApiObject), (status = "default", description = "Error", body = ErrorBody)))]
async fn create_object(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(plural): Path<String>,
    params: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let kind = Kind::from_plural(&plural)?;
    who.may(Action::Write(kind))?;
    let dry_run = query(params)?.dry_run()?;
    if !kind.user_writable() {
        return Err(read_only(kind));
    }
    let document = read_document(&headers, body, state.config.max_body_bytes).await?;
    let submitted = parse_submitted(kind, document)?;
    may_submit(&who, kind, &submitted)?;
    let mut submitted = submitted;
    submitted.metadata.owner = Some(who.user.clone());
    check_references(
        &state.store,
        &who,
        kind,
        &submitted.metadata.name,
        &submitted,
    )
    .await?;
    let object = objects::create(&state.store, kind, submitted, dry_run).await?;
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

#[utoipa::path(get, path = "/api/v1/{plural}/{name}", tag = "objects",
    params(("plural" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = ApiObject), (status = "default", description = "Error", body = ErrorBody)))]
async fn get_object(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let kind = Kind::from_plural(&plural)?;
    who.may(Action::Read(kind))?;
    object_name(kind, &name)?;
    Ok(Json(seen_object(&state.store, &who, kind, &name).await?).into_response())
}

#[utoipa::path(put, path = "/api/v1/{plural}/{name}", tag = "objects",
    params(("plural" = String, Path), ("name" = String, Path), WriteParams),
    request_body(content = ApiObject, content_type = "application/json", description = "JSON or application/yaml"),
    responses((status = 200, description = "Updated (or unchanged)", body = ApiObject), (status = 201, description = "Created", body = ApiObject),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn apply_object(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
    params: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let kind = Kind::from_plural(&plural)?;
    who.may(Action::Write(kind))?;
    object_name(kind, &name)?;
    let dry_run = query(params)?.dry_run()?;
    if !kind.user_writable() {
        return Err(read_only(kind));
    }
    let document = read_document(&headers, body, state.config.max_body_bytes).await?;
    let submitted = parse_submitted(kind, document)?;
    if submitted.metadata.name != name {
        return Err(ApiError::bad_request(format!(
            "metadata.name {:?} does not match the name in the URL {name:?}",
            submitted.metadata.name
        )));
    }
    may_submit(&who, kind, &submitted)?;
    // An existing object keeps its owner; another user's is not there for this caller.
    let mut submitted = submitted;
    submitted.metadata.owner = match state.store.get(kind, &name).await? {
        Some(stored) if !crate::auth::sees(&who, kind, &stored) => {
            return Err(ApiError::not_found(kind.as_str(), &name));
        }
        Some(stored) => stored["metadata"]["owner"].as_str().map(str::to_string),
        None => Some(who.user.clone()),
    };
    check_references(&state.store, &who, kind, &name, &submitted).await?;
    let (object, created) = objects::apply(&state.store, kind, submitted, dry_run).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(object)).into_response())
}

#[utoipa::path(delete, path = "/api/v1/{plural}/{name}", tag = "objects",
    params(("plural" = String, Path), ("name" = String, Path), WriteParams),
    responses((status = 200, description = "Deleted, or marked for deletion while finalizers run", body = ApiObject),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn delete_object(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
    params: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let kind = Kind::from_plural(&plural)?;
    who.may(Action::Write(kind))?;
    object_name(kind, &name)?;
    if !kind.user_writable() {
        return Err(read_only(kind));
    }
    seen_object(&state.store, &who, kind, &name).await?;
    let dry_run = query(params)?.dry_run()?;
    let object = objects::delete(&state.store, kind, &name, dry_run).await?;
    if kind == Kind::Dataset && !dry_run {
        crate::content::remove_dataset_content(&state.config.data_dir, &name).await?;
    }
    Ok(Json(object).into_response())
}

#[utoipa::path(patch, path = "/api/v1/{plural}/{name}/status", tag = "objects",
    params(("plural" = String, Path), ("name" = String, Path)),
    request_body(content = crate::resources::StatusPatch, content_type = "application/merge-patch+json",
                  description = "{\"status\":{...}} as a JSON merge patch, optionally with metadata.resourceVersion as a precondition"),
    responses((status = 200, body = ApiObject), (status = "default", description = "Error", body = ErrorBody)))]
async fn patch_status(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((plural, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let kind = Kind::from_plural(&plural)?;
    who.may(Action::WriteStatus(kind))?;
    object_name(kind, &name)?;
    if !kind.user_writable() {
        return Err(read_only(kind));
    }
    let patch = read_document(&headers, body, state.config.max_body_bytes).await?;
    let object = objects::patch_status(&state.store, kind, &name, patch).await?;
    Ok(Json(object).into_response())
}

// ---- dataset content and results -------------------------------------------------------------

#[utoipa::path(put, path = "/api/v1/datasets/{name}/content", tag = "datasets",
    params(("name" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Stored; status.size and status.sha256 set", body = ApiObject),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn upload_content(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::Write(Kind::Dataset))?;
    object_name(Kind::Dataset, &name)?;
    seen_object(&state.store, &who, Kind::Dataset, &name).await?;
    refuse_declared_over(&headers, state.config.max_upload_bytes)?;
    let declared = declared_length(&headers);
    let object =
        crate::content::upload_dataset(&state.store, &state.config, &name, declared, body).await?;
    Ok(Json(object).into_response())
}

#[utoipa::path(get, path = "/api/v1/datasets/{name}/content", tag = "datasets",
    params(("name" = String, Path)),
    responses((status = 200, description = "The content", content_type = "application/octet-stream", body = Vec<u8>),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn download_content(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    who.may(Action::Read(Kind::Dataset))?;
    object_name(Kind::Dataset, &name)?;
    seen_object(&state.store, &who, Kind::Dataset, &name).await?;
    crate::content::download_dataset(&state.store, &state.config, &name).await
}

#[utoipa::path(put, path = "/api/v1/datasets/{name}/uplink", tag = "datasets",
    params(("name" = String, Path),
           ("x-ceccm-encoding" = String, Header, pattern = "^(tarsis|identity)$", description = "How the bytes were made from the content"),
           ("x-ceccm-content-sha256" = String, Header, pattern = "^[0-9a-f]{64}$", description = "sha256 of the content they stand for (the dataset's status.sha256)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Kept; status.uplink records the bytes and the time", body = ApiObject),
              (status = "default", description = "Error (403: not the agent of the dataset's region; 409: other content now; 422: the bytes are not what the headers say)", body = ErrorBody)))]
async fn send_uplink(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::ReportRegion)?;
    object_name(Kind::Dataset, &name)?;
    refuse_declared_over(&headers, state.config.max_upload_bytes)?;
    let object =
        crate::uplink::receive(&state.store, &state.config, &who, &name, &headers, body).await?;
    Ok(Json(object).into_response())
}

#[derive(Serialize, ToSchema)]
pub struct ResultsIndex {
    pub files: Vec<ResultFile>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ResultFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[utoipa::path(get, path = "/api/v1/applications/{name}/results", tag = "applications",
    params(("name" = String, Path)),
    responses((status = 200, body = ResultsIndex), (status = "default", description = "Error", body = ErrorBody)))]
async fn results_index(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    who.may(Action::Read(Kind::Application))?;
    object_name(Kind::Application, &name)?;
    seen_object(&state.store, &who, Kind::Application, &name).await?;
    if state
        .store
        .get_raw(Kind::Application, &name)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("Application", &name));
    }
    let files = crate::content::list_results(&results_dir(&state.config.data_dir, &name)).await?;
    Ok(Json(ResultsIndex { files }).into_response())
}

#[utoipa::path(post, path = "/api/v1/applications/{name}/cancel", tag = "applications",
    params(("name" = String, Path)),
    responses((status = 200, description = "Cancelled: workers stop, finished tasks are kept", body = ApiObject),
              (status = "default", description = "Error (409: already finished)", body = ErrorBody)))]
async fn cancel_application(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    who.may(Action::Write(Kind::Application))?;
    object_name(Kind::Application, &name)?;
    seen_object(&state.store, &who, Kind::Application, &name).await?;
    Ok(Json(crate::operations::cancel(&state.store, &name).await?).into_response())
}

#[utoipa::path(post, path = "/api/v1/applications/{name}/retry", tag = "applications",
    params(("name" = String, Path)),
    responses((status = 200, description = "Dead-lettered tasks queued again; the application runs again", body = ApiObject),
              (status = "default", description = "Error (409: not Failed or Cancelled)", body = ErrorBody)))]
async fn retry_application(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    who.may(Action::Write(Kind::Application))?;
    object_name(Kind::Application, &name)?;
    seen_object(&state.store, &who, Kind::Application, &name).await?;
    Ok(Json(crate::operations::retry(&state.store, &name).await?).into_response())
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct StoredArtifact {
    pub sha256: String,
    pub size: u64,
}

/// Response header of a lease, and request header of every report on the leased task: the
/// secret that proves the caller holds this attempt's lease (as Kubernetes' NodeRestriction
/// limits a kubelet to its own pods).
pub const LEASE_SECRET_HEADER: &str = "x-ceccm-lease-secret";

/// A worker may report only on the task whose lease it holds: the request must carry that
/// lease's secret (403 otherwise). Administrators act on any task.
/// Checks that the caller holds `task`'s lease (administrators may act for any worker);
/// answers the task as stored.
async fn holds_lease(
    store: &Store,
    who: &Principal,
    task: &str,
    headers: &HeaderMap,
) -> Result<Value, ApiError> {
    let Some(object) = store.get(Kind::Task, task).await? else {
        return Err(ApiError::not_found("Task", task));
    };
    if who.role == crate::auth::Role::Admin {
        return Ok(object);
    }
    let presented = headers
        .get(LEASE_SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(crate::auth::secret_hash);
    let held = object["status"]["leaseSecretSha256"].as_str();
    match (presented, held) {
        (Some(p), Some(h)) if crate::auth::same_hash(&p, h) => Ok(object),
        _ => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "the caller does not hold the lease of task {task:?}: send the \
                 {LEASE_SECRET_HEADER} its lease answered"
            ),
        )),
    }
}

/// Request header of an artifact upload whose content is not in the body: `region-cache`
/// (a worker on the server's host names a file of its region's cache by its sha256).
pub const CONTENT_FROM_HEADER: &str = "x-ceccm-content-from";

#[utoipa::path(put, path = "/api/v1/tasks/{name}/artifacts/{sha256}", tag = "tasks",
    params(("name" = String, Path), ("sha256" = String, Path, description = "sha256 of the body", pattern = "^[0-9a-f]{64}$"),
           ("x-ceccm-content-from" = Option<String>, Header, nullable = false, pattern = "^region-cache$", description = "`region-cache`: no body; the content is the file SHA256 in the cache of the task's region on the server's host (local driver)")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Stored (or already stored): content-addressed, written once", body = StoredArtifact),
              (status = "default", description = "Error (422: the content does not hash to sha256; 404: not in the region's cache)", body = ErrorBody)))]
async fn upload_artifact(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((name, sha256)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::RunTasks)?;
    object_name(Kind::Task, &name)?;
    holds_lease(&state.store, &who, &name, &headers).await?;
    refuse_declared_over(&headers, state.config.max_upload_bytes)?;
    let source = match headers.get(CONTENT_FROM_HEADER).map(|v| v.as_bytes()) {
        // An empty field value is no value (RFC 9110 5.5), as HTTP clients send it.
        None | Some(b"") => crate::content::ArtifactSource::Body(body),
        Some(b"region-cache") => crate::content::ArtifactSource::RegionCache,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "{CONTENT_FROM_HEADER}: {:?} is not a content source (region-cache)",
                String::from_utf8_lossy(other)
            )));
        }
    };
    let declared = declared_length(&headers);
    let size = crate::content::upload_artifact(
        &state.store,
        &state.config,
        &name,
        &sha256,
        declared,
        source,
    )
    .await?;
    Ok(Json(StoredArtifact { sha256, size }).into_response())
}

#[utoipa::path(get, path = "/api/v1/applications/{name}/artifacts/{sha256}", tag = "applications",
    params(("name" = String, Path), ("sha256" = String, Path, pattern = "^[0-9a-f]{64}$")),
    responses((status = 200, description = "The artifact", content_type = "application/octet-stream", body = Vec<u8>),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn download_artifact(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((name, sha256)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    who.may(Action::Read(Kind::Application))?;
    object_name(Kind::Application, &name)?;
    seen_object(&state.store, &who, Kind::Application, &name).await?;
    crate::content::download_artifact(&state.config, &name, &sha256).await
}

#[utoipa::path(get, path = "/api/v1/applications/{name}/results/{file}", tag = "applications",
    params(("name" = String, Path), ("file" = String, Path, description = "e.g. results.ndjson")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn result_file(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((name, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    who.may(Action::Read(Kind::Application))?;
    object_name(Kind::Application, &name)?;
    seen_object(&state.store, &who, Kind::Application, &name).await?;
    if file.contains('/') || file.starts_with('.') {
        return Err(ApiError::bad_request(format!(
            "bad result file name {file:?}"
        )));
    }
    if state
        .store
        .get_raw(Kind::Application, &name)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found("Application", &name));
    }
    let path = results_dir(&state.config.data_dir, &name).join(&file);
    crate::content::stream_file(&path, &format!("result {file:?} of application {name:?}")).await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// Only this task's output.
    pub task: Option<String>,
    /// Keep the stream open: each task's section once it has finished, until the application ends.
    pub follow: Option<bool>,
}

#[utoipa::path(get, path = "/api/v1/applications/{name}/logs", tag = "applications",
    params(("name" = String, Path), LogParams),
    responses((status = 200, description = "Per task: a header line `==> NAME [STATE] worker=W attempts=N`, its output and last error", content_type = "text/plain", body = String),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn application_logs(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    params: Result<Query<LogParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    who.may(Action::Read(Kind::Application))?;
    object_name(Kind::Application, &name)?;
    seen_object(&state.store, &who, Kind::Application, &name).await?;
    let params = query(params)?;
    crate::logs::logs(
        state.store.clone(),
        state.live_logs.clone(),
        name,
        params.task,
        params.follow.unwrap_or(false),
    )
    .await
}

// ---- regions and their agents -------------------------------------------------------------------

#[utoipa::path(post, path = "/api/v1/agents:join", tag = "regions",
    request_body = crate::regions::JoinRequest,
    responses((status = 200, description = "Joined: the agent's own token, bound to its region (shown once)", body = crate::regions::JoinResponse),
              (status = "default", description = "Error (403: not the join token; 409: the region is not an agent's)", body = ErrorBody)))]
async fn join_region(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::JoinRegion)?;
    let request: crate::regions::JoinRequest = read_typed(&headers, body).await?;
    Ok(Json(crate::regions::join(&state.store, &request).await?).into_response())
}

#[utoipa::path(post, path = "/api/v1/regions/{name}/heartbeat", tag = "regions",
    params(("name" = String, Path)), request_body = crate::regions::AgentReport,
    responses((status = 200, description = "Recorded; the workers the region's queue wants", body = crate::regions::AgentOrders),
              (status = "default", description = "Error (403: an agent of another region)", body = ErrorBody)))]
async fn region_heartbeat(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::ReportRegion)?;
    object_name(Kind::Region, &name)?;
    who.acts_for(&name)?;
    let report: crate::regions::AgentReport = read_typed(&headers, body).await?;
    Ok(
        Json(crate::regions::heartbeat(&state.store, &state.predictor, &name, &report).await?)
            .into_response(),
    )
}

#[utoipa::path(post, path = "/api/v1/regions/{name}/drain", tag = "regions",
    params(("name" = String, Path)),
    responses((status = 200, description = "Cordoned, queued tasks placed elsewhere; `running` tasks still finishing there", body = crate::regions::DrainResult),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn drain_region(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    who.may(Action::Write(Kind::Region))?;
    object_name(Kind::Region, &name)?;
    Ok(Json(crate::regions::drain(&state.store, &name).await?).into_response())
}

// ---- task queue --------------------------------------------------------------------------------

#[utoipa::path(post, path = "/api/v1/tasks:lease", tag = "tasks",
    request_body = LeaseRequest,
    responses((status = 200, description = "A task, now leased to the worker", body = ApiObject),
              (status = 204, description = "Nothing to do"),
              (status = "default", description = "Error (a claim of `task`: 404 when it is gone, 409 with `details.reason` when it cannot be leased, docs/amqp.md)", body = ErrorBody)))]
async fn lease_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::RunTasks)?;
    let request: LeaseRequest = read_typed(&headers, body).await?;
    if let Err(e) = validate_name(&request.region) {
        return Err(ApiError::new(ErrorCode::Invalid, format!("region: {e}")));
    }
    who.acts_for(&request.region)?;
    match queue::lease(&state.store, &request).await? {
        Some((task, secret)) => Ok(([(LEASE_SECRET_HEADER, secret)], Json(task)).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[utoipa::path(post, path = "/api/v1/tasks/{name}/heartbeat", tag = "tasks",
    params(("name" = String, Path)), request_body = HeartbeatRequest,
    responses((status = 200, description = "Lease extended", body = ApiObject),
              (status = "default", description = "Error (409: the lease was lost)", body = ErrorBody)))]
async fn heartbeat_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::RunTasks)?;
    holds_lease(&state.store, &who, &name, &headers).await?;
    let request: HeartbeatRequest = read_typed(&headers, body).await?;
    Ok(Json(queue::heartbeat(&state.store, &name, &request).await?).into_response())
}

#[utoipa::path(post, path = "/api/v1/tasks/{name}/complete", tag = "tasks",
    params(("name" = String, Path)), request_body = CompleteRequest,
    responses((status = 200, description = "Result recorded (once per task)", body = ApiObject),
              (status = "default", description = "Error (409: already finished)", body = ErrorBody)))]
async fn complete_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::RunTasks)?;
    holds_lease(&state.store, &who, &name, &headers).await?;
    let value = read_document(&headers, body, state.config.max_body_bytes).await?;
    let request: CompleteRequest = serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("malformed request: {e}")))?;
    if !request.artifacts.is_empty() {
        let application = state
            .store
            .get(Kind::Task, &name)
            .await?
            .and_then(|t| t["spec"]["application"].as_str().map(str::to_string))
            .ok_or_else(|| ApiError::not_found("Task", &name))?;
        crate::content::check_artifacts(&state.config.data_dir, &application, &request.artifacts)
            .await?;
    }
    let completed = queue::complete(&state.store, &name, request).await?;
    state.live_logs.finish(&name);
    if let Some(sample) = completed.telemetry {
        state.predictor.observe(sample).await;
    }
    Ok(Json(completed.task).into_response())
}

#[utoipa::path(post, path = "/api/v1/tasks/{name}/fail", tag = "tasks",
    params(("name" = String, Path)), request_body = FailRequest,
    responses((status = 200, description = "Requeued, or dead-lettered after the last attempt", body = ApiObject),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn fail_task(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::RunTasks)?;
    holds_lease(&state.store, &who, &name, &headers).await?;
    let request: FailRequest = read_typed(&headers, body).await?;
    let task = queue::fail(&state.store, &name, request).await?;
    state.live_logs.finish(&name);
    Ok(Json(task).into_response())
}

/// Request header of a task log chunk: the offset of its first byte in the task's output.
pub const LOG_OFFSET_HEADER: &str = "x-ceccm-log-offset";

/// How much of a running task's output the server accounts for.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogReceived {
    /// Bytes of the output stream received (or marked lost); the worker sends from here on.
    pub received: u64,
}

#[utoipa::path(post, path = "/api/v1/tasks/{name}/log", tag = "tasks",
    params(("name" = String, Path),
           ("x-ceccm-log-offset" = u64, Header, minimum = 0, maximum = 9_007_199_254_740_991_u64, description = "Offset of the body's first byte in the task's output")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "Kept for `logs?follow` while the task runs (at most 1 MiB per run; a chunk sent again adds nothing)", body = LogReceived),
              (status = "default", description = "Error (403: the caller does not hold the lease; 413: more than 64 KiB)", body = ErrorBody)))]
async fn append_task_log(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::RunTasks)?;
    object_name(Kind::Task, &name)?;
    let task = holds_lease(&state.store, &who, &name, &headers).await?;
    let offset = match headers.get(LOG_OFFSET_HEADER).map(|v| v.to_str()) {
        Some(Ok(v)) => v.parse::<u64>().ok().filter(|o| *o < 1 << 53),
        _ => None,
    }
    .ok_or_else(|| ApiError::bad_request(format!("{LOG_OFFSET_HEADER} must be a byte offset")))?;
    let limit = crate::logs::LIVE_CHUNK_LIMIT;
    refuse_declared_over(&headers, limit as u64)?;
    let chunk = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(limit as u64))?;
    let received = state
        .live_logs
        .append(&name, crate::logs::LogRun::of(&task), offset, &chunk);
    Ok(Json(LogReceived { received }).into_response())
}

// ---- predictor -------------------------------------------------------------------------------

/// One head (run time or energy) of the trained predictor.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PredictorHead {
    /// The regressor chosen by cross-validation, e.g. `linear-regression-log`.
    pub model: String,
    /// Mean absolute percentage error (a fraction) on the newest samples, held out of training.
    pub holdout_mape: f64,
    pub holdout_samples: usize,
    /// Cross-validated MAPE of every candidate regressor.
    pub cv_mape: std::collections::BTreeMap<String, f64>,
    /// Samples the deployed model was fitted on.
    pub trained_on: usize,
}

/// What the scheduler's predictor has learned, and how wrong it is.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PredictorStatus {
    /// `prior` (the analytic cost model) until trained, then `learned`.
    pub state: String,
    pub trained: bool,
    /// Telemetry samples observed (finished tasks).
    pub samples: usize,
    /// Samples needed before the first training.
    pub min_samples: usize,
    pub trainings: usize,
    /// The model that prices placements: `analytic-prior` or the learned run-time regressor.
    pub model: String,
    /// The run-time head's held-out MAPE (a fraction); absent before training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_mape: Option<f64>,
    /// The energy head's held-out MAPE, when telemetry carries measured joules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_mape: Option<f64>,
    /// The analytic prior's MAPE on the same held-out samples, for comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior_runtime_mape: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<PredictorHead>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<PredictorHead>,
}

impl PredictorStatus {
    fn of(predictor: &ceccm_scheduler::Predictor) -> Self {
        let report = predictor.report();
        let head = |h: &ceccm_scheduler::predictor::HeadReport| PredictorHead {
            model: h.model.to_string(),
            holdout_mape: h.holdout_mape,
            holdout_samples: h.holdout_samples,
            cv_mape: h.cv_mape.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            trained_on: h.trained_on,
        };
        let runtime = report.runtime.as_ref().map(head);
        let energy = report.energy.as_ref().map(head);
        PredictorStatus {
            state: report.state.to_string(),
            trained: predictor.trained(),
            samples: report.samples,
            min_samples: predictor.config().min_samples,
            trainings: report.trainings,
            model: runtime
                .as_ref()
                .map_or_else(|| "analytic-prior".to_string(), |r| r.model.clone()),
            runtime_mape: runtime.as_ref().map(|r| r.holdout_mape),
            energy_mape: energy.as_ref().map(|e| e.holdout_mape),
            prior_runtime_mape: report.prior_holdout_mape,
            runtime,
            energy,
        }
    }
}

#[utoipa::path(get, path = "/api/v1/predictor", tag = "scheduler",
    responses((status = 200, description = "The placement predictor's state and held-out error", body = PredictorStatus),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn predictor(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Response, ApiError> {
    who.may(Action::ReadMetrics)?;
    let status = PredictorStatus::of(&state.predictor.read());
    Ok(Json(status).into_response())
}

// ---- tokens ---------------------------------------------------------------------------------

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens",
    request_body(content = crate::tokens::TokenRequest, content_type = "application/json"),
    responses((status = 201, description = "The new token; `token` is its secret, shown only here", body = crate::tokens::TokenInfo),
              (status = "default", description = "Error (403: administrators only)", body = ErrorBody)))]
async fn create_token(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    who.may(Action::ManageTokens)?;
    let request = read_typed(&headers, body).await?;
    let made = crate::tokens::create(&state.store, request).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses((status = 200, description = "Stored tokens, without their secrets", body = crate::tokens::TokenList),
              (status = "default", description = "Error (403: administrators only)", body = ErrorBody)))]
async fn list_tokens(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
) -> Result<Response, ApiError> {
    who.may(Action::ManageTokens)?;
    Ok(Json(crate::tokens::list(&state.store).await?).into_response())
}

#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path)),
    responses((status = 200, description = "Revoked: what the token was", body = crate::tokens::TokenInfo),
              (status = "default", description = "Error (403: administrators only)", body = ErrorBody)))]
async fn revoke_token(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    who.may(Action::ManageTokens)?;
    Ok(Json(crate::tokens::revoke(&state.store, &id).await?).into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// Newest entries to return, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "tokens", params(AuditParams),
    responses((status = 200, description = "The newest mutating requests, oldest first: who, what, how it ended", body = crate::audit::AuditList),
              (status = "default", description = "Error (403: administrators only)", body = ErrorBody)))]
async fn audit_log(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    who.may(Action::ManageTokens)?;
    let limit = query(params)?.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 1000"));
    }
    let items = crate::audit::tail(&state.config.data_dir, limit as usize)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("reading the audit log: {e}")))?;
    Ok(Json(crate::audit::AuditList { items }).into_response())
}

// ---- health and metrics ----------------------------------------------------------------------

#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "The process serves requests", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", tag = "health", security(()),
    responses((status = 200, description = "The store is reachable", body = String),
              (status = 503, description = "The store is not reachable", body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.store.ping().await?;
    Ok("ok\n")
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
              (status = "default", description = "Error (401: no token, unless the server runs with --metrics-anonymous)", body = ErrorBody)))]
async fn metrics(
    State(state): State<AppState>,
    who: Option<Extension<Principal>>,
) -> Result<Response, ApiError> {
    // Anonymous only when the server allows it (the middleware let the request through).
    if let Some(Extension(who)) = who {
        who.may(Action::ReadMetrics)?;
    }
    let counts = state.store.phase_counts().await?;
    let text = state.metrics.render(&counts);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The OpenAPI document as YAML, as committed in `api/openapi.yaml`.
pub fn openapi_yaml() -> String {
    let value = serde_json::to_value(openapi()).unwrap_or_default();
    yaml_serde::to_string(&value).unwrap_or_default()
}

/// One NDJSON watch line.
pub fn watch_line(event: &ChangeEvent) -> Bytes {
    watch_line_of(event.change, &event.body)
}

pub fn watch_line_of(change: ChangeType, body: &str) -> Bytes {
    let kind = match change {
        ChangeType::Added => "ADDED",
        ChangeType::Modified => "MODIFIED",
        ChangeType::Deleted => "DELETED",
    };
    Bytes::from(format!("{{\"type\":\"{kind}\",\"object\":{body}}}\n"))
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
