//! `faultline-order-api serve`: the HTTP API. Every handler answers promptly whatever state
//! PostgreSQL and Redis are in: the database bounds its operations at 2 s (503 past that),
//! the cache at 300 ms (then the request goes on without it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::cache::{Cache, CacheError};
use crate::db::{Db, DbError};
use crate::metrics::{self, ApiMetrics};
use crate::order::{self, NewOrder, Order};
use crate::shutdown::{ShutdownError, Signals};

/// How long in-flight requests get to finish after SIGTERM. Every request is bounded by the
/// database timeout, so this only cuts off clients that stall on their own.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts to create the schema while the database is not up yet.
const SCHEMA_RETRY: Duration = Duration::from_secs(1);
/// The `route` label of requests that matched no route (one value, whatever the path).
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// The header saying where a list came from: `hit`, `miss` (read from the database and
/// cached), or `bypass` (Redis failed; read from the database).
pub const CACHE_HEADER: &str = "x-cache";

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Server(#[source] std::io::Error),
    #[error("HTTP server task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Shutdown(#[from] ShutdownError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    db: Db,
    cache: Cache,
    metrics: ApiMetrics,
    /// Last known reachability, so that an outage is logged once when it starts and once when
    /// it ends instead of once per request.
    db_up: Arc<AtomicBool>,
    cache_up: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(db: Db, cache: Cache) -> AppState {
        AppState {
            db,
            cache,
            metrics: ApiMetrics::new(),
            db_up: Arc::new(AtomicBool::new(true)),
            cache_up: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Counts a database failure and maps it to a 503; logs outage transitions.
    fn db<T>(&self, result: Result<T, DbError>) -> Result<T, ApiError> {
        match result {
            Ok(value) => {
                if !self.db_up.swap(true, Ordering::Relaxed) {
                    tracing::info!("database reachable again");
                }
                Ok(value)
            }
            Err(e) => {
                self.metrics.db_errors.inc();
                let error = error_chain(&e);
                if self.db_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%error, "database unavailable");
                } else {
                    tracing::debug!(%error, "database still unavailable");
                }
                Err(ApiError::Unavailable(error))
            }
        }
    }

    /// Counts a cache failure (the caller goes on without the cache); logs transitions.
    fn cache<T>(&self, result: Result<T, CacheError>) -> Option<T> {
        match result {
            Ok(value) => {
                if !self.cache_up.swap(true, Ordering::Relaxed) {
                    tracing::info!("cache reachable again");
                }
                Some(value)
            }
            Err(e) => {
                self.metrics.cache_errors.inc();
                let error = error_chain(&e);
                if self.cache_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%error, "cache unavailable, serving from the database");
                } else {
                    tracing::debug!(%error, "cache still unavailable");
                }
                None
            }
        }
    }
}

/// A refused request, answered as `{"error": ...}`.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(message) => (StatusCode::BAD_REQUEST, json!({ "error": message })),
            ApiError::NotFound(message) => (StatusCode::NOT_FOUND, json!({ "error": message })),
            ApiError::Unavailable(detail) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "error": "database unavailable", "detail": detail }),
            ),
        };
        (status, axum::Json(body)).into_response()
    }
}

