//! One client session: frontend (startup, authentication), the upstream backend, the relay and cancel routing.

pub mod backend;
pub mod cancel;
pub mod frontend;
pub mod pipeline;
#[cfg(test)]
mod pipeline_model;
pub mod relay;
