//! The REST client: `/api/v1` requests over reqwest, answers as JSON values, failures as
//! [`Error`]s (the server's error JSON, or an unreachable server named by address).

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::config::Target;
use crate::error::{Error, Result, failed, usage};
use crate::kinds::KindInfo;

pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

/// One line of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: String,
    pub object: Value,
}

/// A collection read in full, with the resourceVersion to watch from.
pub struct List {
    pub items: Vec<Value>,
    pub resource_version: Option<String>,
}

impl Client {
    pub fn new(target: &Target) -> Result<Client> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("ceccmctl/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &target.certificate_authority {
            let pem = std::fs::read(ca)
                .map_err(|e| usage!("cannot read certificate authority {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| usage!("certificate authority {} is not PEM: {e}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        if let Some((cert, key)) = &target.client_certificate {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    usage!(
                        "cannot read client certificate file {}: {e}",
                        path.display()
                    )
                })
            };
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                usage!(
                    "client certificate {} and key {} are not a PEM certificate and its key: {e}",
                    cert.display(),
                    key.display()
                )
            })?;
            builder = builder.identity(identity);
        }
        if target.insecure_skip_tls_verify {
            eprintln!("warning: the server's TLS certificate is not verified");
            builder = builder.danger_accept_invalid_certs(true);
        }
        let http = builder
            .build()
            .map_err(|e| failed!("cannot set up the HTTP client: {e}"))?;
        Ok(Client {
            http,
            server: target.server.clone(),
            token: target.token.clone(),
        })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!("{}/api/v1/{path}", self.server);
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request; a non-2xx answer becomes [`Error::Api`].
    async fn send(&self, request: RequestBuilder) -> Result<Response> {
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(api_error(response).await)
        }
    }

    fn transport_error(&self, error: reqwest::Error) -> Error {
        let reason = root_cause(&error);
        if let Some(refused) = certificate_error(&error) {
            Error::Certificate {
                url: self.server.clone(),
                reason: refused.to_string(),
            }
        } else if error.is_connect() || error.is_timeout() {
            Error::Unreachable {
                url: self.server.clone(),
                reason,
            }
        } else {
            failed!("request to {} failed: {reason}", self.server)
        }
    }

    async fn json(&self, request: RequestBuilder) -> Result<(StatusCode, Value)> {
        let response = self.send(request).await?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(e))?;
        let value = serde_json::from_slice(&body)
            .map_err(|e| failed!("the server's answer is not JSON: {e}"))?;
        Ok((status, value))
    }

    pub async fn get(&self, kind: &KindInfo, name: &str) -> Result<Value> {
        let path = format!("{}/{}", kind.plural, encode(name));
        Ok(self.json(self.request(Method::GET, &path)).await?.1)
    }

    /// Lists a collection, following `continue` tokens to the end.
    pub async fn list(
        &self,
        kind: &KindInfo,
        label_selector: Option<&str>,
        field_selector: Option<&str>,
    ) -> Result<List> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query: Vec<(&str, &str)> = vec![("limit", "500")];
            if let Some(s) = label_selector {
                query.push(("labelSelector", s));
            }
            if let Some(s) = field_selector {
                query.push(("fieldSelector", s));
            }
            if let Some(t) = &token {
                query.push(("continue", t));
            }
            let request = self.request(Method::GET, kind.plural).query(&query);
            let (_, page) = self.json(request).await?;
            if let Some(Value::Array(page_items)) = page.get("items") {
                items.extend(page_items.iter().cloned());
            }
            token = page
                .pointer("/metadata/continue")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                let resource_version = page
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                return Ok(List {
                    items,
                    resource_version,
                });
            }
        }
    }

    /// `PUT` (create-or-update); answers the status code (201 created, 200 updated) and object.
    pub async fn apply(
        &self,
        kind: &KindInfo,
        name: &str,
        object: &Value,
        dry_run: bool,
    ) -> Result<(StatusCode, Value)> {
        let path = format!("{}/{}", kind.plural, encode(name));
        let mut request = self.request(Method::PUT, &path).json(object);
        if dry_run {
            request = request.query(&[("dryRun", "All")]);
        }
        self.json(request).await
    }

    pub async fn delete(&self, kind: &KindInfo, name: &str, dry_run: bool) -> Result<Value> {
        let path = format!("{}/{}", kind.plural, encode(name));
        let mut request = self.request(Method::DELETE, &path);
        if dry_run {
            request = request.query(&[("dryRun", "All")]);
        }
        Ok(self.json(request).await?.1)
    }

    /// A DELETE of any path under `/api/v1` (tokens), answering JSON.
    pub async fn delete_path(&self, path: &str) -> Result<Value> {
        Ok(self.json(self.request(Method::DELETE, path)).await?.1)
    }

    /// Opens a watch on a collection, from `resource_version` when given.
    pub async fn watch(
        &self,
        kind: &KindInfo,
        label_selector: Option<&str>,
        resource_version: Option<&str>,
    ) -> Result<WatchStream> {
        let mut query = vec![("watch", "true")];
        if let Some(s) = label_selector {
            query.push(("labelSelector", s));
        }
        if let Some(rv) = resource_version {
            query.push(("resourceVersion", rv));
        }
        let response = self
            .send(self.request(Method::GET, kind.plural).query(&query))
            .await?;
        Ok(WatchStream {
            lines: LineReader::new(response),
        })
    }

    /// A GET whose body is read as it arrives (logs, downloads).
    pub async fn stream(&self, path: &str, query: &[(&str, &str)]) -> Result<Response> {
        self.send(self.request(Method::GET, path).query(query))
            .await
    }

    /// A GET answering JSON at any path under `/api/v1`.
    pub async fn get_path(&self, path: &str) -> Result<Value> {
        Ok(self.json(self.request(Method::GET, path)).await?.1)
    }

    /// A POST of a JSON body to any path under `/api/v1` (actions such as
    /// `applications/NAME/cancel`), answering JSON.
    pub async fn post_path(&self, path: &str, body: &Value) -> Result<Value> {
        Ok(self
            .json(self.request(Method::POST, path).json(body))
            .await?
            .1)
    }

    /// A PUT of raw bytes (dataset content) of a known length.
    pub async fn put_bytes(&self, path: &str, body: reqwest::Body, length: u64) -> Result<Value> {
        let request = self
            .request(Method::PUT, path)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(body);
        Ok(self.json(request).await?.1)
    }

    /// Reads the next chunk of a streamed body, mapping transport failures.
    pub async fn chunk(&self, response: &mut Response) -> Result<Option<bytes::Bytes>> {
        response.chunk().await.map_err(|e| self.transport_error(e))
    }
}