/// An error with its causes, `outer: inner: root`: the pool and driver errors say
/// "error connecting to server" and keep the why (connection refused, timed out, name not
/// resolved) in their sources. Causes already quoted by their parent are not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The routes; `/api/...` are aliases for nginx's `location /api/` without a rewrite.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .route("/orders", get(list_orders).post(create_order))
        .route("/api/orders", get(list_orders).post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/api/orders/{id}", get(get_order))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Serves until SIGTERM/SIGINT, then drains for at most [`DRAIN_TIMEOUT`].
pub async fn serve(
    listen: SocketAddr,
    database_url: &str,
    redis_url: &str,
) -> Result<(), ServeError> {
    let mut signals = Signals::install()?;
    let db = Db::new(database_url)?;
    let cache = Cache::new(redis_url)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let local = listener.local_addr().map_err(ServeError::Server)?;
    tracing::info!(%local, "order API listening");

    // The schema is also created by the first request that finds it missing; this only makes
    // it exist before then, and says in the log when the database first answered.
    let schema_db = db.clone();
    let schema_task = tokio::spawn(async move {
        let mut logged = false;
        loop {
            match schema_db.ensure_schema().await {
                Ok(()) => return,
                Err(e) if !logged => {
                    let error = error_chain(&e);
                    tracing::warn!(%error, "database not ready yet; serving anyway, retrying");
                    logged = true;
                }
                Err(e) => tracing::debug!(error = %error_chain(&e), "database still not ready"),
            }
            tokio::time::sleep(SCHEMA_RETRY).await;
        }
    });

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let app = router(AppState::new(db, cache));
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // An error means the sender is gone: stop as well.
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })
            .into_future(),
    );
    let result = tokio::select! {
        finished = &mut server => Some(finished),
        signal = signals.recv() => {
            tracing::info!(signal, "shutting down: draining in-flight requests");
            None
        }
    };
    schema_task.abort();
    let finished = match result {
        Some(finished) => finished,
        None => {
            // Err only if the receiver is gone, i.e. the server already stopped.
            let _ = stop_tx.send(true);
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
                Ok(finished) => finished,
                Err(_) => {
                    tracing::warn!(
                        "requests still in flight after {DRAIN_TIMEOUT:?}; exiting anyway"
                    );
                    server.abort();
                    return Ok(());
                }
            }
        }
    };
    finished
        .map_err(ServeError::Task)?
        .map_err(ServeError::Server)?;
    tracing::info!("order API stopped");
    Ok(())
}

/// Records every answered request in the metrics, labelled by route template.
async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_label(request.extensions().get::<MatchedPath>());
    let method = method_label(request.method());
    let start = Instant::now();
    let response = next.run(request).await;
    state.metrics.observe_request(
        &route,
        method,
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}

/// The `route` label: the template that matched, so `/orders/17` and `/orders/18` are one
/// series, and unknown paths (scanners) are one series too.
pub fn route_label(matched: Option<&MatchedPath>) -> String {
    matched.map_or_else(|| UNMATCHED_ROUTE.to_string(), |m| m.as_str().to_string())
}

/// The `method` label: standard methods by name, anything else (client-chosen strings, which
/// would make series without bound) as `OTHER`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

async fn health(State(state): State<AppState>) -> Response {
    let (db, cache) = tokio::join!(state.db.ping(), state.cache.ping());
    let database_ok = state.db(db).is_ok();
    let cache_ok = state.cache(cache).is_some();
    let status = if database_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if database_ok { "ok" } else { "down" },
        "database": if database_ok { "ok" } else { "down" },
        "cache": if cache_ok { "ok" } else { "down" },
    });
    (status, axum::Json(body)).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// `POST /orders`: validated before anything is written; the list cache is dropped after.
async fn create_order(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let new = NewOrder::from_json(&body).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let order = state.db(state.db.insert(&new).await)?;
    tracing::debug!(id = order.id, symbol = %order.symbol, qty = order.qty, "order placed");
    state.cache(state.cache.invalidate_recent().await);
    Ok((StatusCode::CREATED, axum::Json(order)).into_response())
}

/// `GET /orders`: read-through cache of the serialised list.
async fn list_orders(State(state): State<AppState>) -> Result<Response, ApiError> {
    let cached = state.cache(state.cache.get_recent().await);
    if let Some(Some(body)) = cached {
        state.metrics.cache_hits.inc();
        return Ok(json_list(body, "hit"));
    }
    let orders = state.db(state.db.recent().await)?;
    let body = list_body(&orders);
    // After a Redis failure, skip the write too: it would most likely cost another timeout.
    let source = if cached.is_some() {
        state.metrics.cache_misses.inc();
        state.cache(state.cache.set_recent(&body).await);
        "miss"
    } else {
        "bypass"
    };
    Ok(json_list(body, source))
}

/// `GET /orders/{id}`: an id that is not a positive integer names no order either.
async fn get_order(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let missing = || ApiError::NotFound(format!("no order with id {raw:?}"));
    let id = order::parse_id(&raw).ok_or_else(missing)?;
    let order = state.db(state.db.get(id).await)?.ok_or_else(missing)?;
    Ok(axum::Json(order).into_response())
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".to_string())
}

/// The list as JSON (an array, newest first); the cache stores exactly these bytes.
fn list_body(orders: &[Order]) -> Vec<u8> {
    // Serialising plain structs of strings and integers cannot fail.
    serde_json::to_vec(orders).unwrap_or_else(|_| b"[]".to_vec())
}

