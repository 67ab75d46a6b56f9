//! Errors of the verbs wrapper. Variants carry the errno, not its text; the
//! text is made when the error is shown.

/// Why a verbs call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// `ibv_get_device_list` failed (`errno`) or listed no device (`None`).
    #[error("no RDMA devices found ({})", no_devices_detail(*errno))]
    NoDevices { errno: Option<i32> },
    #[error("no RDMA device named {name:?} (found: {})", available.join(", "))]
    DeviceNotFound {
        name: String,
        available: Vec<String>,
    },
    #[error("RDMA device {device} has no active port{}", port_detail(*port))]
    NoActivePort { device: String, port: Option<u8> },
    #[error("RDMA device {device} port {port} has no usable GID{}", gid_detail(*gid_index))]
    NoGid {
        device: String,
        port: u8,
        gid_index: Option<u8>,
    },
    /// A verbs call failed with `errno`.
    #[error("{call} failed: {}", errno_text(*errno))]
    Call { call: &'static str, errno: i32 },
    /// Posting found the queue full (the provider said ENOMEM).
    #[error("{queue} queue of queue pair {qpn} is full ({depth} entries)")]
    QueueFull {
        qpn: u32,
        queue: &'static str,
        depth: u32,
    },
    #[error("{count} scatter/gather entries exceed the queue pair's maximum of {max}")]
    TooManySges { count: usize, max: u32 },
    #[error("queue pair {qpn} is not connected")]
    NotConnected { qpn: u32 },
    /// A queue asked for more than the device supports.
    #[error("{what} of {asked} exceeds the device's maximum of {max}")]
    Limit {
        what: &'static str,
        asked: u32,
        max: u32,
    },
}

/// `asked` must not exceed the device's `max` (0: the device did not say).
pub(crate) fn check_limit(what: &'static str, asked: u32, max: u32) -> Result<(), Error> {
    if max != 0 && asked > max {
        return Err(Error::Limit { what, asked, max });
    }
    Ok(())
}

impl Error {
    /// True when the error means "this machine has no usable RDMA device"
    /// rather than "a verbs call failed on a device that exists".
    pub fn is_no_device(&self) -> bool {
        matches!(
            self,
            Error::NoDevices { .. }
                | Error::DeviceNotFound { .. }
                | Error::NoActivePort { .. }
                | Error::NoGid { .. }
        )
    }
}

/// The text of an errno, as `std::io::Error` writes it.
pub(crate) fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// The errno of the last failed libc/libibverbs call in this thread.
pub(crate) fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A verbs call that returns NULL and sets errno failed.
pub(crate) fn call_failed(call: &'static str) -> Error {
    Error::Call {
        call,
        errno: last_errno(),
    }
}

/// A verbs call that returns an errno (modify, post, destroy) failed with `rc`.
/// Some providers return -1 and set errno instead; both are handled.
pub(crate) fn rc_failed(call: &'static str, rc: i32) -> Error {
    let errno = if rc > 0 { rc } else { last_errno() };
    Error::Call { call, errno }
}

fn no_devices_detail(errno: Option<i32>) -> String {
    match errno {
        Some(e) if e == libc::ENOSYS => format!(
            "ibv_get_device_list: {}; the kernel has no RDMA support",
            errno_text(e)
        ),
        Some(e) => format!("ibv_get_device_list: {}", errno_text(e)),
        None => "ibv_get_device_list listed none".to_string(),
    }
}

fn port_detail(port: Option<u8>) -> String {
    match port {
        Some(p) => format!(" (port {p} was asked for and is not active)"),
        None => String::new(),
    }
}

fn gid_detail(gid_index: Option<u8>) -> String {
    match gid_index {
        Some(i) => format!(" at index {i}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_devices_names_enosys_and_the_kernel() {
        let text = Error::NoDevices {
            errno: Some(libc::ENOSYS),
        }
        .to_string();
        assert!(text.starts_with("no RDMA devices found (ibv_get_device_list: "));
        assert!(text.contains("os error 38"), "{text}");
        assert!(text.contains("the kernel has no RDMA support"), "{text}");
    }

    #[test]
    fn empty_device_list_says_so() {
        let text = Error::NoDevices { errno: None }.to_string();
        assert_eq!(
            text,
            "no RDMA devices found (ibv_get_device_list listed none)"
        );
    }

    #[test]
    fn device_not_found_lists_what_exists() {
        let e = Error::DeviceNotFound {
            name: "mlx5_9".into(),
            available: vec!["mlx5_0".into(), "mlx5_1".into()],
        };
        assert!(e.is_no_device());
        assert_eq!(
            e.to_string(),
            "no RDMA device named \"mlx5_9\" (found: mlx5_0, mlx5_1)"
        );
    }

    #[test]
    fn limits_are_checked_unless_unknown() {
        assert_eq!(check_limit("send queue depth", 64, 32768), Ok(()));
        assert_eq!(check_limit("send queue depth", 64, 0), Ok(()));
        let e = check_limit("completion queue depth", 5_000_000, 4_194_303).unwrap_err();
        assert_eq!(
            e.to_string(),
            "completion queue depth of 5000000 exceeds the device's maximum of 4194303"
        );
    }

    #[test]
    fn call_failure_shows_errno_text() {
        let e = Error::Call {
            call: "ibv_modify_qp(RTR)",
            errno: libc::EINVAL,
        };
        assert!(!e.is_no_device());
        assert!(
            e.to_string()
                .starts_with("ibv_modify_qp(RTR) failed: Invalid argument")
        );
    }
}
