//! The local API: how any program, in any language, uses the node.
//!
//! HTTP/1.1 with JSON bodies, served on the Unix socket `api.sock` in the data
//! dir (mode 0600: only the node's user can connect) and, if configured, on a
//! loopback TCP port where every request needs `Authorization: Bearer
//! <token>` with the token from `api.token`. Streams are HTTP upgrades:
//! after `101 Switching Protocols` (`Upgrade: p2pos-stream`) the connection
//! carries the stream's raw bytes both ways, and a half-close (`shutdown(WR)`)
//! is passed to the peer. The full description is `docs/api/openapi.yaml`.
//!
//! Errors are JSON `{"error": "..."}` with a 4xx status for a bad request
//! and 502/504 when the peer could not be reached.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use base64::Engine;
use hyper_util::rt::TokioIo;
use p2pos_proto::stream::StreamStatus;
use p2pos_proto::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::node::{
    ConnectError, DatagramError, ListenError, Node, OpenStreamError, RefusalKind, ServiceListener,
};
use crate::tunnel::splice;

/// The `Upgrade` protocol token of API streams.
pub const UPGRADE_PROTOCOL: &str = "p2pos-stream";
/// Response header naming the peer of an upgraded stream.
pub const PEER_HEADER: &str = "p2pos-peer";
/// Longest wait of a datagram long-poll.
const MAX_POLL: Duration = Duration::from_secs(60);

/// An API error: status and message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        ApiError(StatusCode::NOT_FOUND, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::bad_request(format!("invalid JSON body: {}", r.body_text()))
    }
}

impl From<ConnectError> for ApiError {
    fn from(e: ConnectError) -> Self {
        let status = match e {
            ConnectError::NoAddress(_) | ConnectError::SelfDial => StatusCode::BAD_REQUEST,
            ConnectError::NotFound(_) => StatusCode::NOT_FOUND,
            ConnectError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ConnectError::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
            ConnectError::WrongPeer { .. }
            | ConnectError::Handshake { .. }
            | ConnectError::Traversal { .. } => StatusCode::BAD_GATEWAY,
        };
        ApiError(status, e.to_string())
    }
}

impl From<OpenStreamError> for ApiError {
    fn from(e: OpenStreamError) -> Self {
        match &e {
            OpenStreamError::Connect(c) => c.clone().into(),
            OpenStreamError::ServiceName(_) => ApiError::bad_request(e.to_string()),
            OpenStreamError::Refused { status, .. } => {
                let code = match status {
                    RefusalKind::NoSuchService => StatusCode::NOT_FOUND,
                    RefusalKind::Forbidden => StatusCode::FORBIDDEN,
                    RefusalKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
                    RefusalKind::Failed => StatusCode::BAD_GATEWAY,
                };
                ApiError(code, e.to_string())
            }
            OpenStreamError::Session { .. } => ApiError(StatusCode::BAD_GATEWAY, e.to_string()),
        }
    }
}

impl From<DatagramError> for ApiError {
    fn from(e: DatagramError) -> Self {
        match e {
            DatagramError::Connect(c) => c.into(),
            other => ApiError::bad_request(other.to_string()),
        }
    }
}

impl From<ListenError> for ApiError {
    fn from(e: ListenError) -> Self {
        match e {
            ListenError::Taken(_) => ApiError(StatusCode::CONFLICT, e.to_string()),
            other => ApiError::bad_request(other.to_string()),
        }
    }
}

fn parse_peer(s: &str) -> Result<PeerId, ApiError> {
    s.parse()
        .map_err(|e| ApiError::bad_request(format!("invalid peer ID {s:?}: {e}")))
}

fn parse_addr(s: Option<&str>) -> Result<Option<SocketAddr>, ApiError> {
    s.filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid address {s:?}: expected IP:PORT"))
            })
        })
        .transpose()
}

type Listeners = Mutex<HashMap<String, Arc<Mutex<ServiceListener>>>>;

/// State shared by the API handlers.
#[derive(Clone)]
pub struct ApiState {
    node: Node,
    listeners: Arc<Listeners>,
}

/// Builds the API router for `node`. `token`: require this bearer token
/// (for the TCP listener); `None` for the Unix socket.
pub fn router(node: Node, token: Option<String>) -> Router {
    router_with_state(
        ApiState {
            node,
            listeners: Arc::default(),
        },
        token,
    )
}

/// Builds the routers for the Unix socket (no token) and TCP (token) that
/// share one state, so a service registered over one is seen by the other.
pub fn routers(node: Node, token: String) -> (Router, Router) {
    let state = ApiState {
        node,
        listeners: Arc::default(),
    };
    (
        router_with_state(state.clone(), None),
        router_with_state(state, Some(token)),
    )
}

