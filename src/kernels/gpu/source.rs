//! The CUDA sources the dispatcher compiles, and the on-disk PTX cache.
//!
//! The `.cu` files in `kernels/` are embedded in the binary, so a deployed
//! TaskManager needs no source tree; their `#include "x.cuh"` lines are
//! expanded here (each header once, like `#pragma once`) so that NVRTC gets
//! one self-contained translation unit and no include path. Compiled PTX is
//! cached on disk under a key that changes with anything that changes the
//! PTX or whether the driver can load it: the expanded source, the target
//! architecture, the NVRTC version, the compile options and the driver
//! version. The cache directory must be private to the TaskManager's user,
//! and every entry carries its length and CRC-32.

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

/// A generated source (a fused chain's module) with the embedded headers it
/// includes expanded.
pub fn expand_generated(stem: &'static str, text: &str) -> Result<String, SourceError> {
    let mut out = String::with_capacity(text.len() * 2);
    let mut included = BTreeSet::new();
    expand_into(stem, text, &mut included, &mut out)?;
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
    /// The NVRTC options, joined by spaces.
    pub options: &'a str,
    /// The CUDA driver's version (`cuDriverGetVersion`), or `none` where
    /// there is no driver (a compile-only check).
    pub driver_version: &'a str,
}

impl CacheKey<'_> {
    /// The stable hash of the key's parts (the key hash of `kernels::cpu::hash`).
    pub fn digest(&self) -> u64 {
        [
            self.arch,
            self.nvrtc_version,
            self.options,
            self.driver_version,
        ]
        .iter()
        .fold(hash_bytes(self.expanded_source.as_bytes()), |h, part| {
            combine(h, hash_bytes(part.as_bytes()))
        })
    }
}

/// The first line of every cache entry: the format, and the length and
/// CRC-32 of the PTX after it, so that a truncated or altered entry is
/// recognised, deleted and compiled again.
const ENTRY_MAGIC: &str = "// strata-ptx v1";

