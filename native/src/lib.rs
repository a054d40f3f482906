//! phigate data plane: sockets, TLS, the PostgreSQL protocol relay, the decision cache and the
//! bridge to the Python control plane. Core modules are free of PyO3 so `cargo test` needs no Python.

pub mod audit;
pub mod bridge;
pub mod cache;
pub mod config;
pub mod disclosures;
pub mod engine;
pub mod errors;
pub mod events;
pub mod masking;
pub mod normalize;
pub mod protocol;
pub mod runtime;
pub mod session;

#[cfg(feature = "python")]
mod python;
