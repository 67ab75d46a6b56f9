//! Who may talk to a strata process: the cluster secret, the handshake that
//! proves both ends of a connection hold it, and the rule that nothing listens
//! beyond loopback without one.
//!
//! # What it owns
//!
//! - [`ClusterSecret`]: the shared secret, from `security.auth.secret`,
//!   `security.auth.secret-file` or `STRATA_AUTH_SECRET`; it never prints.
//! - [`handshake`] / [`handshake_blocking`]: a mutual challenge-response run on
//!   every fresh control and data connection before any other byte.
//! - [`check_bind`]: a listener on a non-loopback address needs a secret.
//!
//! # Why HMAC challenge-response and not mutual TLS
//!
//! A strata cluster already shares one piece of configuration on every
//! process, so one shared secret is the smallest thing an operator has to
//! manage: no certificate authority, no per-host certificates to issue,
//! rotate and revoke, no clock-dependent expiry, and no TLS stack in the
//! data path. Each side sends a fresh 32-byte nonce; each proves it holds
//! the secret with HMAC-SHA256(secret, label ‖ role ‖ plane ‖ version ‖
//! client nonce ‖ server nonce). The proof never reveals the secret, fresh
//! nonces on both sides make a recorded proof useless on another
//! connection, and the prover's role in the MAC input means a server's proof
//! can never pass as a client's (reflection). Proofs are compared in constant
//! time (`hmac`'s `verify_slice`).
//!
//! What it does NOT give, honestly: after the handshake the connection is
//! plain TCP. There is no confidentiality (anyone on the path reads the
//! shuffle data and control messages) and no per-frame integrity (an
//! attacker who can inject into or take over an established TCP connection
//! can alter frames; one in the middle can relay a whole handshake and then
//! ride the authenticated connection). It keeps out processes that merely
//! reach the port — the common case of an exposed port in a shared network —
//! not an attacker on the path. For that, run the cluster inside a private
//! network or a VPN/WireGuard/IPsec mesh; adding TLS on top of this module is
//! the upgrade path (the handshake would then bind to the TLS session).
//!
//! # Invariants and limits
//!
//! - A secret is at least [`SECRET_BYTES_MIN`] bytes, whatever its source.
//! - A secret file readable by group or others is refused, naming the file.
//! - Every handshake read has a fixed size ([`HELLO_BYTES`], [`PROOF_BYTES`]);
//!   a peer cannot make this side allocate, and the whole exchange is bounded
//!   by one timeout (`security.handshake.timeout`).
//! - Both sides always exchange hellos, with or without a secret, so a
//!   secret-less process meeting one with a secret (or a control-plane
//!   client dialing a data port) fails on both sides with an error naming
//!   the mismatch, instead of hanging or misreading frames.

mod handshake;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use handshake::{
    HELLO_BYTES, HandshakeFailure, PROOF_BYTES, PROTOCOL_VERSION, handshake, handshake_blocking,
};

/// Whether `a == b`, in a time that depends on their lengths only (for
/// bearer tokens: a comparison that stops at the first difference tells an
/// attacker how much of a guess was right).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The shortest secret accepted: 128 bits, so guessing it is out of reach.
pub const SECRET_BYTES_MIN: usize = 16;
/// The environment variable read when neither config key is set.
pub const SECRET_ENV: &str = "STRATA_AUTH_SECRET";
/// The default of `security.handshake.timeout`.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// The secret every process of a cluster shares. `Debug` and `Display` print
/// `<redacted>`; the bytes leave this module only as HMAC key material.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret {
    bytes: Vec<u8>,
}

