//! Opening a device: the device list, the context, the port and its GID, and
//! the protection domain every other object is created in.

use std::ffi::CStr;
use std::net::Ipv6Addr;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys::{
    ibv_alloc_pd, ibv_close_device, ibv_context, ibv_dealloc_pd, ibv_device, ibv_device_attr,
    ibv_free_device_list, ibv_get_device_list, ibv_get_device_name, ibv_gid, ibv_open_device,
    ibv_pd, ibv_port_attr, ibv_port_state, ibv_query_device, ibv_query_gid,
};

use crate::error::{Error, call_failed, last_errno, rc_failed};

/// `IBV_LINK_LAYER_*` from verbs.h (an anonymous enum that the bindings do
/// not carry). Part of the stable ABI.
const LINK_LAYER_INFINIBAND: u8 = 1;
const LINK_LAYER_ETHERNET: u8 = 2;

/// GID table entries scanned when choosing a GID automatically.
const GID_SCAN_MAX: i32 = 256;

/// The device context (`ibv_context`). Closed when the last holder drops it.
pub(crate) struct Context {
    pub(crate) ptr: NonNull<ibv_context>,
}

// SAFETY: libibverbs contexts may be used from any thread; the verbs called on
// them here are thread-safe (libibverbs(7), "thread safety").
unsafe impl Send for Context {}
// SAFETY: as above; no method mutates Rust-side state.
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from ibv_open_device and is closed exactly once,
        // here. Every child (PD, CQ, QP, MR) holds an Arc<Context> (directly
        // or through its parent), so none is alive when this runs.
        unsafe {
            ibv_close_device(self.ptr.as_ptr());
        }
    }
}

/// A protection domain (`ibv_pd`). Freed after every region and queue pair in
/// it, because those hold an Arc to it.
pub(crate) struct ProtectionDomain {
    pub(crate) ptr: NonNull<ibv_pd>,
    pub(crate) _ctx: Arc<Context>,
}

// SAFETY: see Context; PDs are only passed to thread-safe verbs.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from ibv_alloc_pd and is freed once, here; regions
        // and queue pairs in it hold an Arc to self, so none is alive. The
        // context (`_ctx`) is dropped after this body returns.
        unsafe {
            ibv_dealloc_pd(self.ptr.as_ptr());
        }
    }
}

/// The device list from `ibv_get_device_list`, freed on drop.
struct DeviceList {
    ptr: NonNull<*mut ibv_device>,
    count: usize,
}

impl DeviceList {
    fn get() -> Result<DeviceList, Error> {
        let mut count: libc::c_int = 0;
        // SAFETY: `count` is a valid out-pointer for the duration of the call.
        let list = unsafe { ibv_get_device_list(&mut count) };
        let Some(ptr) = NonNull::new(list) else {
            return Err(Error::NoDevices {
                errno: Some(last_errno()),
            });
        };
        let list = DeviceList {
            ptr,
            count: usize::try_from(count).unwrap_or(0),
        };
        if list.count == 0 {
            return Err(Error::NoDevices { errno: None });
        }
        Ok(list)
    }

    fn device(&self, index: usize) -> *mut ibv_device {
        assert!(index < self.count);
        // SAFETY: the list holds `count` valid entries (ibv_get_device_list's
        // contract) and `index < count` was just checked.
        unsafe { *self.ptr.as_ptr().add(index) }
    }

