//! Choosing the data-plane transport between TaskManagers.
//!
//! Inside one TaskManager, channels are always local (in-process queues).
//! Between TaskManagers buffers move over one of:
//!
//! - **TCP**: frames on the data connection ([`super::tcp`]).
//! - **RDMA verbs on hardware**: RDMA writes into credited, registered
//!   segments ([`super::rdma`] over [`super::verbs`]'s libibverbs binding).
//! - **RDMA verbs, emulated**: the same protocol over the user-space
//!   emulation ([`super::verbs::emu`]): no NIC needed; for tests and CI.
//! - **Simulated** (tests only): [`super::sim`] drives the same flow-control
//!   code over a seeded network.
//!
//! `taskmanager.network.transport = auto` probes for a device and falls back
//! to TCP; `rdma` insists on a device; `tcp` never probes; `rdma-emulated`
//! forces the emulation. The choice and its reason go to the log, the run
//! summary and the `strata_taskmanager_info` metric: fallback is never silent.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rdma::VerbsEnv;
use super::verbs::emu::EmuDevice;
use super::verbs::probe::probe_hardware;
use super::verbs::{DeviceKind, VerbsDevice, VerbsError};
use crate::config::Transport;
use crate::memory::NetworkBufferPool;

/// What moves buffers between TaskManagers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransportKind {
    Tcp,
    RdmaHardware,
    RdmaEmulated,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::RdmaHardware => "rdma",
            TransportKind::RdmaEmulated => "rdma-emulated",
        }
    }
}

/// The transport a TaskManager uses, why, and its verbs environment.
pub struct TransportChoice {
    pub kind: TransportKind,
    pub reason: String,
    pub verbs: Option<Arc<VerbsEnv>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "taskmanager.network.transport = rdma, but {reason}; use auto (falls back to tcp), tcp, or rdma-emulated (the verbs protocol without a NIC)"
    )]
    NoRdmaDevice { reason: String },
    #[error("setting up {what} for the verbs transport: {source}")]
    Verbs {
        what: &'static str,
        source: VerbsError,
    },
}

/// Picks the transport for `requested`, opening and registering the verbs
/// device when one is used. `host` is where the emulation's link listens.
pub fn choose(
    requested: Transport,
    host: &str,
    pool: &Arc<NetworkBufferPool>,
) -> Result<TransportChoice, TransportError> {
    let (device, reason): (Arc<dyn VerbsDevice>, String) = match requested {
        Transport::Tcp => {
            return Ok(TransportChoice {
                kind: TransportKind::Tcp,
                reason: "taskmanager.network.transport = tcp".into(),
                verbs: None,
            });
        }
        Transport::Auto => match probe_hardware(None) {
            Ok(device) => {
                let reason = format!("auto: found {}", device.describe());
                (device, reason)
            }
            Err(e) => {
                return Ok(TransportChoice {
                    kind: TransportKind::Tcp,
                    reason: format!("auto: fell back to tcp: {e}"),
                    verbs: None,
                });
            }
        },
        Transport::Rdma => match probe_hardware(None) {
            Ok(device) => {
                let reason = format!("rdma: {}", device.describe());
                (device, reason)
            }
            Err(e) => {
                let reason = match e {
                    VerbsError::NoDevice { reason } => format!("no RDMA device: {reason}"),
                    other => other.to_string(),
                };
                return Err(TransportError::NoRdmaDevice { reason });
            }
        },
        Transport::RdmaEmulated => {
            let device = EmuDevice::open(host).map_err(|source| TransportError::Verbs {
                what: "the emulated device",
                source,
            })?;
            let reason = format!(
                "rdma-emulated: the verbs protocol over {}",
                device.describe()
            );
            (device, reason)
        }
    };
    let kind = match device.kind() {
        DeviceKind::Hardware => TransportKind::RdmaHardware,
        DeviceKind::Emulated => TransportKind::RdmaEmulated,
    };
    let verbs = VerbsEnv::new(device, pool).map_err(|source| TransportError::Verbs {
        what: "network memory registration",
        source,
    })?;
    Ok(TransportChoice {
        kind,
        reason,
        verbs: Some(verbs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_without_a_device_falls_back_to_tcp_and_says_why() {
        let pool = NetworkBufferPool::new(4, 4096);
        let choice = choose(Transport::Auto, "127.0.0.1", &pool).unwrap();
        // CI machines have no RDMA device (the hardware path is probed).
        if choice.kind == TransportKind::Tcp {
            assert!(
                choice.reason.starts_with("auto: fell back to tcp"),
                "{}",
                choice.reason
            );
            assert!(choice.verbs.is_none());
        }
    }

    #[test]
    fn rdma_without_a_device_is_a_clear_error() {
        let pool = NetworkBufferPool::new(4, 4096);
        match choose(Transport::Rdma, "127.0.0.1", &pool) {
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("no RDMA device"), "{text}");
                assert!(text.contains("rdma-emulated"), "{text}");
            }
            Ok(choice) => assert_eq!(choice.kind, TransportKind::RdmaHardware),
        }
    }

    #[test]
    fn rdma_emulated_registers_every_segment() {
        let pool = NetworkBufferPool::new(8, 4096);
        let choice = choose(Transport::RdmaEmulated, "127.0.0.1", &pool).unwrap();
        assert_eq!(choice.kind, TransportKind::RdmaEmulated);
        let env = choice.verbs.unwrap();
        assert_eq!(env.recv_depth(), 8);
        assert!(
            choice.reason.contains("emulated verbs"),
            "{}",
            choice.reason
        );
    }
}