/// Percent-encodes what may not appear raw in a path segment (names are DNS labels, so this is
/// only a guard against odd input).
pub fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The error JSON of a failed answer; a body that is not our error JSON still gives a message.
async fn api_error(response: Response) -> Error {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    parse_error(status, &body)
}

pub fn parse_error(status: StatusCode, body: &str) -> Error {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let field = |name: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.pointer(&format!("/error/{name}")))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let code = field("code").unwrap_or_else(|| {
        status
            .canonical_reason()
            .unwrap_or("Error")
            .replace(' ', "")
    });
    let message = field("message").unwrap_or_else(|| match body.trim() {
        "" => format!("the server answered {status}"),
        text => text.chars().take(500).collect(),
    });
    Error::Api {
        status: status.as_u16(),
        code,
        message,
    }
}

/// The rustls refusal of the server's certificate behind a transport error, if that was it.
fn certificate_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    std::iter::successors(Some(error), |e| e.source()).find_map(|cause| {
        // TLS errors travel inside io::Errors (one in another, even), whose source() skips the
        // error they carry: unwrap them by hand.
        let mut inner = cause;
        while let Some(carried) = inner
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            inner = carried;
        }
        inner
            .downcast_ref::<rustls::Error>()
            .filter(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
    })
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Reads a streamed body line by line.
pub struct LineReader {
    response: Response,
    buffer: Vec<u8>,
    done: bool,
}

impl LineReader {
    pub fn new(response: Response) -> LineReader {
        LineReader {
            response,
            buffer: Vec::new(),
            done: false,
        }
    }

    /// The next non-empty line, or `None` at the end of the stream.
    pub async fn next_line(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if text.is_empty() {
                    continue;
                }
                return Ok(Some(text));
            }
            if self.done {
                let rest = std::mem::take(&mut self.buffer);
                let text = String::from_utf8_lossy(&rest).trim().to_string();
                return Ok((!text.is_empty()).then_some(text));
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => self.done = true,
                Err(e) => return Err(failed!("the stream broke: {}", root_cause(&e))),
            }
        }
    }
}

pub struct WatchStream {
    lines: LineReader,
}

impl WatchStream {
    /// The next event, or `None` when the server closed the stream.
    pub async fn next(&mut self) -> Result<Option<WatchEvent>> {
        match self.lines.next_line().await? {
            Some(line) => parse_watch_line(&line).map(Some),
            None => Ok(None),
        }
    }
}

/// One NDJSON line of a watch: `{"type":"ADDED|MODIFIED|DELETED","object":{...}}`. The server
/// may also send `{"type":"ERROR","object":<error JSON>}` (kubectl's convention), e.g. `410 Gone`.
pub fn parse_watch_line(line: &str) -> Result<WatchEvent> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| failed!("the watch stream sent a line that is not JSON: {e}"))?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| failed!("the watch stream sent an event without a type: {line}"))?
        .to_string();
    let object = value.get("object").cloned().unwrap_or(Value::Null);
    if kind == "ERROR" {
        let status = object
            .pointer("/error/code")
            .and_then(Value::as_str)
            .map_or(StatusCode::INTERNAL_SERVER_ERROR, |code| match code {
                "Gone" => StatusCode::GONE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            });
        return Err(parse_error(status, &object.to_string()));
    }
    Ok(WatchEvent { kind, object })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_json_becomes_an_api_error() {
        let body =
            r#"{"error":{"code":"NotFound","message":"regions \"x\" not found","details":{}}}"#;
        let err = parse_error(StatusCode::NOT_FOUND, body);
        assert_eq!(
            err.to_string(),
            "Error from server (NotFound): regions \"x\" not found"
        );
        assert!(err.is_not_found());
    }

    #[test]
    fn a_foreign_error_body_still_gives_a_message() {
        let err = parse_error(StatusCode::BAD_GATEWAY, "upstream down\n");
        assert_eq!(
            err.to_string(),
            "Error from server (BadGateway): upstream down"
        );
        let err = parse_error(StatusCode::SERVICE_UNAVAILABLE, "");
        assert!(err.to_string().contains("503"), "{err}");
    }

    #[test]
    fn watch_lines_parse() {
        let event =
            parse_watch_line(r#"{"type":"ADDED","object":{"metadata":{"name":"a"}}}"#).unwrap();
        assert_eq!(event.kind, "ADDED");
        assert_eq!(event.object["metadata"]["name"], "a");
        let gone = parse_watch_line(
            r#"{"type":"ERROR","object":{"error":{"code":"Gone","message":"too old"}}}"#,
        )
        .unwrap_err();
        assert!(matches!(gone, Error::Api { status: 410, .. }), "{gone:?}");
        assert!(parse_watch_line("not json").is_err());
        assert!(parse_watch_line(r#"{"object":{}}"#).is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("edge-caha.1"), "edge-caha.1");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
    }
}
