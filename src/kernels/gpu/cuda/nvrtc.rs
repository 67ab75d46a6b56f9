//! NVRTC, found and loaded by strata itself.
//!
//! `cudarc` built for CUDA 12 looks for `libnvrtc.so`, `.so.12` and older
//! names only, so on a CUDA 13 machine (which ships `libnvrtc.so.13` alone)
//! it finds no compiler and the GPU tier would be off. This module opens
//! the library with `dlopen` and calls the ten NVRTC functions the tier
//! uses; their C signatures are the same in NVRTC 11, 12 and 13.
//!
//! Where it looks, first hit wins:
//! 1. `STRATA_NVRTC_LIBRARY`, a path to a `libnvrtc.so*` (a misnamed or
//!    broken file is an error naming it, not a silent fallback);
//! 2. the sonames on the loader's search path (`LD_LIBRARY_PATH`,
//!    `ldconfig`): `libnvrtc.so.13`, `.so.12`, then `libnvrtc.so`, except
//!    that with a CUDA 12 driver `.so.12` comes first (PTX and cubins of
//!    NVRTC 13 need a CUDA 13 driver);
//! 3. the usual install directories: `$CUDA_HOME/lib64`, `$CUDA_PATH/lib64`,
//!    `/usr/local/cuda/lib64`, `/usr/local/cuda/targets/*/lib`, and the
//!    `nvidia/cu13/lib` and `nvidia/cuda_nvrtc/lib` folders of NVIDIA's
//!    Python wheels under the interpreters' `site-packages` (system,
//!    `/usr/local`, `~/.local`, pyenv's, the active virtualenv's).
//!
//! NVRTC opens `libnvrtc-builtins.so.<major>.<minor>` by soname on its first
//! compilation; a library found in a directory off the search path has its
//! builtins opened first (from the same directory, `RTLD_GLOBAL`), so that
//! lookup finds them without `LD_LIBRARY_PATH`.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

use crate::kernels::gpu::GpuError;

/// The environment variable naming the NVRTC library to use.
pub const LIBRARY_ENV: &str = "STRATA_NVRTC_LIBRARY";

type Program = *mut c_void;
type Status = c_int;
const SUCCESS: Status = 0;

type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status;
type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> Status;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> Status;
type CopyFn = unsafe extern "C" fn(Program, *mut c_char) -> Status;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> Status;
type ErrorStringFn = unsafe extern "C" fn(Status) -> *const c_char;

/// A loaded NVRTC: the library, its builtins, and its entry points.
pub struct Nvrtc {
    path: PathBuf,
    version: (i32, i32),
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: CopyFn,
    ptx_size: SizeFn,
    ptx: CopyFn,
    cubin_size: SizeFn,
    cubin: CopyFn,
    destroy: DestroyFn,
    error_string: ErrorStringFn,
    /// Kept open for the process's life: the function pointers above point
    /// into it, and NVRTC into its builtins.
    _library: Library,
    _builtins: Vec<Library>,
}

/// What a compilation makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// PTX text for a virtual architecture (`compute_90`).
    Ptx,
    /// A cubin for a real one (`sm_90`).
    Cubin,
}

static NVRTC: OnceLock<Result<Nvrtc, String>> = OnceLock::new();

/// The process's NVRTC, loaded on first use, or why there is none.
pub fn nvrtc() -> Result<&'static Nvrtc, GpuError> {
    NVRTC
        .get_or_init(|| {
            let driver = super::driver_version();
            load(&candidates(std::env::var_os(LIBRARY_ENV), driver))
        })
        .as_ref()
        .map_err(|reason| GpuError::NvrtcUnavailable {
            reason: reason.clone(),
        })
}

