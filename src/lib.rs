//! lfguard: a reverse proxy that verifies Linksfield callbacks before they reach a backend.
//! `main.rs` only parses the command line; everything here is usable from tests.
//!
//! Layers, each importing only from the layers below it (`tests/architecture.rs` checks this):
//!
//! ```text
//! cli                 command line: sign, verify, send, echo, demo, check-config
//!  ↑
//! server, config      listeners, connections, TLS, signals, reload, admin; `config` composes the
//!  ↑                  sections that the modules below own and validate
//! proxy               the HTTP pipeline (`Proxy::pipeline`), framing, limits, upstream pool
//!  ↑
//! telemetry           request log and Prometheus metrics, fed plain values
//!  ↑
//! state               partner secrets, replay store, certificate files
//!  ↑
//! verify              the pure core: canonical string, signature, ambiguity, schemas,
//!                     freshness, diagnosis (no I/O, no clock, no tokio)
//! ```
//!
//! See docs/development.md for where a new feature goes.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod proxy;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod verify;

// Old flat paths (`lfguard::signature::…`, `lfguard::replay::…`), kept for tests, benches,
// examples and fuzz targets. Code inside the crate uses the layered paths.
pub use proxy::{body, error, framing, limits, upstream};
pub use server::{admin, connections};
pub use state::{replay, secrets};
pub use telemetry::{logging, metrics};
pub use verify::{ambiguity, diagnose, freshness, json_text, schema, signature};
