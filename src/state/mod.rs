//! State that outlives a request: the partners' secrets (swapped whole on reload), the replay
//! store and the spool of callbacks waiting for the backend. Depends only on the pure core.

pub mod replay;
pub mod secrets;
pub mod spool;
