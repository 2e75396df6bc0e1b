//! A raw Road client for the hostile benchmark: frames written with
//! `junction_road`'s codec directly, for what a well-behaved driver never
//! does (never acknowledging, never reading, pipelining without limit).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use junction_road::control::{CONTROL_HANDLE, ControlReply, ControlRequest};
use junction_road::{Frame, Header, Hello, MAGIC, PROTOCOL_VERSION, Welcome, codec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// How long the handshake and setup requests may take.
const SETUP: Duration = Duration::from_secs(10);

/// The read side of a raw connection.
pub(super) struct RawReader {
    read: OwnedReadHalf,
    buf: BytesMut,
    /// Bytes read so far.
    pub(super) bytes: u64,
}

impl RawReader {
    /// The next frame; `None` when the junction closed the connection.
    pub(super) async fn recv(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(frame) = codec::decode(&mut self.buf, u32::MAX)? {
                return Ok(Some(frame));
            }
            self.buf.reserve(64 * 1024);
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(None),
                Ok(n) => self.bytes += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads and throws away everything until the connection closes.
    pub(super) async fn drain(mut self) -> u64 {
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            match self.read.read(&mut chunk).await {
                Ok(0) | Err(_) => return self.bytes,
                Ok(n) => self.bytes += n as u64,
            }
        }
    }
}

/// A raw connection that completed the Hello/Welcome handshake.
pub(super) struct Raw {
    pub(super) reader: RawReader,
    pub(super) write: OwnedWriteHalf,
    pub(super) welcome: Welcome,
    next_tag: u64,
}

impl Raw {
    /// Connects and completes the handshake.
    pub(super) async fn connect(socket: &Path, label: &str) -> anyhow::Result<Raw> {
        let stream = tokio::time::timeout(SETUP, tokio::net::UnixStream::connect(socket))
            .await
            .context("connecting timed out")??;
        let (read, write) = stream.into_split();
        let mut raw = Raw {
            reader: RawReader {
                read,
                buf: BytesMut::new(),
                bytes: 0,
            },
            write,
            welcome: Welcome {
                version: 0,
                junction: 0,
                home: junction_road::Address::new(0, 0),
                max_frame: 0,
                window: 0,
                max_handles: 0,
                max_ports: 0,
                max_pending_calls: 0,
                nonce: [0; 32],
            },
            next_tag: 1,
        };
        raw.send(Header::Hello(Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            max_frame: junction_road::DEFAULT_MAX_FRAME,
            label: label.into(),
        }))
        .await?;
        let frame = tokio::time::timeout(SETUP, raw.reader.recv())
            .await
            .context("no Welcome in time")??;
        match frame.map(|f| f.header) {
            Some(Header::Welcome(w)) => raw.welcome = w,
            other => bail!("expected a Welcome, got {other:?}"),
        }
        Ok(raw)
    }

    /// Writes one frame with no payload.
    pub(super) async fn send(&mut self, header: Header) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        codec::encode_parts(&header, &[], &mut out);
        self.write.write_all(&out).await?;
        Ok(())
    }

    /// A fresh call tag.
    pub(super) fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// Calls the control port and waits for its answer, skipping other
    /// frames; returns the reply and the handle of the capability that came
    /// with it, if any.
    pub(super) async fn control(
        &mut self,
        request: &ControlRequest,
        caps: Vec<u32>,
    ) -> anyhow::Result<(ControlReply, Option<u32>)> {
        let tag = self.tag();
        let mut out = BytesMut::new();
        control_call(&mut out, tag, request, caps);
        self.write.write_all(&out).await?;
        let reply = tokio::time::timeout(SETUP, self.control_reply(tag))
            .await
            .context("no control reply in time")??;
        // Consumed, as a driver says: an unacknowledged reply keeps its
        // call counted as pending.
        self.credit_home(1).await?;
        Ok(reply)
    }

    /// Reports `count` deliveries to the home port (replies) consumed.
    pub(super) async fn credit_home(&mut self, count: u32) -> anyhow::Result<()> {
        let port = self.welcome.home.port;
        self.send(Header::Credit { port, count }).await
    }

    /// Waits for the answer to the control call `tag`.
    pub(super) async fn control_reply(
        &mut self,
        tag: u64,
    ) -> anyhow::Result<(ControlReply, Option<u32>)> {
        loop {
            let frame = self
                .reader
                .recv()
                .await?
                .context("the junction closed the connection")?;
            match frame.header {
                Header::Deliver(d) if d.tag == tag => {
                    let reply = postcard::from_bytes(&frame.payload)?;
                    return Ok((reply, d.caps.first().map(|g| g.handle)));
                }
                Header::Error(e) if e.tag == tag => bail!("refused: {}", e.message),
                Header::CallFailed { tag: t, reason } if t == tag => bail!("call failed: {reason}"),
                _ => {}
            }
        }
    }

    /// Waits for a frame matching `want`, skipping others.
    pub(super) async fn expect<T>(
        &mut self,
        mut want: impl FnMut(&Header) -> Option<T>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(SETUP, async {
            loop {
                let frame = self
                    .reader
                    .recv()
                    .await?
                    .context("the junction closed the connection")?;
                if let Header::Error(e) = &frame.header {
                    bail!("refused: {}", e.message);
                }
                if let Some(v) = want(&frame.header) {
                    return Ok(v);
                }
            }
        })
        .await
        .context("no answer in time")?
    }

    /// Opens a port; returns its number.
    pub(super) async fn open_port(&mut self) -> anyhow::Result<u16> {
        self.send(Header::OpenPort { req: 1 }).await?;
        self.expect(|h| match h {
            Header::PortOpened { req: 1, address } => Some(address.port),
            _ => None,
        })
        .await
    }

    /// Mints a capability to `port`; returns its handle.
    pub(super) async fn mint(
        &mut self,
        port: u16,
        rights: junction_road::Rights,
    ) -> anyhow::Result<u32> {
        self.send(Header::Mint {
            req: 2,
            port,
            rights,
        })
        .await?;
        self.expect(|h| match h {
            Header::Minted { req: 2, handle, .. } => Some(*handle),
            _ => None,
        })
        .await
    }

    /// Looks `name` up; returns the handle.
    pub(super) async fn lookup(&mut self, name: &str) -> anyhow::Result<u32> {
        let (reply, handle) = self
            .control(
                &ControlRequest::Lookup {
                    name: name.parse()?,
                },
                vec![],
            )
            .await?;
        match (reply, handle) {
            (ControlReply::Found { .. }, Some(h)) => Ok(h),
            (other, _) => bail!("lookup of {name} failed: {other:?}"),
        }
    }
}

/// Appends a call to the control port.
pub(super) fn control_call(out: &mut BytesMut, tag: u64, request: &ControlRequest, caps: Vec<u32>) {
    let payload = postcard::to_allocvec(request).expect("requests encode");
    codec::encode_parts(
        &Header::Call(junction_road::Call {
            handle: CONTROL_HANDLE,
            tag,
            caps,
        }),
        &payload,
        out,
    );
}

/// Appends a frame.
pub(super) fn push(out: &mut BytesMut, header: &Header, payload: &Bytes) {
    codec::encode_parts(header, payload, out);
}
