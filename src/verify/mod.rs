//! The pure verification core: the canonical string and its signature, ambiguity checks, member
//! schemas, freshness and the diagnosis of a mismatch. No I/O, no clock (the caller passes the
//! time), no tokio: everything here is a function of its arguments.

pub mod ambiguity;
pub mod config;
pub mod diagnose;
pub mod duration;
pub mod freshness;
pub mod json_text;
pub mod schema;
pub mod signature;
