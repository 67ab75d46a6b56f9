//! The handshake: a pure exchange ([`Exchange`]: hello out, peer hello in,
//! proof out, peer proof in) driven by an async and a blocking shell.
//!
//! On the wire, both sides at once:
//!
//! ```text
//! hello = "STRATA" | version: u8 | plane: u8 | flags: u8 (bit 0: has a secret) | nonce: [u8; 32]
//! proof = HMAC-SHA256(secret, LABEL | prover role: u8 | plane: u8 | version: u8
//!                              | client nonce | server nonce)            (only when both have a secret)
//! ```
//!
//! Both sides send before they read, and both messages are far smaller than
//! a socket buffer, so neither side waits on the other to write. Each side
//! checks the peer's hello itself, so a mismatch is reported on both ends.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClusterSecret, Plane, Role, SecurityError};

/// Changes whenever the hello or the proof changes.
pub const PROTOCOL_VERSION: u8 = 1;
const MAGIC: &[u8; 6] = b"STRATA";
const NONCE_BYTES: usize = 32;
/// A hello: magic, version, plane, flags, nonce.
pub const HELLO_BYTES: usize = MAGIC.len() + 3 + NONCE_BYTES;
/// A proof: one HMAC-SHA256.
pub const PROOF_BYTES: usize = 32;
/// Domain separation: these MACs mean "strata handshake" and nothing else.
const LABEL: &[u8] = b"strata/handshake";
const FLAG_SECRET: u8 = 1;

type HmacSha256 = Hmac<Sha256>;

/// What went wrong in a handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("not complete within {timeout:?} (security.handshake.timeout)")]
    Timeout { timeout: Duration },
    #[error(
        "the peer closed the connection during the {stage} ({})",
        closed_hint(stage)
    )]
    Closed { stage: &'static str },
    #[error("connection failed during the {stage}: {source}")]
    Io {
        stage: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the peer did not open with the strata handshake (first bytes {found:02x?}): it is not a \
         strata process of this version, or not speaking this protocol"
    )]
    NotStrata { found: [u8; MAGIC.len()] },
    #[error(
        "handshake version mismatch: this side speaks {local}, the peer {remote}; run the same \
         strata version on every process"
    )]
    Version { local: u8, remote: u8 },
    #[error(
        "this is a {local}-plane endpoint but the peer speaks the {remote} plane: the address \
         points at the wrong port"
    )]
    PlaneMismatch { local: Plane, remote: Plane },
    #[error("malformed hello: {detail} {value:#04x}")]
    Malformed { detail: &'static str, value: u8 },
    #[error(
        "this side has a cluster secret but the peer has none: set the same \
         security.auth.secret-file (or security.auth.secret, or STRATA_AUTH_SECRET) on every \
         process of the cluster"
    )]
    PeerHasNoSecret,
    #[error(
        "the peer requires a cluster secret but none is set here: set security.auth.secret-file \
         (or security.auth.secret, or STRATA_AUTH_SECRET)"
    )]
    NoLocalSecret,
    #[error("the peer sent back this side's own nonce (a reflected handshake)")]
    Reflected,
    #[error("the peer's proof does not match: the two sides have different cluster secrets")]
    BadProof,
}

fn closed_hint(stage: &str) -> &'static str {
    if stage == "proof exchange" {
        "it probably refused this side's proof: different cluster secrets"
    } else {
        "it may be at its connection limit, or refused this side's hello"
    }
}

const HELLO: &str = "hello exchange";
const PROOF: &str = "proof exchange";

/// One side's state of a handshake, free of I/O.
struct Exchange<'a> {
    secret: Option<&'a ClusterSecret>,
    role: Role,
    plane: Plane,
    nonce: [u8; NONCE_BYTES],
    peer_nonce: [u8; NONCE_BYTES],
}

