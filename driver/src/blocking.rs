//! A blocking facade for simple programs that do not use async.
//!
//! ```no_run
//! use std::time::Duration;
//! let driver = junction_driver::blocking::Driver::connect_default()?;
//! let echo = driver.lookup("org.example.echo")?;
//! let reply = driver.call(&echo, "hello", Duration::from_secs(5))?;
//! println!("{}", String::from_utf8_lossy(&reply.payload));
//! # Ok::<(), junction_driver::Error>(())
//! ```
//!
//! It runs the async [`crate::Driver`] on a small runtime of its own (one
//! worker thread, so the connection is served while the caller does
//! something else). Do not call it from inside an async runtime.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::Runtime;

use crate::{Capability, Error, Message, Rights};

/// A blocking connection to a Junction.
#[derive(Debug, Clone)]
pub struct Driver {
    runtime: Arc<Runtime>,
    inner: crate::Driver,
}

/// A port, received from by blocking.
#[derive(Debug)]
pub struct Port {
    runtime: Arc<Runtime>,
    inner: crate::Port,
}

fn runtime() -> Result<Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("junction-driver")
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}

impl Driver {
    /// Connects to the Junction at `$JUNCTION_SOCKET`, or the default socket.
    pub fn connect_default() -> Result<Self, Error> {
        let runtime = Arc::new(runtime()?);
        let inner = runtime.block_on(crate::Driver::connect_default())?;
        Ok(Self { runtime, inner })
    }

    /// Connects to the Junction listening at `path`.
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let runtime = Arc::new(runtime()?);
        let inner = runtime.block_on(crate::Driver::connect(path))?;
        Ok(Self { runtime, inner })
    }

    /// The async driver underneath, for what the facade does not offer.
    pub fn as_async(&self) -> &crate::Driver {
        &self.inner
    }

    /// See [`crate::Driver::authenticate`].
    pub fn authenticate(
        &self,
        key: &crate::SecretKey,
        chain: Vec<crate::Certificate>,
    ) -> Result<crate::Identity, Error> {
        self.runtime.block_on(self.inner.authenticate(key, chain))
    }

    /// See [`crate::Driver::open_port`].
    pub fn open_port(&self) -> Result<Port, Error> {
        let inner = self.runtime.block_on(self.inner.open_port())?;
        Ok(Port {
            runtime: self.runtime.clone(),
            inner,
        })
    }

    /// See [`crate::Driver::lookup`].
    pub fn lookup(&self, name: &str) -> Result<Capability, Error> {
        self.runtime.block_on(self.inner.lookup(name))
    }

    /// See [`crate::Driver::register`].
    pub fn register(&self, name: &str, cap: &Capability) -> Result<(), Error> {
        self.runtime.block_on(self.inner.register(name, cap))
    }

    /// See [`crate::Driver::send`]; blocks while the receiver is behind.
    pub fn send(&self, cap: &Capability, payload: impl Into<Bytes>) -> Result<u64, Error> {
        self.runtime.block_on(self.inner.send(cap, payload))
    }

    /// See [`crate::Driver::call`].
    pub fn call(
        &self,
        cap: &Capability,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, Error> {
        self.runtime
            .block_on(self.inner.call(cap, payload, timeout))
    }

    /// See [`crate::Driver::sync`].
    pub fn sync(&self) -> Result<(), Error> {
        self.runtime.block_on(self.inner.sync())
    }
}

impl Port {
    /// The port's address.
    pub fn address(&self) -> crate::Address {
        self.inner.address()
    }

    /// See [`crate::Port::mint`].
    pub fn mint(&self, rights: Rights) -> Result<Capability, Error> {
        self.runtime.block_on(self.inner.mint(rights))
    }

    /// The next message, waiting as long as it takes.
    pub fn recv(&mut self) -> Result<Message, Error> {
        self.runtime.block_on(self.inner.recv())
    }

    /// The next message, or `None` if none came within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Message>, Error> {
        let inner = &mut self.inner;
        self.runtime.block_on(async move {
            match tokio::time::timeout(timeout, inner.recv()).await {
                Ok(msg) => msg.map(Some),
                Err(_) => Ok(None),
            }
        })
    }
}