impl ApiState {
    /// The listener of a service registered through the API.
    async fn listener(&self, name: &str) -> Result<Arc<Mutex<ServiceListener>>, ApiError> {
        self.listeners
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "service {name:?} is not registered: PUT /v1/services/{name} first"
                ))
            })
    }
}

fn router_with_state(state: ApiState, token: Option<String>) -> Router {
    let router = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/sessions", get(sessions))
        .route("/v1/connect", post(connect))
        .route("/v1/ping", post(ping))
        .route("/v1/probe", post(probe))
        .route("/v1/services", get(list_services))
        .route(
            "/v1/services/{name}",
            put(register_service).delete(unregister_service),
        )
        .route("/v1/services/{name}/accept", post(accept_stream))
        .route("/v1/services/{name}/datagrams", get(poll_datagrams))
        .route("/v1/peer-services", get(peer_services))
        .route("/v1/peer-services/events", get(peer_service_events))
        .route("/v1/streams", post(open_stream))
        .route("/v1/datagrams", post(send_datagram))
        .route("/v1/lookup", post(lookup))
        .route("/v1/dht/{name}", put(dht_put))
        .route("/v1/dht/{peer}/{name}", get(dht_get))
        .route("/v1/exposes", post(add_expose).get(list_tunnels))
        .route("/v1/exposes/{id}", delete(remove_tunnel))
        .route("/v1/forwards", post(add_forward).get(list_tunnels))
        .route("/v1/forwards/{id}", delete(remove_tunnel))
        .fallback(|| async { ApiError::not_found("no such endpoint: see docs/api/openapi.yaml") })
        .with_state(state);
    match token {
        None => router,
        Some(token) => {
            let token = Arc::new(token);
            router.layer(middleware::from_fn(move |req: Request, next: Next| {
                let token = token.clone();
                async move {
                    let given = req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "));
                    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                        next.run(req).await
                    } else {
                        ApiError(
                            StatusCode::UNAUTHORIZED,
                            "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the token from api.token in the data dir".into(),
                        )
                        .into_response()
                    }
                }
            }))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn status(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.node.status())
}

async fn sessions(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.node.status().sessions)
}

#[derive(Serialize)]
struct PeerInfo {
    peer: String,
    last_addr: String,
    last_seen: u64,
    connected: bool,
}