impl<'a> Exchange<'a> {
    fn new(
        secret: Option<&'a ClusterSecret>,
        role: Role,
        plane: Plane,
    ) -> Result<Self, SecurityError> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(|e| SecurityError::Random {
            reason: e.to_string(),
        })?;
        Ok(Self {
            secret,
            role,
            plane,
            nonce,
            peer_nonce: [0; NONCE_BYTES],
        })
    }

    fn hello(&self) -> [u8; HELLO_BYTES] {
        let mut hello = [0u8; HELLO_BYTES];
        let (magic, rest) = hello.split_at_mut(MAGIC.len());
        magic.copy_from_slice(MAGIC);
        rest[0] = PROTOCOL_VERSION;
        rest[1] = self.plane.wire();
        rest[2] = if self.secret.is_some() {
            FLAG_SECRET
        } else {
            0
        };
        rest[3..].copy_from_slice(&self.nonce);
        hello
    }

    /// Checked as soon as it arrives, so a peer speaking something else
    /// (HTTP, an older strata's frames) fails at once.
    fn check_magic(start: &[u8; MAGIC.len()]) -> Result<(), HandshakeFailure> {
        if start != MAGIC {
            return Err(HandshakeFailure::NotStrata { found: *start });
        }
        Ok(())
    }

    /// Takes the peer's hello; returns this side's proof when both sides
    /// have a secret (`None`: the handshake is complete).
    fn on_hello(
        &mut self,
        hello: &[u8; HELLO_BYTES],
    ) -> Result<Option<[u8; PROOF_BYTES]>, HandshakeFailure> {
        let (magic, rest) = hello.split_at(MAGIC.len());
        Self::check_magic(magic.try_into().expect("the hello starts with the magic"))?;
        let (version, plane, flags) = (rest[0], rest[1], rest[2]);
        if version != PROTOCOL_VERSION {
            return Err(HandshakeFailure::Version {
                local: PROTOCOL_VERSION,
                remote: version,
            });
        }
        let remote = Plane::from_wire(plane).ok_or(HandshakeFailure::Malformed {
            detail: "unknown plane",
            value: plane,
        })?;
        if remote != self.plane {
            return Err(HandshakeFailure::PlaneMismatch {
                local: self.plane,
                remote,
            });
        }
        if flags & !FLAG_SECRET != 0 {
            return Err(HandshakeFailure::Malformed {
                detail: "unknown flags",
                value: flags,
            });
        }
        self.peer_nonce.copy_from_slice(&rest[3..]);
        if self.peer_nonce == self.nonce {
            return Err(HandshakeFailure::Reflected);
        }
        let peer_has_secret = flags & FLAG_SECRET != 0;
        match (self.secret, peer_has_secret) {
            (None, false) => Ok(None),
            (Some(_), false) => Err(HandshakeFailure::PeerHasNoSecret),
            (None, true) => Err(HandshakeFailure::NoLocalSecret),
            (Some(secret), true) => {
                let proof = self.mac(secret, self.role).finalize().into_bytes();
                Ok(Some(proof.into()))
            }
        }
    }

    /// Checks the peer's proof, in constant time.
    fn verify(&self, proof: &[u8; PROOF_BYTES]) -> Result<(), HandshakeFailure> {
        let secret = self
            .secret
            .expect("a proof is exchanged only when this side has a secret");
        self.mac(secret, self.role.peer())
            .verify_slice(proof)
            .map_err(|_| HandshakeFailure::BadProof)
    }

    /// The MAC a `prover` sends: its role is in the input, so a server's
    /// proof reflected back never passes as a client's.
    fn mac(&self, secret: &ClusterSecret, prover: Role) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(secret.key()).expect("HMAC takes a key of any length");
        let (client, server) = match self.role {
            Role::Client => (&self.nonce, &self.peer_nonce),
            Role::Server => (&self.peer_nonce, &self.nonce),
        };
        mac.update(LABEL);
        mac.update(&[prover.wire(), self.plane.wire(), PROTOCOL_VERSION]);
        mac.update(client);
        mac.update(server);
        mac
    }

    fn failed(&self, failure: HandshakeFailure) -> SecurityError {
        SecurityError::Handshake {
            peer: None,
            plane: self.plane,
            role: self.role,
            failure,
        }
    }
}