impl ClusterSecret {
    /// `security.auth.secret`, else `security.auth.secret-file` (the file's
    /// contents, trailing newline trimmed; a file readable by group or
    /// others is refused), else the environment variable
    /// `STRATA_AUTH_SECRET`; `None` when none is set. A secret shorter than
    /// [`SECRET_BYTES_MIN`] (an empty one included) is refused, naming where
    /// it came from.
    pub fn from_config(config: &crate::config::Config) -> Result<Option<Self>, SecurityError> {
        if let Some(text) = &config.auth_secret {
            if let Some(path) = &config.auth_secret_file {
                tracing::warn!(
                    "both security.auth.secret and security.auth.secret-file ({}) are set; using security.auth.secret",
                    path.display()
                );
            }
            return Self::checked(text.expose().as_bytes(), || {
                "security.auth.secret".to_owned()
            })
            .map(Some);
        }
        if let Some(path) = &config.auth_secret_file {
            return Self::from_file(path).map(Some);
        }
        Self::from_env(std::env::var_os(SECRET_ENV))
    }

    /// The value of [`SECRET_ENV`], if set (an empty one is refused: whoever
    /// set it meant to have a secret).
    fn from_env(value: Option<std::ffi::OsString>) -> Result<Option<Self>, SecurityError> {
        value
            .map(|value| Self::checked(value.as_encoded_bytes(), || SECRET_ENV.to_owned()))
            .transpose()
    }

    /// A secret from raw bytes (tests, embedding); at least
    /// [`SECRET_BYTES_MIN`] of them.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecurityError> {
        Self::checked(bytes, || "the given bytes".to_owned())
    }

    /// Reads a secret file: owner-only permissions, trailing newline trimmed.
    pub fn from_file(path: &Path) -> Result<Self, SecurityError> {
        let read_error = |source| SecurityError::SecretFileRead {
            path: path.to_owned(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        refuse_exposed_file(path, &metadata)?;
        let mut bytes = std::fs::read(path).map_err(read_error)?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Self::checked(&bytes, || {
            format!("security.auth.secret-file {}", path.display())
        })
    }

    fn checked(bytes: &[u8], origin: impl FnOnce() -> String) -> Result<Self, SecurityError> {
        if bytes.len() < SECRET_BYTES_MIN {
            return Err(SecurityError::SecretTooShort {
                origin: origin(),
                length: bytes.len(),
                min: SECRET_BYTES_MIN,
            });
        }
        Ok(Self {
            bytes: bytes.to_vec(),
        })
    }

    /// The key material for the handshake's HMAC.
    /// HMAC-SHA256 of `message` under the secret, in hex: a credential
    /// derived for one purpose (the Flight bearer token), from which the
    /// secret cannot be recovered.
    pub fn mac_hex(&self, message: &[u8]) -> String {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(self.key())
            .expect("HMAC takes a key of any length");
        mac.update(message);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn key(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(unix)]
fn refuse_exposed_file(path: &Path, metadata: &std::fs::Metadata) -> Result<(), SecurityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecurityError::SecretFileExposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_exposed_file(_path: &Path, _metadata: &std::fs::Metadata) -> Result<(), SecurityError> {
    Ok(())
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Which end of a connection this side is: the one that dialed (client) or
/// the one that accepted (server). Part of every proof, so that one side's
/// proof never passes as the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn wire(self) -> u8 {
        match self {
            Role::Client => 1,
            Role::Server => 2,
        }
    }

    fn peer(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Server => "server",
        })
    }
}

/// Which protocol the connection carries: the control RPC (JobManager ↔
/// TaskManager, clients) or the data plane (shuffle between TaskManagers).
/// A connection to the wrong port fails the handshake naming both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plane {
    Control,
    Data,
}

impl Plane {
    fn wire(self) -> u8 {
        match self {
            Plane::Control => 1,
            Plane::Data => 2,
        }
    }

    fn from_wire(value: u8) -> Option<Plane> {
        match value {
            1 => Some(Plane::Control),
            2 => Some(Plane::Data),
            _ => None,
        }
    }
}

impl fmt::Display for Plane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Plane::Control => "control",
            Plane::Data => "data",
        })
    }
}

/// Refuses to listen on a non-loopback address without a secret: anyone who
/// can reach the port could otherwise deploy tasks or read shuffle data.
/// `key` is the configuration key that chose the address (named in the
/// error).
pub fn check_bind(
    address: &SocketAddr,
    secret: Option<&ClusterSecret>,
    key: &str,
) -> Result<(), SecurityError> {
    if address.ip().is_loopback() || secret.is_some() {
        return Ok(());
    }
    Err(SecurityError::InsecureBind {
        address: *address,
        key: key.to_owned(),
    })
}

