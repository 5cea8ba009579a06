//! What lfguard tells its operators: the log (one line per request, buffered per thread) and the
//! Prometheus metrics. Used by the pipeline and the server; fed plain values, it imports neither.

pub mod logging;
pub mod metrics;