/// An I/O error in `stage`: a peer that went away is `Closed`.
fn io_failure(stage: &'static str, source: std::io::Error) -> HandshakeFailure {
    match source.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => HandshakeFailure::Closed { stage },
        _ => HandshakeFailure::Io { stage, source },
    }
}

/// Mutual challenge-response on a fresh connection, before any other byte.
/// Both sides send a hello (magic `STRATA`, version, plane, whether a secret
/// is set, a 32-byte random nonce); with a secret each side proves it with
/// HMAC-SHA256(secret, label ‖ role ‖ plane ‖ version ‖ client nonce ‖
/// server nonce), verified in constant time. A mismatch of plane, version or
/// secret presence is an error naming it, on both sides. Without a secret on
/// either side the hellos are still exchanged, so a secret-less peer meeting
/// one with a secret fails clearly. Every read has a fixed size, and the
/// whole handshake must finish within `timeout`.
///
/// The error does not name the peer (the stream may be anything): callers
/// add it with [`SecurityError::at_peer`].
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: Option<&ClusterSecret>,
    role: Role,
    plane: Plane,
    timeout: Duration,
) -> Result<(), SecurityError> {
    let mut exchange = Exchange::new(secret, role, plane)?;
    match tokio::time::timeout(timeout, exchange_async(stream, &mut exchange)).await {
        Ok(result) => result.map_err(|failure| exchange.failed(failure)),
        Err(_) => Err(exchange.failed(HandshakeFailure::Timeout { timeout })),
    }
}

async fn exchange_async<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    exchange: &mut Exchange<'_>,
) -> Result<(), HandshakeFailure> {
    let hello_failed = |e| io_failure(HELLO, e);
    stream
        .write_all(&exchange.hello())
        .await
        .map_err(hello_failed)?;
    stream.flush().await.map_err(hello_failed)?;
    let mut hello = [0u8; HELLO_BYTES];
    let (magic, _) = hello.split_at_mut(MAGIC.len());
    stream.read_exact(magic).await.map_err(hello_failed)?;
    Exchange::check_magic(&hello[..MAGIC.len()].try_into().expect("the magic's length"))?;
    stream
        .read_exact(&mut hello[MAGIC.len()..])
        .await
        .map_err(hello_failed)?;
    let Some(proof) = exchange.on_hello(&hello)? else {
        return Ok(());
    };
    let proof_failed = |e| io_failure(PROOF, e);
    stream.write_all(&proof).await.map_err(proof_failed)?;
    stream.flush().await.map_err(proof_failed)?;
    let mut peer_proof = [0u8; PROOF_BYTES];
    stream
        .read_exact(&mut peer_proof)
        .await
        .map_err(proof_failed)?;
    exchange.verify(&peer_proof)
}

/// [`handshake`] over a blocking std stream (it must be in blocking mode,
/// std's default). It sets the socket's read and write timeouts to what is
/// left of `timeout` before each call, and restores the previous ones. The
/// error names the peer's address.
pub fn handshake_blocking(
    stream: &mut TcpStream,
    secret: Option<&ClusterSecret>,
    role: Role,
    plane: Plane,
    timeout: Duration,
) -> Result<(), SecurityError> {
    let mut exchange = Exchange::new(secret, role, plane)?;
    let saved = (stream.read_timeout(), stream.write_timeout());
    let mut io = Deadline {
        stream,
        deadline: Instant::now() + timeout,
        timeout,
    };
    let result = exchange_blocking(&mut io, &mut exchange);
    let stream = io.stream;
    let restored = match saved {
        (Ok(read), Ok(write)) => stream
            .set_read_timeout(read)
            .and_then(|()| stream.set_write_timeout(write)),
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let peer = stream.peer_addr().map(|a| a.to_string());
    let named = |e: SecurityError| match &peer {
        Ok(peer) => e.at_peer(peer),
        Err(_) => e,
    };
    result.map_err(|failure| named(exchange.failed(failure)))?;
    restored.map_err(|source| {
        named(exchange.failed(HandshakeFailure::Io {
            stage: "restoring the socket's timeouts",
            source,
        }))
    })
}

/// A blocking stream whose every call ends by one deadline.
struct Deadline<'s> {
    stream: &'s mut TcpStream,
    deadline: Instant,
    timeout: Duration,
}