    fn names(&self) -> Vec<String> {
        (0..self.count)
            .map(|i| {
                // SAFETY: `device(i)` is a valid device of a live list;
                // ibv_get_device_name returns a NUL-terminated string owned by
                // the device, which lives as long as the list.
                let name = unsafe { ibv_get_device_name(self.device(i)) };
                if name.is_null() {
                    return format!("device{i}");
                }
                // SAFETY: non-null and NUL-terminated (see above); copied
                // before the list is freed.
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    fn open(&self, index: usize) -> Result<Arc<Context>, Error> {
        // SAFETY: `device(index)` is a valid device of a live list. The
        // context stays valid after the list is freed (ibv_get_device_list(3):
        // open the devices you need before freeing the list).
        let ctx = unsafe { ibv_open_device(self.device(index)) };
        NonNull::new(ctx)
            .map(|ptr| Arc::new(Context { ptr }))
            .ok_or_else(|| call_failed("ibv_open_device"))
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ibv_get_device_list and is freed once.
        unsafe { ibv_free_device_list(self.ptr.as_ptr()) }
    }
}

/// How the port talks to its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    InfiniBand,
    /// RoCE: addressing is by GID only.
    Ethernet,
}

impl LinkLayer {
    fn from_raw(raw: u8) -> LinkLayer {
        // "Unspecified" (0) is what old InfiniBand drivers report.
        match raw {
            LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
            LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
            _ => LinkLayer::InfiniBand,
        }
    }
}

/// The port a device was opened on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub port_num: u8,
    pub lid: u16,
    pub link_layer: LinkLayer,
    /// `ibv_mtu` code of the active MTU (1 = 256 bytes … 5 = 4096 bytes).
    pub active_mtu: u32,
    pub gid_index: u8,
    pub gid: [u8; 16],
}

impl PortInfo {
    /// The active MTU in bytes.
    pub fn mtu_bytes(&self) -> u32 {
        mtu_bytes(self.active_mtu)
    }
}

/// Bytes of an `ibv_mtu` code; 0 for an unknown code.
pub(crate) fn mtu_bytes(code: u32) -> u32 {
    match code {
        1..=5 => 128 << code,
        _ => 0,
    }
}

/// What to open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Device name (`mlx5_0`); the first device when `None`.
    pub device_name: Option<String>,
    /// Port number; the first active port when `None`.
    pub port: Option<u8>,
    /// GID table index; chosen from the table when `None` (0 on InfiniBand,
    /// the first RoCE v2 IPv4-mapped GID on Ethernet).
    pub gid_index: Option<u8>,
}

/// One GID table entry considered by [`choose_gid_index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GidCandidate {
    pub index: u8,
    pub gid: [u8; 16],
    /// From sysfs `gid_attrs/types/<index>`; `None` when unreadable.
    pub roce_v2: Option<bool>,
}

/// The GID index to use on a RoCE port: the first RoCE v2 entry with an
/// IPv4-mapped address (routable, what most RoCE fabrics are set up for),
/// else the first RoCE v2 entry, else the first non-zero entry.
pub fn choose_gid_index(candidates: &[GidCandidate]) -> Option<u8> {
    let usable = || candidates.iter().filter(|c| c.gid != [0; 16]);
    let ipv4_mapped = |c: &&GidCandidate| Ipv6Addr::from(c.gid).to_ipv4_mapped().is_some();
    usable()
        .filter(|c| c.roce_v2 == Some(true))
        .find(ipv4_mapped)
        .or_else(|| usable().find(|c| c.roce_v2 == Some(true)))
        .or_else(|| usable().next())
        .map(|c| c.index)
}

/// A GID as an IPv6 address (`fe80::1`, `::ffff:10.0.0.1`).
pub fn format_gid(gid: &[u8; 16]) -> String {
    Ipv6Addr::from(*gid).to_string()
}

/// An open device: its context, the chosen port and one protection domain.
pub struct Device {
    name: String,
    port: PortInfo,
    max_cqe: u32,
    max_qp_wr: u32,
    max_sge: u32,
    pub(crate) pd: Arc<ProtectionDomain>,
    pub(crate) ctx: Arc<Context>,
}

