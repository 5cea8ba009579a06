//! lfguard: a reverse proxy that verifies Linksfield callbacks before they reach a backend.
//! `main.rs` only parses the command line; everything here is usable from tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod connections;
pub mod error;
pub mod framing;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod replay;
pub mod secrets;
pub mod server;
pub mod upstream;
pub mod verify;

// The pure core keeps its old paths (`lfguard::signature::…`) for tests, benches and fuzz targets.
pub use verify::{ambiguity, diagnose, freshness, json_text, schema, signature};
