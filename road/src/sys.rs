//! The one system call the Roads make themselves: reading into memory that
//! is not initialised yet, which safe Rust cannot express without zeroing
//! every read buffer first (a 64 KiB memset per read on the message path).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use tokio::io::ReadBuf;

/// Reads from `fd` into the unfilled part of `buf`; returns the bytes read.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: `read` writes at most `unfilled.len()` bytes into memory we
    // own mutably, and the bytes it reports are initialised by it before we
    // mark them so.
    unsafe {
        let unfilled = buf.unfilled_mut();
        let n = libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len());
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        buf.assume_init(n);
        buf.advance(n);
        Ok(n)
    }
}

/// Registers an owned socket with the reactor for `interest`.
pub(crate) fn register(
    stream: std::os::unix::net::UnixStream,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::unix::net::UnixStream>> {
    // SAFETY: the AsyncFd owns the stream, whose descriptor is open and stays
    // the same until the AsyncFd drops it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(stream, interest).map_err(Into::into)
    }
}