/// Where to look for the library, in order (see the module docs).
fn candidates(explicit: Option<std::ffi::OsString>, driver: Option<i32>) -> Vec<Candidate> {
    if let Some(path) = explicit.filter(|p| !p.is_empty()) {
        return vec![Candidate::Explicit(PathBuf::from(path))];
    }
    let mut names = vec!["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
    if driver.is_some_and(|v| v < 13000) {
        names.swap(0, 1);
    }
    let mut out: Vec<Candidate> = names.iter().map(|n| Candidate::Soname(n)).collect();
    for dir in install_dirs() {
        for name in &names {
            out.push(Candidate::InDir(dir.join(name)));
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq)]
enum Candidate {
    Explicit(PathBuf),
    Soname(&'static str),
    InDir(PathBuf),
}

/// CUDA toolkit and Python wheel folders that may hold `libnvrtc`.
fn install_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(root).join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.extend(subdirs(Path::new("/usr/local/cuda/targets")).map(|t| t.join("lib")));
    // NVIDIA's wheels (`pip install nvidia-cuda-nvrtc`) in any interpreter.
    let mut site_roots = vec![
        PathBuf::from("/usr/lib/python3/dist-packages"),
        PathBuf::from("/usr/local/lib"),
        PathBuf::from("/usr/lib"),
    ];
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        let home = PathBuf::from(home);
        site_roots.push(home.join(".local/lib"));
        site_roots.extend(subdirs(&home.join(".pyenv/versions")).map(|v| v.join("lib")));
    }
    if let Some(root) = std::env::var_os("PYENV_ROOT").filter(|v| !v.is_empty()) {
        site_roots.extend(subdirs(&PathBuf::from(root).join("versions")).map(|v| v.join("lib")));
    }
    if let Some(env) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        site_roots.push(PathBuf::from(env).join("lib"));
    }
    for root in site_roots {
        let sites: Vec<PathBuf> = if root.ends_with("dist-packages") {
            vec![root]
        } else {
            subdirs(&root)
                .filter(|d| {
                    d.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
                })
                .flat_map(|d| [d.join("site-packages"), d.join("dist-packages")])
                .collect()
        };
        for site in sites {
            dirs.push(site.join("nvidia/cu13/lib"));
            dirs.push(site.join("nvidia/cuda_nvrtc/lib"));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

fn subdirs(dir: &Path) -> impl Iterator<Item = PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    // Newest interpreter first (python3.12 before python3.11).
    found.sort();
    found.reverse();
    found.into_iter()
}

/// Opens the first candidate that loads and has every entry point.
fn load(candidates: &[Candidate]) -> Result<Nvrtc, String> {
    let mut tried = Vec::new();
    for candidate in candidates {
        let (target, in_dir) = match candidate {
            Candidate::Explicit(path) => (path.clone(), true),
            Candidate::Soname(name) => (PathBuf::from(name), false),
            Candidate::InDir(path) => {
                if !path.exists() {
                    continue;
                }
                (path.clone(), true)
            }
        };
        match open(&target, in_dir) {
            Ok(nvrtc) => return Ok(nvrtc),
            Err(e) => {
                if let Candidate::Explicit(path) = candidate {
                    return Err(format!("{LIBRARY_ENV}={}: {e}", path.display()));
                }
                tried.push(target.display().to_string());
            }
        }
    }
    Err(format!(
        "no libnvrtc found (tried {}); install the CUDA toolkit's NVRTC or `pip install nvidia-cuda-nvrtc`, \
         or set {LIBRARY_ENV} to its path",
        tried.join(", ")
    ))
}

fn open(target: &Path, in_dir: bool) -> Result<Nvrtc, String> {
    let builtins = if in_dir {
        open_builtins(target.parent().unwrap_or(Path::new(".")))
    } else {
        Vec::new()
    };
    // SAFETY: opening NVRTC runs its initialisers, which only set up the
    // library's own state; nothing else in the process depends on them.
    let library =
        unsafe { Library::open(Some(target), RTLD_NOW) }.map_err(|e| format!("dlopen: {e}"))?;
    /// A symbol of `library` as a function pointer of type `F`.
    fn symbol<F: Copy>(library: &Library, name: &str) -> Result<F, String> {
        // SAFETY: each `F` below is the C signature NVRTC 11–13 declare for
        // `name` in nvrtc.h; the pointer is used only while `library` is
        // open, which `Nvrtc` keeps for the life of the process.
        unsafe { library.get::<F>(name.as_bytes()) }
            .map(|s| *s)
            .map_err(|e| format!("{name} missing: {e}"))
    }
    let version_fn: VersionFn = symbol(&library, "nvrtcVersion")?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are to live locals the call writes.
    let status = unsafe { version_fn(&mut major, &mut minor) };
    if status != SUCCESS {
        return Err(format!("nvrtcVersion returned {status}"));
    }
    Ok(Nvrtc {
        path: target.to_path_buf(),
        version: (major, minor),
        create: symbol(&library, "nvrtcCreateProgram")?,
        compile: symbol(&library, "nvrtcCompileProgram")?,
        log_size: symbol(&library, "nvrtcGetProgramLogSize")?,
        log: symbol(&library, "nvrtcGetProgramLog")?,
        ptx_size: symbol(&library, "nvrtcGetPTXSize")?,
        ptx: symbol(&library, "nvrtcGetPTX")?,
        cubin_size: symbol(&library, "nvrtcGetCUBINSize")?,
        cubin: symbol(&library, "nvrtcGetCUBIN")?,
        destroy: symbol(&library, "nvrtcDestroyProgram")?,
        error_string: symbol(&library, "nvrtcGetErrorString")?,
        _library: library,
        _builtins: builtins,
    })
}

/// `libnvrtc-builtins.so.*` of `dir`, opened globally so that NVRTC's own
/// `dlopen` of them by soname finds them (the `.alt` variants are for
/// other loaders and are skipped).
fn open_builtins(dir: &Path) -> Vec<Library> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libnvrtc-builtins.so."))
        })
        .collect();
    paths.sort();
    paths
        .iter()
        // SAFETY: as for NVRTC itself: its initialisers touch only its own
        // state.
        .filter_map(|p| unsafe { Library::open(Some(p), RTLD_NOW | RTLD_GLOBAL) }.ok())
        .collect()
}

