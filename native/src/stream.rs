//! Socket abstraction over plaintext TCP and TLS, split into read and write halves. Plain TCP
//! halves wait for readability before reserving a buffer, so an idle connection holds no buffer.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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

pub enum ReadPart {
    Plain(OwnedReadHalf),
    ServerTls(ReadHalf<ServerTls>),
    ClientTls(ReadHalf<ClientTls>),
}

pub enum WritePart {
    Plain(OwnedWriteHalf),
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
                let (r, w) = s.into_split();
                (ReadPart::Plain(r), WritePart::Plain(w))
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
                if buf.capacity() - buf.len() == 0 {
                    // Idle sockets hold no buffer: reserve only once data is there to read.
                    s.readable().await?;
                    buf.reserve(READ_CHUNK);
                }
                match s.try_read_buf(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        s.readable().await?;
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
            WritePart::Plain(s) => s.write_all(data).await,
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
            WritePart::Plain(s) => s.shutdown().await,
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
