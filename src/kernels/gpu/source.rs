//! The CUDA sources the dispatcher compiles, and the on-disk PTX cache.
//!
//! The `.cu` files in `kernels/` are embedded in the binary, so a deployed
//! TaskManager needs no source tree; their `#include "x.cuh"` lines are
//! expanded here (each header once, like `#pragma once`) so that NVRTC gets
//! one self-contained translation unit and no include path. Compiled PTX is
//! cached on disk under a key that changes with anything that changes the
//! PTX: the expanded source, the target architecture and the NVRTC version.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::kernels::cpu::hash::{combine, hash_bytes};

/// One compilation unit of `kernels/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSource {
    /// The file stem: `filter` for `kernels/filter.cu`.
    pub stem: &'static str,
    pub text: &'static str,
}

/// The units the dispatcher launches from.
pub const SOURCES: [KernelSource; 6] = [
    KernelSource {
        stem: "filter",
        text: include_str!("../../../kernels/filter.cu"),
    },
    KernelSource {
        stem: "project",
        text: include_str!("../../../kernels/project.cu"),
    },
    KernelSource {
        stem: "hash",
        text: include_str!("../../../kernels/hash.cu"),
    },
    KernelSource {
        stem: "partition",
        text: include_str!("../../../kernels/partition.cu"),
    },
    KernelSource {
        stem: "standardize",
        text: include_str!("../../../kernels/standardize.cu"),
    },
    KernelSource {
        stem: "aggregate",
        text: include_str!("../../../kernels/aggregate.cu"),
    },
];

const HEADERS: [(&str, &str); 2] = [
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("hash.cuh", include_str!("../../../kernels/hash.cuh")),
];

/// Errors of source expansion and the PTX cache.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kernels/{stem}: #include \"{header}\" names no embedded header")]
    UnknownHeader { stem: &'static str, header: String },
    #[error("PTX cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `source` with every `#include "…"` of an embedded header replaced by the
/// header's text, each header at most once.
pub fn expand_includes(source: KernelSource) -> Result<String, SourceError> {
    let mut out = String::with_capacity(source.text.len() * 2);
    let mut included = BTreeSet::new();
    expand_into(source.stem, source.text, &mut included, &mut out)?;
    Ok(out)
}

fn expand_into(
    stem: &'static str,
    text: &str,
    included: &mut BTreeSet<&'static str>,
    out: &mut String,
) -> Result<(), SourceError> {
    for line in text.lines() {
        let Some(header) = included_header(line) else {
            if line.trim() != "#pragma once" {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        };
        let (name, body) = HEADERS
            .iter()
            .find(|(name, _)| *name == header)
            .ok_or_else(|| SourceError::UnknownHeader {
                stem,
                header: header.to_owned(),
            })?;
        if included.insert(name) {
            expand_into(stem, body, included, out)?;
        }
    }
    Ok(())
}

/// The header of a `#include "name"` line.
fn included_header(line: &str) -> Option<&str> {
    let rest = line.trim().strip_prefix("#include")?.trim();
    rest.strip_prefix('"')?.strip_suffix('"')
}

/// What a cached PTX depends on.
#[derive(Clone, Copy, Debug)]
pub struct CacheKey<'a> {
    pub expanded_source: &'a str,
    /// NVRTC's virtual architecture, e.g. `compute_90`.
    pub arch: &'a str,
    /// `major.minor` of the NVRTC library that compiles.
    pub nvrtc_version: &'a str,
}

impl CacheKey<'_> {
    /// The stable hash of the key's parts (the key hash of `kernels::cpu::hash`).
    pub fn digest(&self) -> u64 {
        [self.arch, self.nvrtc_version]
            .iter()
            .fold(hash_bytes(self.expanded_source.as_bytes()), |h, part| {
                combine(h, hash_bytes(part.as_bytes()))
            })
    }
}

/// Compiled PTX on disk, one file per (stem, key).
#[derive(Clone, Debug)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// `$STRATA_KERNEL_CACHE`, else `strata-kernel-cache` in the temp dir.
    pub fn default_dir() -> PathBuf {
        std::env::var_os("STRATA_KERNEL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("strata-kernel-cache"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, stem: &str, key: CacheKey<'_>) -> PathBuf {
        self.dir
            .join(format!("{stem}-{}-{:016x}.ptx", key.arch, key.digest()))
    }

    /// The cached PTX for `key`, or `compile`'s, which is then stored. A
    /// cache that cannot be written is not an error: the PTX is still used.
    pub fn get_or_compile<E>(
        &self,
        stem: &str,
        key: CacheKey<'_>,
        compile: impl FnOnce() -> Result<String, E>,
    ) -> Result<(String, CacheOutcome), E> {
        let path = self.path_of(stem, key);
        if let Ok(ptx) = std::fs::read_to_string(&path) {
            return Ok((ptx, CacheOutcome::Hit));
        }
        let ptx = compile()?;
        match self.store(&path, &ptx) {
            Ok(()) => Ok((ptx, CacheOutcome::Stored)),
            Err(e) => {
                tracing::warn!("{e}; the kernel will be compiled again next time");
                Ok((ptx, CacheOutcome::Uncached))
            }
        }
    }

    /// Writes through a temporary file and a rename, so that a concurrent
    /// reader never sees half a PTX.
    fn store(&self, path: &Path, ptx: &str) -> Result<(), SourceError> {
        let cache_error = |source| SourceError::Cache {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(cache_error)?;
        let partial = path.with_extension(format!("ptx.{}.partial", std::process::id()));
        std::fs::write(&partial, ptx).map_err(cache_error)?;
        std::fs::rename(&partial, path).map_err(cache_error)
    }
}

/// Where a module's PTX came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Stored,
    Uncached,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expanded_sources_include_each_header_once_and_keep_every_entry() {
        for source in SOURCES {
            let text = expand_includes(source).unwrap();
            assert!(!text.contains("#include \""), "{}", source.stem);
            assert_eq!(text.matches("STRATA_DEVICE bool is_valid").count(), 1);
            assert!(text.contains("extern \"C\" __global__"));
        }
    }

    #[test]
    fn cache_key_changes_with_source_arch_and_nvrtc_version() {
        let base = CacheKey {
            expanded_source: "a",
            arch: "compute_90",
            nvrtc_version: "12.9",
        };
        let digests = [
            base.digest(),
            CacheKey {
                expanded_source: "b",
                ..base
            }
            .digest(),
            CacheKey {
                arch: "compute_80",
                ..base
            }
            .digest(),
            CacheKey {
                nvrtc_version: "12.8",
                ..base
            }
            .digest(),
        ];
        let distinct: BTreeSet<u64> = digests.into_iter().collect();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn second_lookup_hits_the_cache_without_compiling() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("ptx"));
        let key = CacheKey {
            expanded_source: "src",
            arch: "compute_90",
            nvrtc_version: "12.9",
        };
        let (ptx, outcome) = cache
            .get_or_compile::<()>("filter", key, || Ok("ptx".into()))
            .unwrap();
        assert_eq!((ptx.as_str(), outcome), ("ptx", CacheOutcome::Stored));
        let (ptx, outcome) = cache
            .get_or_compile::<()>("filter", key, || panic!("compiled twice"))
            .unwrap();
        assert_eq!((ptx.as_str(), outcome), ("ptx", CacheOutcome::Hit));
    }
}