impl Nvrtc {
    /// The file (or soname) the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `major.minor`.
    pub fn version(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }

    pub fn major(&self) -> i32 {
        self.version.0
    }

    fn status(&self, call: &str, status: Status) -> Result<(), String> {
        if status == SUCCESS {
            return Ok(());
        }
        // SAFETY: NVRTC returns a static, NUL-terminated string for every
        // status value (an unknown one included).
        let text = unsafe {
            let p = (self.error_string)(status);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(format!("{call}: {text} ({status})"))
    }

    /// Compiles `source` (named `name` in messages) with `options` into
    /// `image`; the error carries NVRTC's log.
    pub fn compile(
        &self,
        name: &str,
        source: &str,
        options: &[String],
        image: Image,
    ) -> Result<Vec<u8>, String> {
        let text = CString::new(source).map_err(|e| format!("{name}: {e}"))?;
        let file = CString::new(name).map_err(|e| format!("{name}: {e}"))?;
        let options: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()).map_err(|e| format!("option {o:?}: {e}")))
            .collect::<Result<_, _>>()?;
        let option_pointers: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        let mut program: Program = std::ptr::null_mut();
        // SAFETY: `text` and `file` are NUL-terminated and outlive the
        // program (destroyed below); no headers are passed.
        let status = unsafe {
            (self.create)(
                &mut program,
                text.as_ptr(),
                file.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.status("nvrtcCreateProgram", status)?;
        let result = self.compile_program(program, &option_pointers, image);
        // SAFETY: `program` was created above and is destroyed once.
        unsafe { (self.destroy)(&mut program) };
        result
    }

    fn compile_program(
        &self,
        program: Program,
        options: &[*const c_char],
        image: Image,
    ) -> Result<Vec<u8>, String> {
        let count = c_int::try_from(options.len()).map_err(|_| "too many options".to_owned())?;
        // SAFETY: `options` holds `count` pointers to NUL-terminated strings
        // that the caller keeps alive for the call.
        let status = unsafe { (self.compile)(program, count, options.as_ptr()) };
        if let Err(e) = self.status("nvrtcCompileProgram", status) {
            let log = self
                .copy_out(program, self.log_size, self.log)
                .map(|bytes| {
                    String::from_utf8_lossy(&bytes)
                        .trim_end_matches('\0')
                        .trim()
                        .to_owned()
                })
                .unwrap_or_default();
            return Err(format!("{e}: {log}"));
        }
        match image {
            Image::Ptx => {
                let mut ptx = self.copy_out(program, self.ptx_size, self.ptx)?;
                // PTX comes NUL-terminated; the text is what callers want.
                while ptx.last() == Some(&0) {
                    ptx.pop();
                }
                Ok(ptx)
            }
            Image::Cubin => self.copy_out(program, self.cubin_size, self.cubin),
        }
    }

    /// One of the program's outputs: its size, then its bytes.
    fn copy_out(&self, program: Program, size: SizeFn, copy: CopyFn) -> Result<Vec<u8>, String> {
        let mut len = 0usize;
        // SAFETY: `program` is live; the call writes one size_t.
        self.status("nvrtcGet*Size", unsafe { size(program, &mut len) })?;
        let mut bytes = vec![0u8; len];
        if len > 0 {
            // SAFETY: `bytes` has exactly the size NVRTC just reported.
            self.status("nvrtcGet*", unsafe {
                copy(program, bytes.as_mut_ptr().cast())
            })?;
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cuda_12_driver_tries_nvrtc_12_before_13() {
        let soname = |c: &Candidate| match c {
            Candidate::Soname(n) => Some(*n),
            _ => None,
        };
        let old: Vec<_> = candidates(None, Some(12080))
            .iter()
            .filter_map(soname)
            .collect();
        assert_eq!(old, ["libnvrtc.so.12", "libnvrtc.so.13", "libnvrtc.so"]);
        for driver in [Some(13000), None] {
            let new: Vec<_> = candidates(None, driver).iter().filter_map(soname).collect();
            assert_eq!(new, ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]);
        }
    }

    #[test]
    fn an_explicit_library_is_the_only_candidate_and_its_failure_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("libnvrtc.so.13");
        std::fs::write(&bogus, b"not an ELF file").unwrap();
        let list = candidates(Some(bogus.clone().into_os_string()), Some(13000));
        assert_eq!(list, [Candidate::Explicit(bogus.clone())]);
        let Err(e) = load(&list) else {
            panic!("a text file is not NVRTC")
        };
        assert!(e.contains(LIBRARY_ENV), "{e}");
        assert!(e.contains(&bogus.display().to_string()), "{e}");
    }

    #[test]
    fn without_any_library_the_error_says_what_was_tried_and_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        let list = [
            Candidate::Soname("libnvrtc-strata-test-missing.so.99"),
            Candidate::InDir(dir.path().join("libnvrtc.so.13")),
        ];
        let Err(e) = load(&list) else {
            panic!("nothing to load")
        };
        assert!(e.contains("libnvrtc-strata-test-missing.so.99"), "{e}");
        assert!(e.contains("nvidia-cuda-nvrtc"), "{e}");
        assert!(e.contains(LIBRARY_ENV), "{e}");
    }
}

