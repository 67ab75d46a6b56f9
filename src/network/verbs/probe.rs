//! Finding a hardware RDMA device.

use std::sync::Arc;

use super::{VerbsDevice, VerbsError};

/// Opens the named (or first active) RDMA device. Without the `rdma` feature
/// the build has no libibverbs binding and answers `NoDevice`.
pub fn probe_hardware(_name: Option<&str>) -> Result<Arc<dyn VerbsDevice>, VerbsError> {
    Err(VerbsError::NoDevice {
        reason: "this build has no hardware verbs support (rebuild with --features rdma and libibverbs installed)".into(),
    })
}