/// A process's side of peer authentication: its secret (if any) and how long
/// a handshake may take. Cheap to clone; what connection builders hold.
#[derive(Clone, Debug)]
pub struct PeerAuth {
    pub secret: Option<ClusterSecret>,
    /// `security.handshake.timeout`.
    pub timeout: Duration,
}

impl PeerAuth {
    /// The secret ([`ClusterSecret::from_config`]) and
    /// `security.handshake.timeout`.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, SecurityError> {
        Ok(Self {
            secret: ClusterSecret::from_config(config)?,
            timeout: config.handshake_timeout,
        })
    }

    /// No secret: only good between processes that listen on loopback.
    pub fn loopback() -> Self {
        Self {
            secret: None,
            timeout: HANDSHAKE_TIMEOUT_DEFAULT,
        }
    }

    /// [`handshake`] with this side's secret and timeout; a failure names
    /// `peer`.
    pub async fn handshake<S>(
        &self,
        stream: &mut S,
        role: Role,
        plane: Plane,
        peer: &str,
    ) -> Result<(), SecurityError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        handshake(stream, self.secret.as_ref(), role, plane, self.timeout)
            .await
            .map_err(|e| e.at_peer(peer))
    }
}

impl Default for PeerAuth {
    fn default() -> Self {
        Self::loopback()
    }
}