/// Compiled PTX on disk, one file per (stem, key), in a directory only the
/// TaskManager's user can write to (created 0700): PTX found there runs in
/// the TaskManager's CUDA context, so a directory another user could write
/// to is not used at all.
#[derive(Clone, Debug)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// `$STRATA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/strata/kernels`, else
    /// `$HOME/.cache/strata/kernels`, else `strata-kernel-cache-<uid>` in
    /// the temp directory (used only if this user owns it and no one else
    /// can write to it).
    pub fn default_dir() -> PathBuf {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = var("STRATA_KERNEL_CACHE") {
            return PathBuf::from(dir);
        }
        if let Some(dir) = var("XDG_CACHE_HOME") {
            return PathBuf::from(dir).join("strata").join("kernels");
        }
        if let Some(home) = var("HOME") {
            return PathBuf::from(home)
                .join(".cache")
                .join("strata")
                .join("kernels");
        }
        let uid = current_uid().map_or_else(|| "unknown".to_owned(), |u| u.to_string());
        std::env::temp_dir().join(format!("strata-kernel-cache-{uid}"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, stem: &str, key: CacheKey<'_>) -> PathBuf {
        self.path_with(stem, key, "ptx")
    }

    fn path_with(&self, stem: &str, key: CacheKey<'_>, extension: &str) -> PathBuf {
        self.dir.join(format!(
            "{stem}-{}-{:016x}.{extension}",
            key.arch,
            key.digest()
        ))
    }

    /// The cached PTX for `key`, or `compile`'s, which is then stored. A
    /// cache that cannot be used (not creatable, not private to this user)
    /// is not an error: the PTX is compiled and used, and a warning says
    /// why it was not cached. A corrupt entry is deleted and recompiled.
    pub fn get_or_compile<E>(
        &self,
        stem: &str,
        key: CacheKey<'_>,
        compile: impl FnOnce() -> Result<String, E>,
    ) -> Result<(String, CacheOutcome), E> {
        let (bytes, outcome) =
            self.get_or_compile_bytes(stem, key, "ptx", || compile().map(String::into_bytes))?;
        Ok((String::from_utf8_lossy(&bytes).into_owned(), outcome))
    }

    /// As [`PtxCache::get_or_compile`] for a binary image (a cubin), in a
    /// file ending in `.extension`.
    pub fn get_or_compile_bytes<E>(
        &self,
        stem: &str,
        key: CacheKey<'_>,
        extension: &str,
        compile: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<(Vec<u8>, CacheOutcome), E> {
        let path = self.path_with(stem, key, extension);
        let usable = self.ensure_private_dir();
        let mut replaced = false;
        if usable.is_ok()
            && let Ok(bytes) = std::fs::read(&path)
        {
            match decode_entry(&bytes) {
                Some(ptx) => return Ok((ptx, CacheOutcome::Hit)),
                None => {
                    tracing::warn!(
                        "PTX cache entry {} is corrupt; deleting it and compiling again",
                        path.display()
                    );
                    let _ = std::fs::remove_file(&path);
                    replaced = true;
                }
            }
        }
        let ptx = compile()?;
        let stored = usable.and_then(|()| self.store(&path, &ptx));
        match stored {
            Ok(()) if replaced => Ok((ptx, CacheOutcome::Replaced)),
            Ok(()) => Ok((ptx, CacheOutcome::Stored)),
            Err(e) => {
                tracing::warn!("{e}; the kernel will be compiled again next time");
                Ok((ptx, CacheOutcome::Uncached))
            }
        }
    }

    /// Creates the cache directory (mode 0700) if needed and checks that it
    /// is a real directory owned by this user that no one else can write.
    fn ensure_private_dir(&self) -> Result<(), SourceError> {
        let cache_error = |source| SourceError::Cache {
            path: self.dir.clone(),
            source,
        };
        let refused = |why: String| SourceError::Cache {
            path: self.dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
            if !self.dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&self.dir)
                    .map_err(cache_error)?;
            }
            let meta = std::fs::symlink_metadata(&self.dir).map_err(cache_error)?;
            if !meta.is_dir() {
                return Err(refused(
                    "not a directory (a symbolic link is not followed)".into(),
                ));
            }
            if let Some(uid) = current_uid()
                && meta.uid() != uid
            {
                return Err(refused(format!(
                    "owned by uid {}, not by this process's uid {uid}: not used",
                    meta.uid()
                )));
            }
            // Others may read the PTX of open kernels, but whoever can
            // write here could plant code that runs in our CUDA context.
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o022 != 0 {
                return Err(refused(format!(
                    "mode {mode:03o} lets other users write to it: not used (chmod 700 it)"
                )));
            }
            Ok(())
        }
        #[cfg(not(unix))]
        {
            std::fs::create_dir_all(&self.dir).map_err(cache_error)
        }
    }

    /// Writes through a temporary file of a name no other writer uses and
    /// a rename, so that a concurrent reader never sees half an entry and
    /// concurrent writers never write into each other's file.
    fn store(&self, path: &Path, ptx: &[u8]) -> Result<(), SourceError> {
        use std::io::Write;
        let cache_error = |source| SourceError::Cache {
            path: path.to_owned(),
            source,
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let partial = path.with_extension(format!(
            "ptx.{}.{}.{nanos}.partial",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options
            .open(&partial)
            .and_then(|mut f| f.write_all(&encode_entry(ptx)))
            .and_then(|()| std::fs::rename(&partial, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        written.map_err(cache_error)
    }
}

/// The effective uid of this process (the owner of `/proc/self`), where
/// `/proc` exists.
fn current_uid() -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").ok().map(|m| m.uid())
    }
    #[cfg(not(unix))]
    None
}

fn encode_entry(image: &[u8]) -> Vec<u8> {
    let header = format!(
        "{ENTRY_MAGIC} len={} crc32={:08x}\n",
        image.len(),
        crc32fast::hash(image)
    );
    let mut out = Vec::with_capacity(header.len() + image.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(image);
    out
}

/// The image of a cache entry, or `None` when the entry is not one this
/// format wrote whole (wrong header, length or CRC).
fn decode_entry(bytes: &[u8]) -> Option<Vec<u8>> {
    let newline = bytes.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..newline]).ok()?;
    let body = &bytes[newline + 1..];
    let rest = header.strip_prefix(ENTRY_MAGIC)?.trim();
    let mut len = None;
    let mut crc = None;
    for field in rest.split_whitespace() {
        match field.split_once('=')? {
            ("len", v) => len = v.parse::<usize>().ok(),
            ("crc32", v) => crc = u32::from_str_radix(v, 16).ok(),
            _ => return None,
        }
    }
    if len? != body.len() || crc? != crc32fast::hash(body) {
        return None;
    }
    Some(body.to_vec())
}

/// Where a module's PTX came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Stored,
    /// A corrupt entry was deleted, and the fresh PTX stored in its place.
    Replaced,
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
            // A trap poisons the context every slot on the GPU shares: bad
            // arguments are refused on the host, and a kernel returns.
            assert!(!text.contains("__trap"), "{}", source.stem);
        }
    }

    fn key() -> CacheKey<'static> {
        CacheKey {
            expanded_source: "src",
            arch: "compute_90",
            nvrtc_version: "12.9",
            options: "--gpu-architecture=compute_90 -std=c++17",
            driver_version: "12080",
        }
    }

    #[test]
    fn cache_key_changes_with_every_part() {
        let base = key();
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
            CacheKey {
                options: "--gpu-architecture=compute_90 -std=c++17 --use_fast_math",
                ..base
            }
            .digest(),
            CacheKey {
                driver_version: "13000",
                ..base
            }
            .digest(),
        ];
        let distinct: BTreeSet<u64> = digests.into_iter().collect();
        assert_eq!(distinct.len(), 6);
    }

    #[test]
    fn second_lookup_hits_the_cache_without_compiling() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("ptx"));
        let (ptx, outcome) = cache
            .get_or_compile::<()>("filter", key(), || Ok("ptx".into()))
            .unwrap();
        assert_eq!((ptx.as_str(), outcome), ("ptx", CacheOutcome::Stored));
        let (ptx, outcome) = cache
            .get_or_compile::<()>("filter", key(), || panic!("compiled twice"))
            .unwrap();
        assert_eq!((ptx.as_str(), outcome), ("ptx", CacheOutcome::Hit));
    }

    #[test]
    fn a_corrupt_entry_is_deleted_and_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("ptx"));
        cache
            .get_or_compile::<()>("filter", key(), || Ok(".version 8.0\n.entry f".into()))
            .unwrap();
        let path = cache.path_of("filter", key());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        for corrupt in [
            bytes.clone(),
            bytes[..bytes.len() / 2].to_vec(),
            b"garbage".to_vec(),
        ] {
            std::fs::write(&path, corrupt).unwrap();
            let (ptx, outcome) = cache
                .get_or_compile::<()>("filter", key(), || Ok("fresh".into()))
                .unwrap();
            assert_eq!((ptx.as_str(), outcome), ("fresh", CacheOutcome::Replaced));
            let (ptx, outcome) = cache
                .get_or_compile::<()>("filter", key(), || panic!("stored again"))
                .unwrap();
            assert_eq!((ptx.as_str(), outcome), ("fresh", CacheOutcome::Hit));
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_directory_others_can_write_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o775)).unwrap();
        // A planted entry with a valid header must not be loaded.
        let cache = PtxCache::new(&shared);
        std::fs::write(cache.path_of("filter", key()), encode_entry(b"planted")).unwrap();
        let (ptx, outcome) = cache
            .get_or_compile::<()>("filter", key(), || Ok("compiled".into()))
            .unwrap();
        assert_eq!(
            (ptx.as_str(), outcome),
            ("compiled", CacheOutcome::Uncached)
        );
        // A symbolic link to a private directory is not followed either.
        let private = dir.path().join("private");
        let link = dir.path().join("link");
        PtxCache::new(&private).ensure_private_dir().unwrap();
        std::os::unix::fs::symlink(&private, &link).unwrap();
        assert!(PtxCache::new(&link).ensure_private_dir().is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_new_cache_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("a").join("b"));
        cache
            .get_or_compile::<()>("filter", key(), || Ok("ptx".into()))
            .unwrap();
        let mode = std::fs::metadata(cache.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let entry = std::fs::metadata(cache.path_of("filter", key())).unwrap();
        assert_eq!(entry.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn concurrent_writers_leave_one_whole_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("ptx"));
        std::thread::scope(|scope| {
            for i in 0..8 {
                let cache = cache.clone();
                scope.spawn(move || {
                    let text = format!("ptx from writer {i} ").repeat(1000);
                    cache
                        .get_or_compile::<()>("filter", key(), || Ok(text))
                        .unwrap();
                });
            }
        });
        let (ptx, outcome) = cache
            .get_or_compile::<()>("filter", key(), || panic!("an entry was stored"))
            .unwrap();
        assert_eq!(outcome, CacheOutcome::Hit);
        assert!(ptx.starts_with("ptx from writer "));
        let leftovers = std::fs::read_dir(cache.dir()).unwrap().count();
        assert_eq!(leftovers, 1, "no partial files stay behind");
    }

    #[test]
    fn default_dir_prefers_the_user_cache_directory() {
        let dir = PtxCache::default_dir();
        if std::env::var_os("STRATA_KERNEL_CACHE").is_none() {
            assert!(
                dir.ends_with("strata/kernels")
                    || dir.to_string_lossy().contains("strata-kernel-cache-")
            );
            assert!(!dir.starts_with("/tmp/strata-kernel-cache/"));
        }
    }
}
