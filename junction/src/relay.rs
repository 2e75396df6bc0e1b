//! A UDP relay in the middle of a Highway, which can cut the link and heal
//! it without touching either junction: what the tests and `junction bench
//! --highway` cut to watch traffic find another way.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Relays datagrams between the first peer that sends to it and `target`,
/// on a thread of its own, until dropped.
#[derive(Debug)]
pub struct UdpRelay {
    port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpRelay {
    /// A relay on a free loopback port to `target` (a Highway's listening
    /// end); dial the relay's port instead of the target's.
    pub fn new(target: SocketAddr) -> std::io::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        // Wakes to see `stop` at least this often.
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let port = socket.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (cut.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut client = None;
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if c.load(Ordering::Relaxed) {
                    continue;
                }
                let to = if from == target {
                    match client {
                        Some(client) => client,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    target
                };
                let _ = socket.send_to(&buf[..n], to);
            }
        });
        Ok(Self {
            port,
            cut,
            stop,
            thread: Some(thread),
        })
    }

    /// The loopback port to dial.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops everything from now on (`true`), or relays again (`false`).
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
