//! The PostgreSQL wire protocol: framing, messages, startup, TLS and socket halves.

pub mod framing;
pub mod messages;
pub mod stream;
pub mod tls;
