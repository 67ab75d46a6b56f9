//! The framing that every stateful operator's checkpoint snapshot shares.
//!
//! Layout (little-endian): an 8-byte magic naming the operator kind, the
//! format version (`u32`), the operator's body, and a CRC-32C (`u32`) over
//! everything before it. Bodies are written with [`SnapshotWriter`] and
//! parsed with [`SnapshotReader`].
//!
//! Invariants: the CRC is checked before any of the body is looked at, and
//! every read after it is bounds-checked, so corrupt or truncated bytes are
//! an [`ExecError::State`] naming the operator — never a panic, and never an
//! allocation sized by a count that the bytes do not back.
//!
//! Limits: a snapshot is one heap `Vec` outside the slot's managed memory
//! (the checkpoint writes it out whole), so an operator's state is held
//! twice, once in managed memory or spill files and once here, while a
//! snapshot is taken or restored.

use super::ExecError;

/// The version every body is written in; a reader accepts only this one.
/// Bump it on any change of a body's layout or of what its bytes mean (the
/// aggregation stores key hashes, so a change of the key hash bumps it too).
pub(crate) const VERSION: u32 = 1;
const HEADER_BYTES: usize = 8 + 4;
const CRC_BYTES: usize = 4;

/// Builds one snapshot: header first, CRC at [`SnapshotWriter::finish`].
pub(crate) struct SnapshotWriter {
    bytes: Vec<u8>,
}

impl SnapshotWriter {
    /// `capacity_bytes` is a hint: what the operator expects to write.
    pub(crate) fn new(magic: &[u8; 8], capacity_bytes: usize) -> Self {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + capacity_bytes + CRC_BYTES);
        bytes.extend_from_slice(magic);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        Self { bytes }
    }

    pub(crate) fn bool(&mut self, v: bool) {
        self.bytes.push(u8::from(v));
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn i64(&mut self, v: i64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    /// Bytes as they are; the reader must know their length.
    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// Bytes behind their `u64` length.
    pub(crate) fn blob(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.raw(bytes);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let crc = crc32c::crc32c(&self.bytes);
        self.bytes.extend_from_slice(&crc.to_le_bytes());
        self.bytes
    }
}

/// Parses one snapshot's body; every read fails cleanly past the end.
pub(crate) struct SnapshotReader<'a> {
    operator: String,
    body: &'a [u8],
    at: usize,
}

impl<'a> SnapshotReader<'a> {
    /// Checks length, CRC, magic and version, in that order.
    pub(crate) fn open(
        operator: &str,
        magic: &[u8; 8],
        bytes: &'a [u8],
    ) -> Result<Self, ExecError> {
        let operator = operator.to_owned();
        if bytes.len() < HEADER_BYTES + CRC_BYTES {
            return Err(state_error(
                &operator,
                format!("{} bytes is too short for a snapshot", bytes.len()),
            ));
        }
        let (framed, trailer) = bytes.split_at(bytes.len() - CRC_BYTES);
        let stored = u32::from_le_bytes(trailer.try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(framed);
        if stored != computed {
            return Err(state_error(
                &operator,
                format!(
                    "CRC-32C mismatch over {} bytes (stored {stored:08x}, computed {computed:08x})",
                    framed.len()
                ),
            ));
        }
        if &framed[..8] != magic {
            return Err(state_error(
                &operator,
                format!(
                    "expected a '{}' snapshot, found magic {:02x?}",
                    String::from_utf8_lossy(magic),
                    &framed[..8]
                ),
            ));
        }
        let version = u32::from_le_bytes(framed[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(state_error(
                &operator,
                format!("snapshot format version {version}; this build reads version {VERSION}"),
            ));
        }
        Ok(Self {
            operator,
            body: &framed[HEADER_BYTES..],
            at: 0,
        })
    }

    pub(crate) fn remaining_bytes(&self) -> usize {
        self.body.len() - self.at
    }

    /// The next `len` bytes.
    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], ExecError> {
        if len > self.remaining_bytes() {
            return Err(self.corrupt(format!(
                "truncated: {len} bytes wanted at body offset {}, {} left",
                self.at,
                self.remaining_bytes()
            )));
        }
        let bytes = &self.body[self.at..self.at + len];
        self.at += len;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ExecError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ExecError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn bool(&mut self) -> Result<bool, ExecError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.corrupt(format!("flag byte {other} is neither 0 nor 1"))),
        }
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ExecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ExecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, ExecError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// A `u64` count of items that take at least `item_bytes_min` bytes
    /// each (at least 1 is assumed): a count the remaining bytes cannot
    /// hold is corrupt, so callers may size allocations by it.
    pub(crate) fn count(&mut self, item_bytes_min: usize) -> Result<usize, ExecError> {
        let count = self.u64()?;
        let bytes_min = count.saturating_mul(item_bytes_min.max(1) as u64);
        if bytes_min > self.remaining_bytes() as u64 {
            return Err(self.corrupt(format!(
                "a count of {count} items needs at least {bytes_min} bytes, {} left",
                self.remaining_bytes()
            )));
        }
        Ok(count as usize)
    }

