//! State that outlives a request: the partners' secrets (swapped whole on reload) and the replay
//! store. Depends only on the pure core.

pub mod replay;
pub mod secrets;
