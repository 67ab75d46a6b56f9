//! The spill block codec: a 32-byte header, the payload, zero padding to the
//! next multiple of 4096 (so every block is a valid O_DIRECT transfer).
//!
//! ```text
//! offset  size  field (little-endian)
//!      0     4  magic "STSB"
//!      4     2  version (1)
//!      6     2  flags (0)
//!      8     4  block length: header + payload + padding, a multiple of 4096
//!     12     4  payload length
//!     16     8  block index within its file
//!     24     4  crc32c of the payload
//!     28     4  crc32c of bytes 0..28
//! ```
//!
//! The header checksum means a flipped bit in a length can never make the
//! reader trust a wrong length; the payload checksum covers the data.

use super::DIRECT_IO_ALIGN;

pub const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"STSB");
pub const BLOCK_VERSION: u16 = 1;
pub const BLOCK_HEADER_BYTES: usize = 32;

const _: () = assert!(DIRECT_IO_ALIGN.is_multiple_of(BLOCK_HEADER_BYTES));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    pub block_len: u32,
    pub payload_len: u32,
    pub block_index: u64,
    pub payload_crc: u32,
}

/// Which part of a block failed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockField {
    Magic,
    Version,
    HeaderChecksum,
    /// Block length inconsistent with the payload length or the file's index.
    Length,
    /// Block index differs from its position in the file.
    Index,
    PayloadChecksum,
    /// The file ended inside the block (`found` is the bytes read).
    Truncated,
}

/// A verification failure: the field, the value it should have had, and the
/// value found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMismatch {
    pub field: BlockField,
    pub expected: u64,
    pub found: u64,
}

impl BlockMismatch {
    pub fn check(field: BlockField, expected: u64, found: u64) -> Result<(), Self> {
        if expected == found {
            Ok(())
        } else {
            Err(Self {
                field,
                expected,
                found,
            })
        }
    }
}

/// Bytes on disk for a block carrying `payload_len` bytes.
pub fn block_len_for(payload_len: usize) -> usize {
    (BLOCK_HEADER_BYTES + payload_len).next_multiple_of(DIRECT_IO_ALIGN)
}

impl BlockHeader {
    pub fn new(block_index: u64, payload: &[u8]) -> Self {
        let payload_len = u32::try_from(payload.len()).expect("payload fits u32");
        Self {
            block_len: u32::try_from(block_len_for(payload.len())).expect("block fits u32"),
            payload_len,
            block_index,
            payload_crc: crc32c::crc32c(payload),
        }
    }

    pub fn encode(&self) -> [u8; BLOCK_HEADER_BYTES] {
        let mut out = [0u8; BLOCK_HEADER_BYTES];
        out[0..4].copy_from_slice(&BLOCK_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&BLOCK_VERSION.to_le_bytes());
        out[8..12].copy_from_slice(&self.block_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.block_index.to_le_bytes());
        out[24..28].copy_from_slice(&self.payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&out[0..28]);
        out[28..32].copy_from_slice(&header_crc.to_le_bytes());
        out
    }

    /// Decodes and verifies everything the header alone can prove.
    pub fn decode(bytes: &[u8; BLOCK_HEADER_BYTES]) -> Result<Self, BlockMismatch> {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let header_crc = crc32c::crc32c(&bytes[0..28]);
        BlockMismatch::check(
            BlockField::HeaderChecksum,
            u64::from(u32_at(28)),
            u64::from(header_crc),
        )?;
        BlockMismatch::check(
            BlockField::Magic,
            u64::from(BLOCK_MAGIC),
            u64::from(u32_at(0)),
        )?;
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        BlockMismatch::check(
            BlockField::Version,
            u64::from(BLOCK_VERSION),
            u64::from(version),
        )?;
        let header = Self {
            block_len: u32_at(8),
            payload_len: u32_at(12),
            block_index: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            payload_crc: u32_at(24),
        };
        let expected_len = block_len_for(header.payload_len as usize) as u64;
        BlockMismatch::check(
            BlockField::Length,
            expected_len,
            u64::from(header.block_len),
        )?;
        Ok(header)
    }

    /// Verifies a payload against this header.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<(), BlockMismatch> {
        let found = crc32c::crc32c(payload);
        BlockMismatch::check(
            BlockField::PayloadChecksum,
            u64::from(self.payload_crc),
            u64::from(found),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(payload_len: u32, block_index: u64, payload_crc: u32) -> BlockHeader {
        BlockHeader {
            block_len: block_len_for(payload_len as usize) as u32,
            payload_len,
            block_index,
            payload_crc,
        }
    }

    proptest! {
        #[test]
        fn header_round_trips(payload_len in 0u32..(64 << 20), index: u64, crc: u32) {
            let h = header(payload_len, index, crc);
            prop_assert_eq!(BlockHeader::decode(&h.encode()), Ok(h));
            prop_assert_eq!(h.block_len as usize % DIRECT_IO_ALIGN, 0);
        }

        #[test]
        fn any_flipped_header_bit_is_detected(
            payload_len in 0u32..(64 << 20),
            index: u64,
            crc: u32,
            bit in 0usize..BLOCK_HEADER_BYTES * 8,
        ) {
            let mut bytes = header(payload_len, index, crc).encode();
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(BlockHeader::decode(&bytes).is_err());
        }

        #[test]
        fn payload_checksum_matches_only_its_payload(
            payload in proptest::collection::vec(any::<u8>(), 1..4096),
            bit in 0usize..8,
        ) {
            let h = BlockHeader::new(0, &payload);
            prop_assert!(h.verify_payload(&payload).is_ok());
            let mut flipped = payload.clone();
            let at = flipped.len() / 2;
            flipped[at] ^= 1 << bit;
            let err = h.verify_payload(&flipped).unwrap_err();
            prop_assert_eq!(err.field, BlockField::PayloadChecksum);
        }
    }

    #[test]
    fn block_len_pads_to_direct_io_alignment() {
        assert_eq!(block_len_for(0), 4096);
        assert_eq!(block_len_for(4096 - 32), 4096);
        assert_eq!(block_len_for(4096 - 31), 8192);
        assert_eq!(block_len_for((1 << 20) - 32), 1 << 20);
    }
}