    /// Bytes written by [`SnapshotWriter::blob`].
    pub(crate) fn blob(&mut self) -> Result<&'a [u8], ExecError> {
        let len = self.count(1)?;
        self.take(len)
    }

    /// Checks that the body was read to its end.
    pub(crate) fn finish(self) -> Result<(), ExecError> {
        match self.remaining_bytes() {
            0 => Ok(()),
            left => Err(self.corrupt(format!("{left} bytes after the end of the state"))),
        }
    }

    /// The error for bytes that do not parse.
    pub(crate) fn corrupt(&self, detail: impl std::fmt::Display) -> ExecError {
        state_error(&self.operator, format!("corrupt: {detail}"))
    }
}

/// An error restoring `operator`'s checkpoint state.
pub(crate) fn state_error(operator: &str, detail: impl std::fmt::Display) -> ExecError {
    ExecError::State {
        operator: operator.to_owned(),
        detail: format!("checkpoint state: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAGIC: &[u8; 8] = b"STTEST01";

    fn sample() -> Vec<u8> {
        let mut w = SnapshotWriter::new(MAGIC, 64);
        w.raw(&[7]);
        w.bool(true);
        w.u32(0xDEAD_BEEF);
        w.u64(u64::MAX - 1);
        w.i64(-42);
        w.blob(b"payload");
        w.finish()
    }

    type Sample = (u8, bool, u32, u64, i64, Vec<u8>);

    /// Parses [`sample`]'s body.
    fn parse(bytes: &[u8]) -> Result<Sample, ExecError> {
        let mut r = SnapshotReader::open("op", MAGIC, bytes)?;
        let sample = (
            r.u8()?,
            r.bool()?,
            r.u32()?,
            r.u64()?,
            r.i64()?,
            r.blob()?.to_vec(),
        );
        r.finish()?;
        Ok(sample)
    }

    #[test]
    fn what_the_writer_writes_the_reader_reads() {
        let parsed = parse(&sample()).expect("round trip");
        assert_eq!(
            parsed,
            (7, true, 0xDEAD_BEEF, u64::MAX - 1, -42, b"payload".to_vec())
        );
    }

    #[test]
    fn another_magic_or_version_is_refused_by_name() {
        let bytes = sample();
        let err = SnapshotReader::open("op", b"STOTHER1", &bytes)
            .err()
            .expect("wrong magic");
        assert!(err.to_string().contains("'STOTHER1'"), "{err}");
        let mut w = SnapshotWriter::new(MAGIC, 0);
        w.bool(false);
        let mut bytes = w.finish();
        bytes[8] = 2;
        let crc_at = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..crc_at]);
        bytes[crc_at..].copy_from_slice(&crc.to_le_bytes());
        let err = SnapshotReader::open("op", MAGIC, &bytes)
            .err()
            .expect("wrong version");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn a_count_the_bytes_cannot_hold_is_corrupt() {
        let mut w = SnapshotWriter::new(MAGIC, 8);
        w.u64(1 << 40);
        let bytes = w.finish();
        let mut r = SnapshotReader::open("op", MAGIC, &bytes).expect("frame");
        let err = r.count(16).expect_err("too many");
        assert!(
            matches!(&err, ExecError::State { operator, .. } if operator == "op"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn flipped_or_truncated_snapshots_are_errors(at in 0usize..1000, bit in 0u8..8, cut in 0usize..1000) {
            let good = sample();
            let mut flipped = good.clone();
            let at = at % flipped.len();
            flipped[at] ^= 1 << bit;
            prop_assert!(parse(&flipped).is_err());
            let cut = cut % good.len();
            prop_assert!(parse(&good[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
        }
    }
}
