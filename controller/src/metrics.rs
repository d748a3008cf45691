//! Prometheus metrics: request counts and latency histograms by route, objects by phase.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct RouteStats {
    by_status: BTreeMap<u16, u64>,
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

#[derive(Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<(String, String), RouteStats>>,
}

impl Metrics {
    pub fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let stats = routes
            .entry((method.to_string(), route.to_string()))
            .or_default();
        *stats.by_status.entry(status).or_default() += 1;
        stats.count += 1;
        stats.sum_seconds += seconds;
        for (bucket, bound) in stats.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }

    /// The exposition text; `phase_counts` are `(kind, phase, count)` from the store.
    pub fn render(&self, phase_counts: &[(String, String, i64)]) -> String {
        let mut out = String::new();
        let routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str(
            "# HELP ceccm_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE ceccm_http_requests_total counter\n");
        for ((method, route), stats) in routes.iter() {
            for (status, n) in &stats.by_status {
                let _ = writeln!(
                    out,
                    "ceccm_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP ceccm_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE ceccm_http_request_duration_seconds histogram\n");
        for ((method, route), stats) in routes.iter() {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            for (n, bound) in stats.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "ceccm_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "ceccm_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                stats.count
            );
            let _ = writeln!(
                out,
                "ceccm_http_request_duration_seconds_sum{{{labels}}} {}",
                stats.sum_seconds
            );
            let _ = writeln!(
                out,
                "ceccm_http_request_duration_seconds_count{{{labels}}} {}",
                stats.count
            );
        }
        out.push_str(
            "# HELP ceccm_objects Objects by kind and phase.\n# TYPE ceccm_objects gauge\n",
        );
        for (kind, phase, n) in phase_counts
            .iter()
            .filter(|(k, _, _)| k != "Task" && k != "Event")
        {
            let _ = writeln!(
                out,
                "ceccm_objects{{kind=\"{kind}\",phase=\"{phase}\"}} {n}"
            );
        }
        out.push_str("# HELP ceccm_tasks Tasks by state.\n# TYPE ceccm_tasks gauge\n");
        for (_, state, n) in phase_counts.iter().filter(|(k, _, _)| k == "Task") {
            let _ = writeln!(out, "ceccm_tasks{{state=\"{state}\"}} {n}");
        }
        out
    }
}

/// Middleware: times every request and files it under its route template.
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let response = next.run(request).await;
    metrics.observe(
        &method,
        &route,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.observe("GET", "/api/v1/{plural}", 200, 0.002);
        m.observe("GET", "/api/v1/{plural}", 404, 0.2);
        let text = m.render(&[
            ("Application".into(), "Running".into(), 2),
            ("Task".into(), "Queued".into(), 7),
        ]);
        assert!(text.contains(
            "ceccm_http_requests_total{method=\"GET\",route=\"/api/v1/{plural}\",status=\"404\"} 1"
        ));
        assert!(text.contains("ceccm_http_request_duration_seconds_bucket{method=\"GET\",route=\"/api/v1/{plural}\",le=\"0.0025\"} 1"));
        assert!(text.contains(
            "ceccm_http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/{plural}\"} 2"
        ));
        assert!(text.contains("ceccm_objects{kind=\"Application\",phase=\"Running\"} 2"));
        assert!(text.contains("ceccm_tasks{state=\"Queued\"} 7"));
    }
}
