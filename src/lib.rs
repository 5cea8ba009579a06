//! lfguard: a reverse proxy that verifies Linksfield callbacks before they reach a backend.
//! `main.rs` only parses the command line; everything here is usable from tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ambiguity;
pub mod body;
pub mod cli;
pub mod config;
pub mod connections;
pub mod diagnose;
pub mod error;
pub mod framing;
pub mod freshness;
pub mod json_text;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod replay;
pub mod schema;
pub mod secrets;
pub mod server;
pub mod signature;
pub mod upstream;
