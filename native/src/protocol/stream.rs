//! Socket abstraction over plaintext TCP and TLS, split into read and write halves. Plain TCP
//! halves wait for readability before reserving a buffer, so an idle connection holds no buffer.

use bytes::BytesMut;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// Bytes reserved for one read; large enough that bulk results move in few syscalls.
pub const READ_CHUNK: usize = 64 * 1024;
/// Bytes reserved for one read from a TLS stream (one TLS record).
const TLS_CHUNK: usize = 16 * 1024;

pub type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;
pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<ServerTls>),
    ClientTls(Box<ClientTls>),
}

/// Plain TCP halves share the stream: tokio's TcpStream does all I/O through `&self`, and only
/// the stream itself offers `try_io`, which the read path needs (see `read_into`).
pub enum ReadPart {
    Plain(Arc<TcpStream>),
    ServerTls(ReadHalf<ServerTls>),
    ClientTls(ReadHalf<ClientTls>),
}

pub enum WritePart {
    Plain(Arc<TcpStream>),
    ServerTls(WriteHalf<ServerTls>),
    ClientTls(WriteHalf<ClientTls>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    pub fn split(self) -> (ReadPart, WritePart) {
        match self {
            Stream::Plain(s) => {
                let s = Arc::new(s);
                (ReadPart::Plain(s.clone()), WritePart::Plain(s))
            }
            Stream::ServerTls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadPart::ServerTls(r), WritePart::ServerTls(w))
            }
            Stream::ClientTls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadPart::ClientTls(r), WritePart::ClientTls(w))
            }
        }
    }

    /// Reads more bytes into `buf`; returns 0 at end of stream.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        buf.reserve(READ_CHUNK.min(8192));
        match self {
            Stream::Plain(s) => s.read_buf(buf).await,
            Stream::ServerTls(s) => s.read_buf(buf).await,
            Stream::ClientTls(s) => s.read_buf(buf).await,
        }
    }

    /// Ends the stream cleanly (TLS close_notify first, so clients see an orderly end).
    pub async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::ServerTls(s) => s.shutdown().await,
            Stream::ClientTls(s) => s.shutdown().await,
        };
    }

    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::ServerTls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Stream::ClientTls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }
}

impl ReadPart {
    /// Reads more bytes into `buf`; returns 0 at end of stream.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            ReadPart::Plain(s) => loop {
                // Idle sockets hold no buffer: wait for data before reserving one.
                s.readable().await?;
                if buf.capacity() == buf.len() {
                    buf.reserve(READ_CHUNK);
                }
                let spare = buf.capacity() - buf.len();
                let mut short_read = None;
                // A read that returns less than the space offered drained the socket, so its
                // readiness is cleared right away (by reporting WouldBlock to try_io) instead of
                // by a second read that returns EAGAIN: one syscall less per message and
                // direction. tokio's readiness ticks keep data that arrives meanwhile from being
                // missed.
                let res = s.try_io(Interest::READABLE, || {
                    let n = s.try_read_buf(buf)?;
                    if n > 0 && n < spare {
                        short_read = Some(n);
                        return Err(std::io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                });
                match res {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if let Some(n) = short_read {
                            return Ok(n);
                        }
                    }
                    Err(e) => return Err(e),
                }
            },
            // rustls hands out at most one record (16 kB) per read anyway.
            ReadPart::ServerTls(s) => {
                buf.reserve(TLS_CHUNK);
                s.read_buf(buf).await
            }
            ReadPart::ClientTls(s) => {
                buf.reserve(TLS_CHUNK);
                s.read_buf(buf).await
            }
        }
    }
}

impl WritePart {
    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        match self {
            WritePart::Plain(s) => {
                let mut off = 0;
                while off < data.len() {
                    s.writable().await?;
                    match s.try_write(&data[off..]) {
                        Ok(n) => off += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            WritePart::ServerTls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            WritePart::ClientTls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = match self {
            WritePart::Plain(s) => socket2::SockRef::from(&**s).shutdown(std::net::Shutdown::Write),
            WritePart::ServerTls(s) => s.shutdown().await,
            WritePart::ClientTls(s) => s.shutdown().await,
        };
    }
}

/// Drops a buffer's allocation once it is empty and large, so idle sessions stay small.
pub fn release_if_idle(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}
