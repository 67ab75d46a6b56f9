//! Memory regions: memory the NIC may read and write by key.

use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{ibv_access_flags, ibv_dereg_mr, ibv_mr, ibv_reg_mr};

use crate::device::{Device, ProtectionDomain};
use crate::error::{Error, call_failed};

/// Access rights of a region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessFlags {
    pub local_write: bool,
    pub remote_write: bool,
    pub remote_read: bool,
}

impl AccessFlags {
    /// The `ibv_access_flags` bits. Remote write implies local write: the
    /// verbs spec requires it and `ibv_reg_mr` fails with EINVAL otherwise.
    pub fn to_raw(self) -> u32 {
        let mut bits = 0;
        if self.local_write || self.remote_write {
            bits |= ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        }
        if self.remote_write {
            bits |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        if self.remote_read {
            bits |= ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        bits
    }
}

/// A registered region (`ibv_mr`). Deregistered on drop, before its
/// protection domain (it holds an Arc to it).
pub struct MemoryRegion {
    ptr: NonNull<ibv_mr>,
    addr: u64,
    len: usize,
    lkey: u32,
    rkey: u32,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: an ibv_mr is immutable after registration; the keys and bounds are
// copied into Rust fields, and deregistration is thread-safe.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above; no method touches the C object except Drop.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    pub fn addr(&self) -> u64 {
        self.addr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn lkey(&self) -> u32 {
        self.lkey
    }
    pub fn rkey(&self) -> u32 {
        self.rkey
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from ibv_reg_mr and is deregistered once, here;
        // the protection domain is still alive (held by `_pd`).
        unsafe {
            ibv_dereg_mr(self.ptr.as_ptr());
        }
    }
}

impl Device {
    /// Registers `len` bytes at `addr` with the device's protection domain.
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must be one allocation that stays allocated until
    /// the returned region is dropped. While the NIC may write into it (a
    /// receive posted on it, or its remote key handed to a peer) no Rust
    /// reference to that memory may be read or written.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: AccessFlags,
    ) -> Result<MemoryRegion, Error> {
        // `as i32`: the flags are a few low bits (see `to_raw`).
        let access_bits = access.to_raw() as i32;
        // SAFETY: the PD is alive (self holds it); the caller upholds that the
        // memory is valid for the region's lifetime (this fn's contract).
        let mr = unsafe { ibv_reg_mr(self.pd.ptr.as_ptr(), addr.cast(), len, access_bits) };
        let ptr = NonNull::new(mr).ok_or_else(|| call_failed("ibv_reg_mr"))?;
        // SAFETY: a non-null ibv_mr from ibv_reg_mr is initialized and stays
        // valid until ibv_dereg_mr.
        let (lkey, rkey) = unsafe { ((*ptr.as_ptr()).lkey, (*ptr.as_ptr()).rkey) };
        Ok(MemoryRegion {
            ptr,
            addr: addr as u64,
            len,
            lkey,
            rkey,
            _pd: Arc::clone(&self.pd),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_flags_map_to_ibv_bits() {
        let none = AccessFlags::default();
        assert_eq!(none.to_raw(), 0);
        let local = AccessFlags {
            local_write: true,
            ..none
        };
        assert_eq!(local.to_raw(), 1);
        let remote_write = AccessFlags {
            remote_write: true,
            ..none
        };
        // Remote write drags local write in, as the verbs spec requires.
        assert_eq!(remote_write.to_raw(), 1 | 2);
        let all = AccessFlags {
            local_write: true,
            remote_write: true,
            remote_read: true,
        };
        assert_eq!(all.to_raw(), 1 | 2 | 4);
        let read_only = AccessFlags {
            remote_read: true,
            ..none
        };
        assert_eq!(read_only.to_raw(), 4);
    }
}