impl Deadline<'_> {
    /// What is left of the timeout; a timeout failure once it is spent.
    fn remaining(&self) -> Result<Duration, HandshakeFailure> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeFailure::Timeout {
                timeout: self.timeout,
            });
        }
        Ok(left)
    }

    fn write_all(&mut self, mut bytes: &[u8], stage: &'static str) -> Result<(), HandshakeFailure> {
        while !bytes.is_empty() {
            let left = self.remaining()?;
            self.stream
                .set_write_timeout(Some(left))
                .map_err(|e| io_failure(stage, e))?;
            match self.stream.write(bytes) {
                Ok(0) => return Err(HandshakeFailure::Closed { stage }),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(io_failure(stage, e)),
            }
        }
        Ok(())
    }

    fn read_exact(&mut self, buf: &mut [u8], stage: &'static str) -> Result<(), HandshakeFailure> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = self.remaining()?;
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| io_failure(stage, e))?;
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) => return Err(HandshakeFailure::Closed { stage }),
                Ok(n) => filled += n,
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(io_failure(stage, e)),
            }
        }
        Ok(())
    }
}

/// A timed-out socket call (`WouldBlock` on Unix) or a signal: the deadline
/// decides whether to go on.
fn retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

fn exchange_blocking(
    io: &mut Deadline<'_>,
    exchange: &mut Exchange<'_>,
) -> Result<(), HandshakeFailure> {
    io.write_all(&exchange.hello(), HELLO)?;
    let mut hello = [0u8; HELLO_BYTES];
    io.read_exact(&mut hello[..MAGIC.len()], HELLO)?;
    Exchange::check_magic(&hello[..MAGIC.len()].try_into().expect("the magic's length"))?;
    io.read_exact(&mut hello[MAGIC.len()..], HELLO)?;
    let Some(proof) = exchange.on_hello(&hello)? else {
        return Ok(());
    };
    io.write_all(&proof, PROOF)?;
    let mut peer_proof = [0u8; PROOF_BYTES];
    io.read_exact(&mut peer_proof, PROOF)?;
    exchange.verify(&peer_proof)
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;

    use super::*;

    const LONG: Duration = Duration::from_secs(30);

    fn secret(fill: u8) -> ClusterSecret {
        ClusterSecret::from_bytes(&[fill; 32]).unwrap()
    }

    /// Runs a client and a server handshake against each other.
    async fn pair(
        client: (Option<&ClusterSecret>, Plane),
        server: (Option<&ClusterSecret>, Plane),
    ) -> (Result<(), SecurityError>, Result<(), SecurityError>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::join!(
            handshake(&mut a, client.0, Role::Client, client.1, LONG),
            handshake(&mut b, server.0, Role::Server, server.1, LONG),
        )
    }

    fn failure(result: Result<(), SecurityError>) -> HandshakeFailure {
        match result {
            Err(SecurityError::Handshake { failure, .. }) => failure,
            other => panic!("expected a handshake failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn both_sides_agree_with_the_same_secret_or_with_none() {
        let s = secret(1);
        let (client, server) = pair((Some(&s), Plane::Data), (Some(&s), Plane::Data)).await;
        client.unwrap();
        server.unwrap();
        let (client, server) = pair((None, Plane::Control), (None, Plane::Control)).await;
        client.unwrap();
        server.unwrap();
    }

    #[tokio::test]
    async fn a_wrong_secret_fails_on_both_sides() {
        let (a, b) = (secret(1), secret(2));
        let (client, server) = pair((Some(&a), Plane::Data), (Some(&b), Plane::Data)).await;
        assert!(matches!(failure(client), HandshakeFailure::BadProof));
        let server = failure(server);
        assert!(matches!(server, HandshakeFailure::BadProof));
        assert!(server.to_string().contains("different cluster secrets"));
    }

    #[tokio::test]
    async fn a_secret_meeting_no_secret_fails_clearly_on_both_sides() {
        let s = secret(1);
        let (client, server) = pair((None, Plane::Data), (Some(&s), Plane::Data)).await;
        assert!(matches!(failure(client), HandshakeFailure::NoLocalSecret));
        assert!(matches!(failure(server), HandshakeFailure::PeerHasNoSecret));
        let (client, server) = pair((Some(&s), Plane::Data), (None, Plane::Data)).await;
        let client = failure(client);
        assert!(matches!(client, HandshakeFailure::PeerHasNoSecret));
        assert!(client.to_string().contains("security.auth.secret-file"));
        assert!(matches!(failure(server), HandshakeFailure::NoLocalSecret));
    }

    #[tokio::test]
    async fn a_plane_mismatch_fails_naming_both_planes() {
        let s = secret(1);
        let (client, server) = pair((Some(&s), Plane::Control), (Some(&s), Plane::Data)).await;
        let client = failure(client);
        assert!(
            matches!(
                client,
                HandshakeFailure::PlaneMismatch {
                    local: Plane::Control,
                    remote: Plane::Data
                }
            ),
            "{client}"
        );
        assert!(matches!(
            failure(server),
            HandshakeFailure::PlaneMismatch { .. }
        ));
    }

    #[tokio::test]
    async fn garbage_fails_at_the_first_bytes_not_at_the_timeout() {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        // An HTTP client, or an older strata that opens with a frame; it
        // then waits for an answer that never comes.
        theirs.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let result = handshake(&mut ours, None, Role::Server, Plane::Data, LONG).await;
        let f = failure(result);
        assert!(
            matches!(f, HandshakeFailure::NotStrata { found } if &found == b"GET / "),
            "{f}"
        );
        drop(theirs);
    }

    #[tokio::test]
    async fn a_wrong_version_or_unknown_plane_is_refused() {
        for (at, value) in [(6, PROTOCOL_VERSION + 1), (7, 9), (8, 0x80)] {
            let (mut ours, mut theirs) = tokio::io::duplex(1024);
            let mut hello = Exchange::new(None, Role::Client, Plane::Data)
                .unwrap()
                .hello();
            hello[at] = value;
            theirs.write_all(&hello).await.unwrap();
            let f = failure(handshake(&mut ours, None, Role::Server, Plane::Data, LONG).await);
            let expected = match at {
                6 => matches!(f, HandshakeFailure::Version { remote, .. } if remote == value),
                _ => matches!(f, HandshakeFailure::Malformed { .. }),
            };
            assert!(expected, "byte {at} = {value}: {f}");
        }
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_fails_within_the_timeout() {
        let (mut ours, _silent) = tokio::io::duplex(1024);
        let timeout = Duration::from_millis(200);
        let result = handshake(
            &mut ours,
            Some(&secret(1)),
            Role::Client,
            Plane::Data,
            timeout,
        )
        .await;
        let f = failure(result);
        assert!(
            matches!(f, HandshakeFailure::Timeout { timeout: t } if t == timeout),
            "{f}"
        );
        assert!(f.to_string().contains("security.handshake.timeout"));
    }

    #[tokio::test]
    async fn a_peer_that_closes_is_reported_as_closed() {
        let (mut ours, theirs) = tokio::io::duplex(1024);
        drop(theirs);
        let f = failure(handshake(&mut ours, None, Role::Client, Plane::Data, LONG).await);
        assert!(matches!(f, HandshakeFailure::Closed { .. }), "{f}");
    }

    /// The attacker reads the server's hello and proof, then sends them back
    /// as its own.
    async fn reflect(attacker: &mut DuplexStream, echo_hello: bool) {
        let mut hello = [0u8; HELLO_BYTES];
        attacker.read_exact(&mut hello).await.unwrap();
        if echo_hello {
            // The server refuses at the hello: no proof follows.
            attacker.write_all(&hello).await.unwrap();
            return;
        } else {
            // A fresh nonce of its own, claiming a secret.
            let mut own = hello;
            own[MAGIC.len() + 3..].copy_from_slice(&[0x5a; NONCE_BYTES]);
            attacker.write_all(&own).await.unwrap();
        }
        let mut proof = [0u8; PROOF_BYTES];
        if attacker.read_exact(&mut proof).await.is_ok() {
            let _ = attacker.write_all(&proof).await;
        }
    }

    #[tokio::test]
    async fn a_reflected_proof_or_hello_is_refused() {
        let s = secret(1);
        for echo_hello in [false, true] {
            let (mut server_side, mut attacker) = tokio::io::duplex(1024);
            let (result, ()) = tokio::join!(
                handshake(&mut server_side, Some(&s), Role::Server, Plane::Data, LONG),
                reflect(&mut attacker, echo_hello),
            );
            let f = failure(result);
            let expected = if echo_hello {
                matches!(f, HandshakeFailure::Reflected)
            } else {
                // The server's own proof, sent back: the role byte in the
                // MAC input makes it the wrong proof for a client.
                matches!(f, HandshakeFailure::BadProof)
            };
            assert!(expected, "echo_hello={echo_hello}: {f}");
        }
    }

    #[test]
    fn the_proofs_of_the_two_roles_differ_for_the_same_nonces() {
        let s = secret(3);
        let mut client = Exchange::new(Some(&s), Role::Client, Plane::Data).unwrap();
        let mut server = Exchange::new(Some(&s), Role::Server, Plane::Data).unwrap();
        let client_proof = client.on_hello(&server.hello()).unwrap().unwrap();
        let server_proof = server.on_hello(&client.hello()).unwrap().unwrap();
        assert_ne!(client_proof, server_proof);
        server.verify(&client_proof).unwrap();
        client.verify(&server_proof).unwrap();
        assert!(server.verify(&server_proof).is_err());
    }

    #[test]
    fn the_blocking_handshake_agrees_with_the_async_one_and_restores_timeouts() {
        let s = secret(4);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_secret = s.clone();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(77)))
                .unwrap();
            let result = handshake_blocking(
                &mut stream,
                Some(&server_secret),
                Role::Server,
                Plane::Control,
                LONG,
            );
            (
                result,
                stream.read_timeout().unwrap(),
                stream.write_timeout().unwrap(),
            )
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime
            .block_on(async {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                handshake(&mut stream, Some(&s), Role::Client, Plane::Control, LONG).await
            })
            .unwrap();
        let (result, read, write) = server.join().unwrap();
        result.unwrap();
        assert_eq!(read, Some(Duration::from_secs(77)));
        assert_eq!(write, None);
    }

    #[test]
    fn a_silent_peer_fails_the_blocking_handshake_within_the_timeout_naming_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut stream = TcpStream::connect(addr).unwrap();
        let (_silent, _) = listener.accept().unwrap();
        let timeout = Duration::from_millis(200);
        let err = handshake_blocking(&mut stream, None, Role::Client, Plane::Control, timeout)
            .unwrap_err();
        assert!(
            matches!(err.failure(), Some(HandshakeFailure::Timeout { .. })),
            "{err}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