async fn peers(State(s): State<ApiState>) -> impl IntoResponse {
    let connected: Vec<String> = s
        .node
        .status()
        .sessions
        .into_iter()
        .map(|x| x.peer)
        .collect();
    let mut list: Vec<PeerInfo> = s
        .node
        .known_peers()
        .into_iter()
        .map(|(peer, e)| {
            let peer = peer.to_string();
            PeerInfo {
                connected: connected.contains(&peer),
                peer,
                last_addr: e.last_addr.to_string(),
                last_seen: e.last_seen,
            }
        })
        .collect();
    list.sort_by_key(|p| std::cmp::Reverse(p.last_seen));
    Json(list)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerTarget {
    peer: String,
    addr: Option<String>,
    count: Option<u32>,
}

async fn connect(
    State(s): State<ApiState>,
    body: Result<Json<PeerTarget>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(t) = body?;
    let peer = parse_peer(&t.peer)?;
    s.node.connect(peer, parse_addr(t.addr.as_deref())?).await?;
    let session = s
        .node
        .status()
        .sessions
        .into_iter()
        .find(|x| x.peer == t.peer);
    Ok(Json(session).into_response())
}

async fn ping(
    State(s): State<ApiState>,
    body: Result<Json<PeerTarget>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(t) = body?;
    let peer = parse_peer(&t.peer)?;
    let count = t.count.unwrap_or(1).clamp(1, 100);
    let rtts = s
        .node
        .ping(peer, parse_addr(t.addr.as_deref())?, count)
        .await?;
    let path = s
        .node
        .status()
        .sessions
        .into_iter()
        .find(|x| x.peer == t.peer)
        .map(|x| x.path);
    Ok(Json(serde_json::json!({
        "peer": t.peer,
        "path": path,
        "rtt_ms": rtts.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeRequest {
    addr: String,
}

async fn probe(
    State(s): State<ApiState>,
    body: Result<Json<ProbeRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(p) = body?;
    let addr = parse_addr(Some(&p.addr))?.ok_or_else(|| ApiError::bad_request("addr is empty"))?;
    let observed = s
        .node
        .probe(addr, Duration::from_secs(3))
        .await
        .map_err(|e| ApiError(StatusCode::GATEWAY_TIMEOUT, e.to_string()))?;
    Ok(
        Json(serde_json::json!({ "addr": p.addr, "observed": observed.to_string() }))
            .into_response(),
    )
}

async fn list_services(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.node.status().services)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    #[serde(default)]
    description: String,
    #[serde(default)]
    visibility: crate::services::Visibility,
}

async fn register_service(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let reg: RegisterBody = if body.is_empty() {
        RegisterBody::default()
    } else {
        if !headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
        {
            return Err(ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "body must be application/json".into(),
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    let mut listeners = s.listeners.lock().await;
    if listeners.contains_key(&name) {
        return Ok(StatusCode::OK.into_response());
    }
    let listener = s
        .node
        .listen_with(&name, &reg.description, reg.visibility)?;
    listeners.insert(name, Arc::new(Mutex::new(listener)));
    Ok(StatusCode::CREATED.into_response())
}

async fn unregister_service(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    match s.listeners.lock().await.remove(&name) {
        Some(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        None => Err(ApiError::not_found(format!(
            "service {name:?} is not registered through the API"
        ))),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PeerServicesQuery {
    /// Only services of peers on the LAN.
    #[serde(default)]
    lan: bool,
}

async fn peer_services(
    State(s): State<ApiState>,
    Query(q): Query<PeerServicesQuery>,
) -> impl IntoResponse {
    Json(s.node.remote_services(q.lan))
}

/// Server-sent events: one `appeared` event per service known now, then an
/// event for every service that appears or disappears.
async fn peer_service_events(
    State(s): State<ApiState>,
    Query(q): Query<PeerServicesQuery>,
) -> impl IntoResponse {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    // Subscribe before taking the snapshot so nothing falls in between.
    let live = s.node.service_events();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let snapshot: std::collections::VecDeque<crate::services::ServiceEvent> = s
        .node
        .remote_services(q.lan)
        .into_iter()
        .map(|service| crate::services::ServiceEvent {
            event: "appeared".to_owned(),
            service,
            at_ms: now,
        })
        .collect();
    let lan_only = q.lan;
    let stream = futures_util::stream::unfold(
        (snapshot, live),
        move |(mut snapshot, mut live)| async move {
            let event = match snapshot.pop_front() {
                Some(e) => e,
                None => loop {
                    match live.recv().await {
                        Ok(e) if lan_only && !e.service.lan => continue,
                        Ok(e) => break e,
                        // A slow reader missed events: say so, and go on.
                        Err(RecvError::Lagged(n)) => {
                            let lagged = Event::default()
                                .event("lagged")
                                .data(format!("{{\"missed\":{n}}}"));
                            return Some((
                                Ok::<_, std::convert::Infallible>(lagged),
                                (snapshot, live),
                            ));
                        }
                        Err(RecvError::Closed) => return None,
                    }
                },
            };
            let data = serde_json::to_string(&event).unwrap_or_default();
            let sse = Event::default().event(event.event.clone()).data(data);
            Some((Ok(sse), (snapshot, live)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn wants_upgrade(headers: &HeaderMap) -> Result<(), ApiError> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if upgrade.eq_ignore_ascii_case(UPGRADE_PROTOCOL) {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UPGRADE_REQUIRED,
            format!("this endpoint opens a raw stream: send 'Connection: Upgrade' and 'Upgrade: {UPGRADE_PROTOCOL}'"),
        ))
    }
}

fn switching(peer: PeerId) -> Response {
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    if let Ok(v) = HeaderValue::from_str(&peer.to_string()) {
        h.insert(PEER_HEADER, v);
    }
    resp
}

async fn accept_stream(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    mut req: Request,
) -> Result<Response, ApiError> {
    wants_upgrade(req.headers())?;
    let listener = s.listener(&name).await?;
    let incoming = {
        let mut l = listener.lock().await;
        l.accept()
            .await
            .ok_or_else(|| ApiError(StatusCode::SERVICE_UNAVAILABLE, "node is stopping".into()))?
    };
    let peer = incoming.peer;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => match incoming.accept().await {
                Ok(stream) => {
                    let _ = splice(TokioIo::new(upgraded), stream.send, stream.recv).await;
                }
                Err(e) => tracing::debug!("accept failed: {e}"),
            },
            Err(e) => {
                incoming
                    .reject(StreamStatus::Failed, "the local app went away")
                    .await;
                tracing::debug!("API upgrade failed: {e}");
            }
        }
    });
    Ok(switching(peer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    peer: String,
    service: String,
    addr: Option<String>,
}

async fn open_stream(
    State(s): State<ApiState>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    wants_upgrade(req.headers())?;
    let peer = parse_peer(&q.peer)?;
    let stream = s
        .node
        .open_stream(peer, &q.service, parse_addr(q.addr.as_deref())?)
        .await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let _ = splice(TokioIo::new(upgraded), stream.send, stream.recv).await;
            }
            Err(e) => tracing::debug!("API upgrade failed: {e}"),
        }
    });
    Ok(switching(peer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatagramBody {
    peer: String,
    service: String,
    addr: Option<String>,
    /// Payload, standard base64.
    data: String,
}

async fn send_datagram(
    State(s): State<ApiState>,
    body: Result<Json<DatagramBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(d) = body?;
    let peer = parse_peer(&d.peer)?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(d.data.as_bytes())
        .map_err(|e| ApiError::bad_request(format!("data is not base64: {e}")))?;
    s.node
        .send_datagram(peer, &d.service, &payload, parse_addr(d.addr.as_deref())?)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PollQuery {
    timeout_ms: Option<u64>,
}

async fn poll_datagrams(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<PollQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) =
        query.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let wait = Duration::from_millis(q.timeout_ms.unwrap_or(0)).min(MAX_POLL);
    let listener = s.listener(&name).await?;
    let mut l = listener.lock().await;
    let mut out = Vec::new();
    if let Ok(Some(first)) = tokio::time::timeout(wait, l.recv_datagram()).await {
        out.push(first);
    }
    while out.len() < 256 {
        match l.try_recv_datagram() {
            Some(d) => out.push(d),
            None => break,
        }
    }
    let items: Vec<_> = out
        .into_iter()
        .map(|(peer, data)| {
            serde_json::json!({
                "peer": peer.to_string(),
                "data": base64::engine::general_purpose::STANDARD.encode(&data),
            })
        })
        .collect();
    Ok(Json(items).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExposeBody {
    service: String,
    target: String,
}

async fn add_expose(
    State(s): State<ApiState>,
    body: Result<Json<ExposeBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(e) = body?;
    let target =
        parse_addr(Some(&e.target))?.ok_or_else(|| ApiError::bad_request("target is empty"))?;
    let id = s.node.expose(&e.service, target)?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": id, "service": e.service, "target": target.to_string() })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardBody {
    listen: String,
    peer: String,
    service: String,
    addr: Option<String>,
}

async fn add_forward(
    State(s): State<ApiState>,
    body: Result<Json<ForwardBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(f) = body?;
    let listen =
        parse_addr(Some(&f.listen))?.ok_or_else(|| ApiError::bad_request("listen is empty"))?;
    let peer = parse_peer(&f.peer)?;
    p2pos_proto::stream::validate_service_name(&f.service)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (id, bound) = s
        .node
        .forward(listen, peer, &f.service, parse_addr(f.addr.as_deref())?)
        .await
        .map_err(|e| ApiError(StatusCode::CONFLICT, e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": id, "listen": bound.to_string() })),
    )
        .into_response())
}

async fn list_tunnels(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.node.status().tunnels)
}

async fn remove_tunnel(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("tunnel id is a number"))?;
    if s.node.remove_tunnel(id) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::not_found(format!("no tunnel {id}")))
    }
}

fn dht_of(s: &ApiState) -> Result<&crate::dht::DhtHandle, ApiError> {
    s.node.dht().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no DHT".into(),
        )
    })
}

impl From<crate::dht::DhtError> for ApiError {
    fn from(e: crate::dht::DhtError) -> Self {
        let status = match e {
            crate::dht::DhtError::NotFound(_) => StatusCode::NOT_FOUND,
            crate::dht::DhtError::Invalid(_) => StatusCode::BAD_REQUEST,
            crate::dht::DhtError::Malformed(_) => StatusCode::BAD_GATEWAY,
            crate::dht::DhtError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupBody {
    peer: String,
}

async fn lookup(
    State(s): State<ApiState>,
    body: Result<Json<LookupBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body?;
    let peer = parse_peer(&b.peer)?;
    let found = dht_of(&s)?.lookup_peer(peer).await?;
    Ok(Json(found).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DhtPutBody {
    /// The value as UTF-8 text.
    value: String,
}

async fn dht_put(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<DhtPutBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(b) = body?;
    if name.as_bytes() == crate::dht::PEER_RECORD {
        return Err(ApiError::bad_request(
            "the record named peer is the node's own peer record",
        ));
    }
    let stored = dht_of(&s)?.put(name.as_bytes(), b.value.as_bytes()).await?;
    Ok(Json(serde_json::json!({ "name": name, "stored": stored })).into_response())
}

async fn dht_get(
    State(s): State<ApiState>,
    Path((peer, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let owner = parse_peer(&peer)?;
    let (record, hops, elapsed_ms) = dht_of(&s)?.get(owner, name.as_bytes()).await?;
    Ok(Json(serde_json::json!({
        "peer": peer,
        "name": name,
        "value": String::from_utf8_lossy(&record.value),
        "seq": record.seq,
        "expires": record.expires,
        "hops": hops,
        "elapsed_ms": elapsed_ms,
    }))
    .into_response())
}