fn json_list(body: Vec<u8>, source: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::HeaderName::from_static(CACHE_HEADER),
                HeaderValue::from_static(source),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;

    /// A router whose database and cache point at a closed port: enough for every path that
    /// must not reach them, and for the ones that must fail fast when they are down.
    fn app() -> anyhow::Result<(Router, ApiMetrics)> {
        let db = Db::new("postgres://orders@127.0.0.1:1/orders")?;
        let cache = Cache::new("redis://127.0.0.1:1")?;
        let state = AppState::new(db, cache);
        let metrics = state.metrics.clone();
        Ok((router(state), metrics))
    }

    async fn call(
        app: &Router,
        method: Method,
        uri: &str,
        body: &str,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))?;
        let response = app.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await?;
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, json))
    }

    #[tokio::test]
    async fn bad_orders_are_refused_before_the_database() -> anyhow::Result<()> {
        let (app, metrics) = app()?;
        for path in ["/orders", "/api/orders"] {
            let (status, body) =
                call(&app, Method::POST, path, r#"{"symbol":"acme","qty":1}"#).await?;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(body["error"].as_str().is_some_and(|e| e.contains("symbol")));
            let (status, body) = call(&app, Method::POST, path, "{").await?;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("invalid JSON"))
            );
        }
        let text = metrics.render()?;
        assert!(
            text.contains(
                "order_api_http_requests_total{route=\"/api/orders\",method=\"POST\",status=\"400\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("order_api_db_errors_total 0"), "{text}");
        Ok(())
    }

    #[tokio::test]
    async fn unknown_ids_and_routes_are_404_under_one_series() -> anyhow::Result<()> {
        let (app, metrics) = app()?;
        let (status, body) = call(&app, Method::GET, "/orders/abc", "").await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().is_some_and(|e| e.contains("abc")));
        for path in ["/nope", "/wp-admin/x.php"] {
            let (status, _) = call(&app, Method::GET, path, "").await?;
            assert_eq!(status, StatusCode::NOT_FOUND);
        }
        let text = metrics.render()?;
        for line in [
            "order_api_http_requests_total{route=\"/orders/{id}\",method=\"GET\",status=\"404\"} 1",
            "order_api_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn unreachable_backends_give_prompt_503_and_degraded_health() -> anyhow::Result<()> {
        let (app, metrics) = app()?;
        let start = Instant::now();
        let (status, body) = call(&app, Method::GET, "/health", "").await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["database"], "down");
        assert_eq!(body["cache"], "down");
        let (status, body) = call(
            &app,
            Method::POST,
            "/api/orders",
            r#"{"symbol":"ACME","qty":5}"#,
        )
        .await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"], "database unavailable");
        let (status, _) = call(&app, Method::GET, "/orders", "").await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        let text = metrics.render()?;
        // health + insert + list; the list's cache read failed too, as did health's ping.
        assert!(text.contains("order_api_db_errors_total 3"), "{text}");
        assert!(text.contains("order_api_cache_errors_total 2"), "{text}");
        Ok(())
    }

    #[test]
    fn error_chains_keep_the_root_cause_once() {
        let root = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let wrapped = ServeError::Server(root);
        assert_eq!(error_chain(&wrapped), "HTTP server failed: refused");
        let db = DbError::Timeout {
            what: "insert",
            after: Duration::from_secs(2),
        };
        assert_eq!(error_chain(&db), "database insert timed out after 2s");
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(route_label(None), UNMATCHED_ROUTE);
        assert_eq!(method_label(&Method::GET), "GET");
        let odd = Method::from_bytes(b"BREW").unwrap_or(Method::TRACE);
        assert_eq!(method_label(&odd), "OTHER");
    }

    #[test]
    fn lists_serialise_as_an_array() -> anyhow::Result<()> {
        let orders = vec![Order {
            id: 2,
            symbol: "ACME".into(),
            qty: 3,
            created_at: "2026-01-01T00:00:00Z".into(),
        }];
        let value: serde_json::Value = serde_json::from_slice(&list_body(&orders))?;
        assert_eq!(
            value,
            json!([{"id": 2, "symbol": "ACME", "qty": 3, "created_at": "2026-01-01T00:00:00Z"}])
        );
        Ok(())
    }
}
