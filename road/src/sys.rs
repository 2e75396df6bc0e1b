//! The system calls the Roads make themselves: reading into memory that is
//! not initialised yet, which safe Rust cannot express without zeroing every
//! read buffer first (a 64 KiB memset per read on the message path), and
//! raising the descriptor limit, which std does not offer.
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

/// Registers an owned socket (or a shared one) with the reactor for
/// `interest`.
pub(crate) fn register<T: AsRawFd>(
    stream: T,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the AsyncFd owns the stream, whose descriptor is open and stays
    // the same until the AsyncFd drops it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(stream, interest).map_err(Into::into)
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit;
/// returns the limit now in force.
pub(crate) fn raise_fd_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into memory we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the `rlimit` we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}