impl Device {
    /// Opens a device on an active port and allocates its protection domain.
    pub fn open(options: &OpenOptions) -> Result<Device, Error> {
        let list = DeviceList::get()?;
        let names = list.names();
        let index = match &options.device_name {
            None => 0,
            Some(name) => {
                names
                    .iter()
                    .position(|n| n == name)
                    .ok_or_else(|| Error::DeviceNotFound {
                        name: name.clone(),
                        available: names.clone(),
                    })?
            }
        };
        let ctx = list.open(index)?;
        drop(list);
        let name = names[index].clone();
        let attr = query_device(&ctx)?;
        let (port_num, port_attr) = choose_port(&ctx, &name, attr.phys_port_cnt, options.port)?;
        let link_layer = LinkLayer::from_raw(port_attr.link_layer);
        let gid_index = match (options.gid_index, link_layer) {
            (Some(i), _) => i,
            (None, LinkLayer::InfiniBand) => 0,
            (None, LinkLayer::Ethernet) => {
                let candidates = gid_candidates(&ctx, &name, port_num, port_attr.gid_tbl_len);
                choose_gid_index(&candidates).ok_or_else(|| Error::NoGid {
                    device: name.clone(),
                    port: port_num,
                    gid_index: None,
                })?
            }
        };
        let gid = query_gid(&ctx, port_num, gid_index).map_err(|_| Error::NoGid {
            device: name.clone(),
            port: port_num,
            gid_index: Some(gid_index),
        })?;
        let pd = alloc_pd(&ctx)?;
        Ok(Device {
            name,
            port: PortInfo {
                port_num,
                lid: port_attr.lid,
                link_layer,
                active_mtu: port_attr.active_mtu,
                gid_index,
                gid,
            },
            max_cqe: u32::try_from(attr.max_cqe).unwrap_or(0),
            max_qp_wr: u32::try_from(attr.max_qp_wr).unwrap_or(0),
            max_sge: u32::try_from(attr.max_sge).unwrap_or(0),
            pd,
            ctx,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> &PortInfo {
        &self.port
    }

    /// Device limits: completion queue entries, work requests per queue,
    /// scatter/gather entries per work request.
    pub fn limits(&self) -> (u32, u32, u32) {
        (self.max_cqe, self.max_qp_wr, self.max_sge)
    }

    /// `mlx5_0 port 1 (RoCE, GID index 3 ::ffff:10.0.0.1, MTU 1024)`.
    pub fn describe(&self) -> String {
        let p = &self.port;
        match p.link_layer {
            LinkLayer::Ethernet => format!(
                "{} port {} (RoCE, GID index {} {}, MTU {})",
                self.name,
                p.port_num,
                p.gid_index,
                format_gid(&p.gid),
                p.mtu_bytes()
            ),
            LinkLayer::InfiniBand => format!(
                "{} port {} (InfiniBand, LID {}, MTU {})",
                self.name,
                p.port_num,
                p.lid,
                p.mtu_bytes()
            ),
        }
    }
}

fn query_device(ctx: &Context) -> Result<ibv_device_attr, Error> {
    // SAFETY: ibv_device_attr is a plain C struct of integers and byte arrays;
    // all-zero is a valid value.
    let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
    // SAFETY: `ctx.ptr` is an open context (Context's invariant) and `attr` a
    // valid out-pointer for the call.
    let rc = unsafe { ibv_query_device(ctx.ptr.as_ptr(), &mut attr) };
    if rc != 0 {
        return Err(rc_failed("ibv_query_device", rc));
    }
    Ok(attr)
}

fn query_port(ctx: &Context, port: u8) -> Result<ibv_port_attr, Error> {
    // SAFETY: ibv_port_attr is a plain C struct of integers; all-zero is valid.
    let mut attr: ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: open context; `attr` is a valid out-pointer of the size the
    // provider is told (rdma-sys passes size_of_val).
    let rc = unsafe { rdma_sys::___ibv_query_port(ctx.ptr.as_ptr(), port, &mut attr) };
    if rc != 0 {
        return Err(rc_failed("ibv_query_port", rc));
    }
    Ok(attr)
}

fn query_gid(ctx: &Context, port: u8, index: u8) -> Result<[u8; 16], Error> {
    let mut gid = ibv_gid { raw: [0; 16] };
    // SAFETY: open context; `gid` is a valid out-pointer for one ibv_gid.
    let rc = unsafe { ibv_query_gid(ctx.ptr.as_ptr(), port, i32::from(index), &mut gid) };
    if rc != 0 {
        return Err(rc_failed("ibv_query_gid", rc));
    }
    // SAFETY: every bit pattern is a valid [u8; 16]; `raw` is the union's
    // byte view.
    Ok(unsafe { gid.raw })
}

fn choose_port(
    ctx: &Context,
    device: &str,
    port_count: u8,
    wanted: Option<u8>,
) -> Result<(u8, ibv_port_attr), Error> {
    let is_active = |a: &ibv_port_attr| a.state == ibv_port_state::IBV_PORT_ACTIVE;
    if let Some(port) = wanted {
        return match query_port(ctx, port) {
            Ok(attr) if is_active(&attr) => Ok((port, attr)),
            _ => Err(Error::NoActivePort {
                device: device.to_string(),
                port: Some(port),
            }),
        };
    }
    (1..=port_count)
        .find_map(|p| query_port(ctx, p).ok().filter(is_active).map(|a| (p, a)))
        .ok_or_else(|| Error::NoActivePort {
            device: device.to_string(),
            port: None,
        })
}

fn gid_candidates(ctx: &Context, device: &str, port: u8, table_len: i32) -> Vec<GidCandidate> {
    (0..table_len.clamp(0, GID_SCAN_MAX))
        .filter_map(|i| u8::try_from(i).ok())
        .filter_map(|index| {
            let gid = query_gid(ctx, port, index).ok()?;
            Some(GidCandidate {
                index,
                gid,
                roce_v2: gid_is_roce_v2(device, port, index),
            })
        })
        .collect()
}

/// The GID type from sysfs (`RoCE v2` or `IB/RoCE v1`). libibverbs'
/// `ibv_query_gid_ex` is a static inline that rdma-sys does not carry.
fn gid_is_roce_v2(device: &str, port: u8, index: u8) -> Option<bool> {
    let path = format!("/sys/class/infiniband/{device}/ports/{port}/gid_attrs/types/{index}");
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.trim().eq_ignore_ascii_case("RoCE v2"))
}

fn alloc_pd(ctx: &Arc<Context>) -> Result<Arc<ProtectionDomain>, Error> {
    // SAFETY: `ctx.ptr` is an open context.
    let pd = unsafe { ibv_alloc_pd(ctx.ptr.as_ptr()) };
    NonNull::new(pd)
        .map(|ptr| {
            Arc::new(ProtectionDomain {
                ptr,
                _ctx: Arc::clone(ctx),
            })
        })
        .ok_or_else(|| call_failed("ibv_alloc_pd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&a);
        g
    }

    fn link_local() -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0] = 0xfe;
        g[1] = 0x80;
        g[15] = 1;
        g
    }

    #[test]
    fn gid_choice_prefers_roce_v2_ipv4_mapped() {
        let c = [
            GidCandidate {
                index: 0,
                gid: link_local(),
                roce_v2: Some(false),
            },
            GidCandidate {
                index: 1,
                gid: link_local(),
                roce_v2: Some(true),
            },
            GidCandidate {
                index: 2,
                gid: mapped_v4([10, 0, 0, 1]),
                roce_v2: Some(false),
            },
            GidCandidate {
                index: 3,
                gid: mapped_v4([10, 0, 0, 1]),
                roce_v2: Some(true),
            },
        ];
        assert_eq!(choose_gid_index(&c), Some(3));
        assert_eq!(choose_gid_index(&c[..3]), Some(1));
        assert_eq!(choose_gid_index(&c[..1]), Some(0));
    }

    #[test]
    fn gid_choice_skips_empty_entries_and_unknown_types() {
        let c = [
            GidCandidate {
                index: 0,
                gid: [0; 16],
                roce_v2: Some(true),
            },
            GidCandidate {
                index: 5,
                gid: link_local(),
                roce_v2: None,
            },
        ];
        assert_eq!(choose_gid_index(&c), Some(5));
        assert_eq!(choose_gid_index(&c[..1]), None);
        assert_eq!(choose_gid_index(&[]), None);
    }

    #[test]
    fn gids_format_as_ipv6() {
        assert_eq!(
            format_gid(&mapped_v4([192, 168, 1, 5])),
            "::ffff:192.168.1.5"
        );
        assert_eq!(format_gid(&link_local()), "fe80::1");
        assert_eq!(format_gid(&[0; 16]), "::");
    }

    #[test]
    fn mtu_codes_map_to_bytes() {
        assert_eq!(mtu_bytes(1), 256);
        assert_eq!(mtu_bytes(3), 1024);
        assert_eq!(mtu_bytes(5), 4096);
        assert_eq!(mtu_bytes(0), 0);
        assert_eq!(mtu_bytes(9), 0);
    }

    #[test]
    fn link_layer_unspecified_is_infiniband() {
        assert_eq!(LinkLayer::from_raw(0), LinkLayer::InfiniBand);
        assert_eq!(LinkLayer::from_raw(1), LinkLayer::InfiniBand);
        assert_eq!(LinkLayer::from_raw(2), LinkLayer::Ethernet);
    }

    /// On a machine without RDMA (this CI) opening fails with a typed
    /// no-device error, never a panic; on a machine with a device it opens.
    #[test]
    fn open_without_device_is_a_no_device_error() {
        match Device::open(&OpenOptions::default()) {
            Ok(dev) => assert!(!dev.name().is_empty()),
            Err(e) => assert!(e.is_no_device(), "{e}"),
        }
    }
}