/// Every NVRTC in the install directories compiles a kernel to PTX and to
/// a cubin through this module (CI installs NVIDIA's NVRTC 12 and 13
/// wheels; `STRATA_REQUIRE_NVRTC_MAJORS="12 13"` makes a missing one fail).
#[cfg(test)]
mod loaded_tests {
    use super::*;

    const KERNEL: &str = r#"extern "C" __global__ void twice(const long long* in, long long* out, unsigned long long n) {
        unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
        if (i < n) out[i] = in[i] * 2;
    }"#;

    #[test]
    fn every_nvrtc_found_compiles_a_kernel_to_ptx_and_to_a_cubin() {
        let mut majors = Vec::new();
        for dir in install_dirs() {
            for name in ["libnvrtc.so.13", "libnvrtc.so.12"] {
                let path = dir.join(name);
                if !path.exists() {
                    continue;
                }
                let nvrtc = open(&path, true).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let ptx = nvrtc
                    .compile(
                        "twice.cu",
                        KERNEL,
                        &["--gpu-architecture=compute_90".into()],
                        Image::Ptx,
                    )
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let ptx = String::from_utf8(ptx).expect("PTX is text");
                assert!(ptx.contains(".entry twice("), "{ptx}");
                let cubin = nvrtc
                    .compile(
                        "twice.cu",
                        KERNEL,
                        &["--gpu-architecture=sm_90".into()],
                        Image::Cubin,
                    )
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(cubin.starts_with(b"\x7fELF"));
                let Err(log) = nvrtc.compile(
                    "broken.cu",
                    "this is not C++",
                    &["--gpu-architecture=sm_90".into()],
                    Image::Cubin,
                ) else {
                    panic!("a syntax error compiles")
                };
                assert!(log.contains("broken.cu"), "the log names the file: {log}");
                println!(
                    "NVRTC {} at {}: PTX {} bytes, sm_90 cubin {} bytes",
                    nvrtc.version(),
                    path.display(),
                    ptx.len(),
                    cubin.len()
                );
                majors.push(nvrtc.major());
            }
        }
        let required = std::env::var("STRATA_REQUIRE_NVRTC_MAJORS").unwrap_or_default();
        for major in required.split_whitespace() {
            let major: i32 = major
                .parse()
                .expect("STRATA_REQUIRE_NVRTC_MAJORS holds numbers");
            assert!(
                majors.contains(&major),
                "NVRTC {major} required but not found (found {majors:?})"
            );
        }
        if majors.is_empty() {
            println!("skipped: no NVRTC in the install directories");
        }
    }
}
