//! The two libc calls std does not wrap: `fallocate(2)` and the memlock limit.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `fallocate(fd, 0, offset, len)`: reserves blocks and extends the size.
pub(super) fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `file` is an open descriptor for the duration of the call and
    // fallocate touches no memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    // File systems without fallocate (some FUSE, NFSv3): fall back to a sparse
    // extension, which is correct, only slower for direct writes.
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        let end = (offset + len) as u64;
        if file.metadata()?.len() < end {
            file.set_len(end)?;
        }
        return Ok(());
    }
    Err(err)
}

/// The soft RLIMIT_MEMLOCK in bytes (`u64::MAX` when unlimited), and whether
/// the process may exceed it anyway (root's CAP_IPC_LOCK, approximated by euid 0).
pub(super) fn memlock_limit_bytes() -> (u64, bool) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the call's duration.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    let bytes = if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        limit.rlim_cur
    };
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    (bytes, is_root)
}
