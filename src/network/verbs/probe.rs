//! Finding a hardware verbs device, in every build.
//!
//! With the cargo feature `rdma` this opens a device through libibverbs
//! ([`super::hw::probe`]); without it (the default build, which does not link
//! libibverbs) it says so. Either way the answer is a `Result` the transport
//! selection can log and fall back on; nothing here panics.

use std::sync::Arc;

use super::{VerbsDevice, VerbsError};

/// The `NoDevice` reason of a build without the `rdma` feature.
pub const NO_HARDWARE_SUPPORT: &str = "this build has no hardware verbs support (rebuild with --features rdma and libibverbs installed)";

/// Whether this binary was built with hardware verbs support.
pub const fn hardware_support_compiled() -> bool {
    cfg!(feature = "rdma")
}

/// Opens the named RDMA device (or the first one) on its first active port,
/// or returns [`VerbsError::NoDevice`] naming why there is none.
pub fn probe_hardware(device_name: Option<&str>) -> Result<Arc<dyn VerbsDevice>, VerbsError> {
    #[cfg(feature = "rdma")]
    {
        super::hw::probe(device_name)
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = device_name;
        Err(VerbsError::NoDevice {
            reason: NO_HARDWARE_SUPPORT.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::verbs::DeviceKind;

    /// CI runs this with and without `--features rdma` on a machine with no
    /// RDMA device (`ibv_get_device_list` fails with ENOSYS there). On a
    /// machine with a device and the feature, the probe opens it instead.
    #[test]
    fn probe_hardware_without_a_device_is_no_device_not_a_panic() {
        match probe_hardware(None) {
            Err(VerbsError::NoDevice { reason }) => {
                if hardware_support_compiled() {
                    assert!(reason.contains("RDMA device"), "{reason}");
                    println!("no-device fallback: {reason}");
                } else {
                    assert_eq!(reason, NO_HARDWARE_SUPPORT);
                }
            }
            Ok(device) => {
                assert!(hardware_support_compiled());
                assert_eq!(device.kind(), DeviceKind::Hardware);
            }
            Err(other) => panic!("expected NoDevice, got {other}"),
        }
    }

    #[test]
    fn probe_hardware_for_a_missing_name_is_no_device() {
        let name = "strata-no-such-rdma-device";
        match probe_hardware(Some(name)) {
            Err(VerbsError::NoDevice { reason }) => {
                if hardware_support_compiled() {
                    // Either no device at all, or a list that lacks the name.
                    assert!(
                        reason.contains("no RDMA devices found") || reason.contains(name),
                        "{reason}"
                    );
                }
            }
            Ok(_) => panic!("a device named {name} cannot exist"),
            Err(other) => panic!("expected NoDevice, got {other}"),
        }
    }

    #[test]
    fn no_device_error_text_names_the_reason() {
        let err = probe_hardware(Some("strata-no-such-rdma-device")).err();
        let text = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.starts_with("no RDMA device: "), "{text}");
    }
}
