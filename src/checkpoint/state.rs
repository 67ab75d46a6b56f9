//! One task's state in one checkpoint, as the bytes of its state file.
//!
//! Layout (little-endian): magic `STRATAST`, format version `u32`, entry
//! count `u32`, then per entry: kind `u8` (0 source offset, 1 operator),
//! operator index `u32` (the operator's position in the job file), length
//! `u64`, bytes; and a trailing CRC-32C over everything before it.

use std::path::Path;

use super::CheckpointError;

const MAGIC: &[u8; 8] = b"STRATAST";
const VERSION: u32 = 1;
const KIND_SOURCE: u8 = 0;
const KIND_OPERATOR: u8 = 1;

/// The state one task acknowledges for one checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskState {
    /// The source's offset (source tasks only) and its operator index.
    pub source: Option<(usize, Vec<u8>)>,
    /// Stateful operators' snapshots by operator index.
    pub operators: Vec<(usize, Vec<u8>)>,
}

impl TaskState {
    /// The state of operator `index`, if the checkpoint holds one.
    pub fn operator(&self, index: usize) -> Option<&[u8]> {
        self.operators
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, b)| b.as_slice())
    }

    pub fn encode(&self) -> Vec<u8> {
        let entries = self
            .source
            .iter()
            .map(|(i, b)| (KIND_SOURCE, *i, b))
            .chain(self.operators.iter().map(|(i, b)| (KIND_OPERATOR, *i, b)));
        let size: usize = 16 + 4 + self.source.iter().map(|(_, b)| 13 + b.len()).sum::<usize>();
        let size = size
            + self
                .operators
                .iter()
                .map(|(_, b)| 13 + b.len())
                .sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let count = u32::from(self.source.is_some()) + self.operators.len() as u32;
        out.extend_from_slice(&count.to_le_bytes());
        for (kind, index, bytes) in entries {
            out.push(kind);
            out.extend_from_slice(&(index as u32).to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a state file's bytes; `path` names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, CheckpointError> {
        let corrupt = |detail: String| CheckpointError::Corrupt {
            path: path.to_owned(),
            detail,
        };
        if bytes.len() < MAGIC.len() + 12 {
            return Err(corrupt(format!("{} bytes is too short", bytes.len())));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(trailer.try_into().expect("4 bytes"));
        let actual = crc32c::crc32c(body);
        if stored != actual {
            return Err(corrupt(format!(
                "CRC-32C mismatch (stored {stored:08x}, computed {actual:08x})"
            )));
        }
        if &body[..8] != MAGIC {
            return Err(corrupt("not a strata task state file (bad magic)".into()));
        }
        let mut r = Reader { bytes: body, at: 8 };
        let version = r.u32().ok_or_else(|| corrupt("truncated header".into()))?;
        if version != VERSION {
            return Err(corrupt(format!(
                "format version {version}, this build reads {VERSION}"
            )));
        }
        let count = r.u32().ok_or_else(|| corrupt("truncated header".into()))?;
        let mut state = TaskState::default();
        for entry in 0..count {
            let truncated = || corrupt(format!("entry {entry} is truncated"));
            let kind = r.u8().ok_or_else(truncated)?;
            let index = r.u32().ok_or_else(truncated)? as usize;
            let len = r.u64().ok_or_else(truncated)?;
            let data = r.take(len).ok_or_else(truncated)?.to_vec();
            match kind {
                KIND_SOURCE if state.source.is_none() => state.source = Some((index, data)),
                KIND_OPERATOR => state.operators.push((index, data)),
                _ => return Err(corrupt(format!("entry {entry} has unknown kind {kind}"))),
            }
        }
        if r.at != body.len() {
            return Err(corrupt(format!(
                "{} bytes after the last entry",
                body.len() - r.at
            )));
        }
        Ok(state)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> TaskState {
        TaskState {
            source: Some((0, b"{\"offset\":7}".to_vec())),
            operators: vec![(3, vec![1, 2, 3]), (5, Vec::new())],
        }
    }

    #[test]
    fn task_state_round_trips() {
        let s = sample();
        let bytes = s.encode();
        assert_eq!(TaskState::decode(&bytes, Path::new("x")).unwrap(), s);
        assert_eq!(s.operator(3), Some(&[1u8, 2, 3][..]));
        assert_eq!(s.operator(4), None);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_reported_as_corrupt_naming_the_file() {
        let bytes = sample().encode();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let err = TaskState::decode(&b, Path::new("chk-3/1-0.state")).unwrap_err();
            assert!(err.to_string().contains("chk-3/1-0.state"), "{err}");
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = TaskState::decode(&bytes, Path::new("x"));
        }

        #[test]
        fn truncated_state_is_an_error(cut in 0usize..40) {
            let bytes = sample().encode();
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(TaskState::decode(&bytes[..cut], Path::new("x")).is_err());
        }
    }
}
