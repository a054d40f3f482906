//! phigate data plane: sockets, TLS, the PostgreSQL protocol relay, the decision cache and the
//! bridge to the Python control plane. Core modules are free of PyO3 so `cargo test` needs no Python.

pub mod backend;
pub mod bridge;
pub mod cache;
pub mod cancel;
pub mod config;
pub mod detectors;
pub mod engine;
pub mod errors;
pub mod events;
pub mod framing;
pub mod frontend;
pub mod mask_rules;
pub mod masking;
pub mod messages;
pub mod normalize;
pub mod pipeline;
#[cfg(test)]
mod pipeline_model;
pub mod prefilter;
pub mod relay;
pub mod rowguard;
pub mod scrub;
pub mod stream;
pub mod tls;

#[cfg(feature = "python")]
mod python;