/// Errors of authentication: a bad secret source, a refused bind, or a failed
/// handshake with what failed and, where known, the peer.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(
        "the cluster secret from {origin} is {length} bytes long; at least {min} are required \
         (generate one with `openssl rand -hex 32`)"
    )]
    SecretTooShort {
        origin: String,
        length: usize,
        min: usize,
    },
    #[error("cannot read the cluster secret file {} (security.auth.secret-file): {source}", path.display())]
    SecretFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the cluster secret file {} (security.auth.secret-file) is readable by group or others \
         (mode {mode:03o}); restrict it with `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    SecretFileExposed { path: PathBuf, mode: u32 },
    #[error("cannot draw a handshake nonce from the operating system: {reason}")]
    Random { reason: String },
    #[error(
        "refusing to listen on {address} ({key}) without a cluster secret: anyone who can reach \
         that address could connect. Set security.auth.secret-file (or security.auth.secret, or \
         {SECRET_ENV}) to the same secret on every process of the cluster, or use a loopback \
         address"
    )]
    InsecureBind { address: SocketAddr, key: String },
    #[error("{plane}-plane handshake{} failed: {failure}", peer_suffix(peer.as_deref()))]
    Handshake {
        /// The peer, when the caller named it ([`SecurityError::at_peer`]).
        peer: Option<String>,
        plane: Plane,
        /// This side's role.
        role: Role,
        failure: HandshakeFailure,
    },
}

fn peer_suffix(peer: Option<&str>) -> String {
    peer.map_or_else(String::new, |p| format!(" with {p}"))
}

impl SecurityError {
    /// Names the peer of a failed handshake (the generic [`handshake`] does
    /// not know who is at the other end of its stream).
    pub fn at_peer(self, name: &str) -> Self {
        match self {
            SecurityError::Handshake {
                peer: None,
                plane,
                role,
                failure,
            } => SecurityError::Handshake {
                peer: Some(name.to_owned()),
                plane,
                role,
                failure,
            },
            other => other,
        }
    }

    /// What went wrong in a handshake; `None` for the other errors.
    pub fn failure(&self) -> Option<&HandshakeFailure> {
        match self {
            SecurityError::Handshake { failure, .. } => Some(failure),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_secret_file(dir: &Path, content: &[u8], mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("secret");
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn config_with(overrides: &[String]) -> crate::config::Config {
        crate::config::Config::from_overrides(overrides).unwrap()
    }

    #[test]
    fn a_secret_never_prints() {
        let secret = ClusterSecret::from_bytes(b"0123456789abcdef-top").unwrap();
        assert_eq!(format!("{secret}"), "<redacted>");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(
            format!(
                "{:?}",
                PeerAuth {
                    secret: Some(secret),
                    timeout: Duration::from_secs(1)
                }
            ),
            "PeerAuth { secret: Some(<redacted>), timeout: 1s }"
        );
    }

    #[test]
    fn a_short_secret_is_refused_naming_its_origin() {
        let err = ClusterSecret::from_bytes(b"short").unwrap_err();
        assert!(
            matches!(
                err,
                SecurityError::SecretTooShort {
                    length: 5,
                    min: 16,
                    ..
                }
            ),
            "{err}"
        );
        let config = config_with(&["security.auth.secret=tooshort".to_owned()]);
        let err = ClusterSecret::from_config(&config).unwrap_err();
        assert!(
            err.to_string().contains("security.auth.secret is 8 bytes"),
            "{err}"
        );
        assert!(!err.to_string().contains("tooshort"), "{err}");
    }

    #[test]
    fn the_secret_file_is_read_trimmed_and_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_secret_file(dir.path(), b"0123456789abcdef0123\n", 0o600);
        let config = config_with(&[format!("security.auth.secret-file={}", path.display())]);
        let secret = ClusterSecret::from_config(&config).unwrap().unwrap();
        assert_eq!(
            secret,
            ClusterSecret::from_bytes(b"0123456789abcdef0123").unwrap()
        );

        let path = write_secret_file(dir.path(), b"0123456789abcdef0123\n", 0o640);
        let err = ClusterSecret::from_config(&config).unwrap_err();
        assert!(
            matches!(err, SecurityError::SecretFileExposed { mode: 0o640, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        write_secret_file(dir.path(), b"\n", 0o600);
        let err = ClusterSecret::from_config(&config).unwrap_err();
        assert!(
            matches!(err, SecurityError::SecretTooShort { length: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("secret-file"), "{err}");

        let missing = dir.path().join("missing");
        let config = config_with(&[format!("security.auth.secret-file={}", missing.display())]);
        let err = ClusterSecret::from_config(&config).unwrap_err();
        assert!(matches!(err, SecurityError::SecretFileRead { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn the_environment_variable_is_the_last_source_and_may_not_be_empty() {
        assert!(ClusterSecret::from_env(None).unwrap().is_none());
        let secret = ClusterSecret::from_env(Some("0123456789abcdef!".into())).unwrap();
        assert_eq!(
            secret,
            Some(ClusterSecret::from_bytes(b"0123456789abcdef!").unwrap())
        );
        let err = ClusterSecret::from_env(Some("".into())).unwrap_err();
        assert!(err.to_string().contains(SECRET_ENV), "{err}");
    }

    #[test]
    fn the_inline_secret_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_secret_file(dir.path(), b"from-the-file-0123456", 0o600);
        let config = config_with(&[
            "security.auth.secret=from-the-config-0123".to_owned(),
            format!("security.auth.secret-file={}", path.display()),
        ]);
        let secret = ClusterSecret::from_config(&config).unwrap().unwrap();
        assert_eq!(
            secret,
            ClusterSecret::from_bytes(b"from-the-config-0123").unwrap()
        );
    }

    #[test]
    fn binding_beyond_loopback_needs_a_secret() {
        let secret = ClusterSecret::from_bytes(&[7; 32]).unwrap();
        let loopback: SocketAddr = "127.0.0.1:6121".parse().unwrap();
        let loopback6: SocketAddr = "[::1]:6121".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:6121".parse().unwrap();
        let lan: SocketAddr = "10.0.0.7:0".parse().unwrap();
        for address in [loopback, loopback6] {
            check_bind(&address, None, "taskmanager.host").unwrap();
        }
        for address in [any, lan] {
            check_bind(&address, Some(&secret), "taskmanager.host").unwrap();
            let err = check_bind(&address, None, "taskmanager.host").unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&address.to_string()) && text.contains("taskmanager.host"),
                "{text}"
            );
        }
    }
}
