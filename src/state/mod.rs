//! State that outlives a request: the partners' secrets (swapped whole on reload), the replay
//! store, the spool of callbacks waiting for the backend, and the certificate files of TLS.
//! Depends only on the pure core.

pub mod certs;
pub mod replay;
pub mod secrets;
pub mod spool;
