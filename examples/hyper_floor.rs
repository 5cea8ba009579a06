//! The floor under lfguard's per-request cost: the same hyper server and upstream pool, with
//! nothing in between (no verification, replay claim, log line or metrics). bench/compare.sh runs
//! it beside nginx and lfguard so the report separates what the HTTP stack costs from what
//! lfguard's own work costs.
//!
//!     cargo run --release --example hyper_floor -- 127.0.0.1:8081 http://127.0.0.1:8080

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use lfguard::config::UpstreamConfig;
use lfguard::upstream::Upstream;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(url)) = (args.next(), args.next()) else {
        return Err("usage: hyper_floor LISTEN_ADDR UPSTREAM_URL".into());
    };
    let upstream = Arc::new(Upstream::new(&UpstreamConfig {
        url,
        ..UpstreamConfig::default()
    })?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            println!("listening on {}", listener.local_addr()?);
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let upstream = upstream.clone();
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let upstream = upstream.clone();
                    async move {
                        let (mut parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        parts.uri = upstream.target().uri_for(parts.uri.path_and_query());
                        match upstream
                            .send(Request::from_parts(parts, Full::new(body)))
                            .await
                        {
                            Ok(response) => Ok::<_, hyper::Error>(response.map(|b| b.boxed())),
                            Err(_) => {
                                let mut response =
                                    Response::new(Full::default().map_err(|e| match e {}).boxed());
                                *response.status_mut() = StatusCode::BAD_GATEWAY;
                                Ok(response)
                            }
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
}
