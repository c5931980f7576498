//! Client of the daemon's local API over its Unix socket.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// The local API of one data dir.
pub struct ApiClient {
    socket: PathBuf,
    data_dir: PathBuf,
}

/// An upgraded API stream: raw bytes both ways.
pub type RawStream = TokioIo<hyper::upgrade::Upgraded>;

impl ApiClient {
    pub fn new(data_dir: &Path) -> Self {
        ApiClient {
            socket: data_dir.join("api.sock"),
            data_dir: data_dir.to_owned(),
        }
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|e| {
            anyhow!(
                "no p2pos daemon is running for data dir {} ({e}); start one with: p2pos up --data-dir {}",
                self.data_dir.display(),
                self.data_dir.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("local API handshake")?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender.send_request(req).await.context("local API request")
    }

    fn request(method: Method, path: &str, body: Option<&Value>) -> Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://localhost{path}"))
            .header("host", "localhost");
        let body = match body {
            Some(v) => {
                builder = builder.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(v)?)
            }
            None => Bytes::new(),
        };
        Ok(builder.body(Full::new(body))?)
    }

    /// A JSON request; a non-2xx answer becomes an error with the daemon's
    /// message.
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        let resp = self.send(Self::request(method, path, body)?).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{}", error_message(status, &bytes));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// A server-sent event stream: calls `on_event(name, data)` for each
    /// event until the daemon closes the stream.
    pub async fn events(&self, path: &str, mut on_event: impl FnMut(&str, &str)) -> Result<()> {
        let resp = self.send(Self::request(Method::GET, path, None)?).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            bail!("{}", error_message(status, &bytes));
        }
        let mut pending = Vec::new();
        let (mut name, mut data) = (String::new(), String::new());
        while let Some(frame) = body.frame().await {
            let frame = frame.context("the daemon's event stream failed")?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(chunk);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\r', '\n']);
                if line.is_empty() {
                    if !data.is_empty() {
                        on_event(&name, &data);
                    }
                    name.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim_start().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
        }
        Ok(())
    }

    /// An upgrade request: returns the raw stream and the peer header.
    pub async fn upgrade(&self, method: Method, path: &str) -> Result<(RawStream, Option<String>)> {
        let mut req = Self::request(method, path, None)?;
        let h = req.headers_mut();
        h.insert("connection", "upgrade".parse()?);
        h.insert("upgrade", "p2pos-stream".parse()?);
        let resp = self.send(req).await?;
        let status = resp.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let bytes = resp.into_body().collect().await?.to_bytes();
            bail!("{}", error_message(status, &bytes));
        }
        let peer = resp
            .headers()
            .get("p2pos-peer")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let upgraded = hyper::upgrade::on(resp).await.context("stream upgrade")?;
        Ok((TokioIo::new(upgraded), peer))
    }
}

fn error_message(status: StatusCode, body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| format!("daemon answered {status}"))
}

/// Percent-encodes a query value.
pub fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
