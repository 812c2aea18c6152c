//! cuBLASLt, the cuda device's GEMM when the library is there (reel's own GEMM kernel
//! otherwise, and always on emu). Loaded at run time, like the driver: from `REEL_CUBLASLT`
//! (a path to libcublasLt.so.*), the loader path, or the nvidia-cublas wheel beside
//! python3's torch; the log says which, and its absence is a log line and the fallback,
//! never an error. Descriptors, layouts and the heuristic's algorithm are cached per shape;
//! bias and GELU-tanh run as epilogues; a 32 MiB workspace per GPU.
//!
//! The row-major problem C[M, N] = A[M, K]·W[N, K]ᵀ is the column-major one
//! Cᵀ[N, M] = W'ᵀ·A' with W' = W viewed [K, N] (ld = ldw, transposed) and A' = A viewed
//! [K, M] (ld = lda): cuBLASLt's (A, B, D) = (W', A', C) with transa = T, transb = N.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::{result as lt, sys};

use crate::cuda::Cuda;
use crate::error::{Error, Result};
use crate::kernels::{Act, DevSlice, DeviceMem, KernelDevice};

/// The workspace cuBLASLt may use per call.
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Which library was loaded, if any (found once per process).
fn library() -> &'static Option<String> {
    static LIB: OnceLock<Option<String>> = OnceLock::new();
    LIB.get_or_init(find_library)
}

/// Loads libcublasLt by full path (kept loaded for the process), so cudarc's later lookup
/// by soname finds it.
fn preload(path: &std::path::Path) -> bool {
    // SAFETY: loading a shared library runs its initialisers; libcublasLt's are NVIDIA's.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(e) => {
            tracing::warn!("cuBLASLt: cannot load {}: {e}", path.display());
            false
        }
    }
}

fn find_library() -> Option<String> {
    if let Some(p) = std::env::var_os("REEL_CUBLASLT") {
        let p = std::path::PathBuf::from(p);
        if preload(&p) {
            tracing::info!("cuBLASLt: {} (REEL_CUBLASLT)", p.display());
            return Some(p.display().to_string());
        }
    }
    // SAFETY: only tries to dlopen the library by its usual names.
    if unsafe { sys::is_culib_present() } {
        tracing::info!("cuBLASLt: libcublasLt from the loader path");
        return Some("libcublasLt (loader path)".into());
    }
    // The nvidia-cublas wheel torch depends on.
    let dir = std::process::Command::new("python3")
        .args([
            "-c",
            "import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], 'lib'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(dir) = dir {
        let found = std::fs::read_dir(&dir).ok().and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libcublasLt.so"))
            })
        });
        if let Some(p) = found {
            if preload(&p) {
                tracing::info!("cuBLASLt: {} (python3's nvidia-cublas wheel)", p.display());
                return Some(p.display().to_string());
            }
        }
    }
    tracing::info!(
        "cuBLASLt: not found (REEL_CUBLASLT, the loader path, python3's nvidia-cublas): reel's own GEMM kernel runs instead"
    );
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldw: usize,
    ldc: usize,
    /// f16 inputs (else bf16).
    f16: bool,
    out_f32: bool,
    bias: bool,
    gelu: bool,
}

struct Prepared {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

/// cuBLASLt on one GPU.
pub struct CublasLt {
    cuda: Arc<Cuda>,
    handle: sys::cublasLtHandle_t,
    workspace: DeviceMem,
    cache: Mutex<HashMap<Key, Option<Prepared>>>,
}

// SAFETY: the handle and descriptors are used under the cache's mutex or read-only, with the
// GPU's context bound.
unsafe impl Send for CublasLt {}
unsafe impl Sync for CublasLt {}

fn lt_err(what: &str, e: lt::CublasError) -> Error {
    Error::Device(format!("cuBLASLt: {what}: {e:?}"))
}

impl CublasLt {
    /// cuBLASLt for the GPU `dev`, made once per GPU; None when the library is not there or
    /// REEL_GEMM=reel asks for reel's kernel.
    pub fn for_device(dev: &KernelDevice) -> Option<Arc<CublasLt>> {
        let KernelDevice::Cuda(cuda) = dev else {
            return None;
        };
        if std::env::var("REEL_GEMM").is_ok_and(|v| v == "reel") {
            return None;
        }
        library().as_ref()?;
        static ALL: OnceLock<Mutex<HashMap<usize, Option<Arc<CublasLt>>>>> = OnceLock::new();
        let mut all = ALL
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        all.entry(dev.key())
            .or_insert_with(|| match CublasLt::new(dev, cuda) {
                Ok(lt) => Some(Arc::new(lt)),
                Err(e) => {
                    tracing::warn!("{e}: reel's own GEMM kernel runs instead");
                    None
                }
            })
            .clone()
    }

    fn new(dev: &KernelDevice, cuda: &Arc<Cuda>) -> Result<Self> {
        cuda.synchronize()
            .map_err(|e| Error::Device(e.to_string()))?;
        let handle = lt::create_handle().map_err(|e| lt_err("creating a handle", e))?;
        Ok(CublasLt {
            cuda: cuda.clone(),
            handle,
            workspace: DeviceMem::new(dev, WORKSPACE_BYTES)?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Descriptors and the heuristic's algorithm for a shape (None: cuBLASLt has no
    /// algorithm for it, and reel's kernel runs).
    fn prepare(&self, key: Key) -> Result<Option<Prepared>> {
        use sys::cublasLtMatmulDescAttributes_t as D;
        use sys::cudaDataType::{CUDA_R_16BF, CUDA_R_16F, CUDA_R_32F};
        let half = if key.f16 { CUDA_R_16F } else { CUDA_R_16BF };
        // SAFETY: every descriptor is created here and only used with this handle.
        unsafe {
            let desc =
                lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
                    .map_err(|e| lt_err("creating a matmul descriptor", e))?;
            let set = |attr: D, v: *const c_void, size: usize| {
                lt::set_matmul_desc_attribute(desc, attr, v, size)
                    .map_err(|e| lt_err("setting a matmul attribute", e))
            };
            let (t, n): (i32, i32) = (1, 0); // CUBLAS_OP_T, CUBLAS_OP_N
            set(D::CUBLASLT_MATMUL_DESC_TRANSA, &t as *const i32 as _, 4)?;
            set(D::CUBLASLT_MATMUL_DESC_TRANSB, &n as *const i32 as _, 4)?;
            let epilogue = match (key.bias, key.gelu) {
                (true, true) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
                (true, false) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                (false, true) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
                (false, false) => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            };
            set(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as _,
                std::mem::size_of_val(&epilogue),
            )?;
            if key.bias {
                let f32_type = CUDA_R_32F;
                set(
                    D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                    &f32_type as *const _ as _,
                    std::mem::size_of_val(&f32_type),
                )?;
            }
            let layout = |ty, rows: usize, cols: usize, ld: usize| {
                lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                    .map_err(|e| lt_err("creating a matrix layout", e))
            };
            let a = layout(half, key.k, key.n, key.ldw)?;
            let b = layout(half, key.k, key.m, key.lda)?;
            let d = layout(
                if key.out_f32 { CUDA_R_32F } else { half },
                key.n,
                key.m,
                key.ldc,
            )?;
            let pref = lt::create_matmul_pref().map_err(|e| lt_err("creating a preference", e))?;
            let ws = WORKSPACE_BYTES;
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const usize as _,
                std::mem::size_of::<usize>(),
            )
            .map_err(|e| lt_err("setting the workspace preference", e))?;
            let heuristic = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref);
            let _ = lt::destroy_matmul_pref(pref);
            match heuristic {
                Ok(h) => Ok(Some(Prepared {
                    desc,
                    a,
                    b,
                    d,
                    algo: h.algo,
                })),
                Err(e) => {
                    tracing::info!(
                        "cuBLASLt has no algorithm for {key:?} ({e:?}): reel's GEMM kernel runs it"
                    );
                    let _ = lt::destroy_matrix_layout(a);
                    let _ = lt::destroy_matrix_layout(b);
                    let _ = lt::destroy_matrix_layout(d);
                    let _ = lt::destroy_matmul_desc(desc);
                    Ok(None)
                }
            }
        }
    }

    /// C = act(A·Wᵀ + bias) on the kernel stream; Ok(false) when cuBLASLt has no algorithm
    /// for this shape (the caller runs reel's kernel). The operands were checked by the
    /// caller ([`crate::kernels::gemm`]'s rules).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T, O>(
        &self,
        (a, lda): (DevSlice<'_, T>, usize),
        (w, ldw): (DevSlice<'_, T>, usize),
        bias: Option<DevSlice<'_, f32>>,
        (c, ldc): (DevSlice<'_, O>, usize),
        (m, n, k): (usize, usize, usize),
        act: Act,
        (f16, out_f32): (bool, bool),
    ) -> Result<bool> {
        let dev = KernelDevice::Cuda(self.cuda.clone());
        let key = Key {
            m,
            n,
            k,
            lda,
            ldw,
            ldc,
            f16,
            out_f32,
            bias: bias.is_some(),
            gelu: act == Act::GeluTanh,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let p = match cache.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.prepare(key)?),
        };
        let Some(p) = p.as_ref() else {
            return Ok(false);
        };
        let (ap, wp, cp) = (
            a.addr(&dev, "cuBLASLt A")?,
            w.addr(&dev, "cuBLASLt W")?,
            c.addr(&dev, "cuBLASLt C")?,
        );
        self.cuda
            .make_current()
            .map_err(|e| Error::Device(e.to_string()))?;
        // SAFETY: the descriptors belong to this handle; the pointers address device memory of
        // this GPU covering the shapes (checked by the caller); the bias pointer attribute is
        // set and used under the cache's lock.
        unsafe {
            if let Some(b) = bias {
                let bp = b.addr(&dev, "cuBLASLt bias")?.0;
                lt::set_matmul_desc_attribute(
                    p.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bp as *const u64 as _,
                    8,
                )
                .map_err(|e| lt_err("setting the bias pointer", e))?;
            }
            let (alpha, beta) = (1.0f32, 0.0f32);
            lt::matmul(
                self.handle,
                p.desc,
                &alpha as *const f32 as _,
                &beta as *const f32 as _,
                wp.0 as *const c_void,
                p.a,
                ap.0 as *const c_void,
                p.b,
                cp.0 as *const c_void,
                p.d,
                cp.0 as *mut c_void,
                p.d,
                &p.algo,
                self.workspace.ptr().0 as *mut c_void,
                WORKSPACE_BYTES,
                self.cuda.stream_raw() as sys::cudaStream_t,
            )
            .map_err(|e| lt_err(&format!("matmul {m}x{n}x{k}"), e))?;
        }
        self.cuda
            .after_launch("cuBLASLt matmul")
            .map_err(|e| Error::Device(e.to_string()))?;
        Ok(true)
    }
}

/// Which library cuBLASLt came from (None: not loaded, reel's GEMM runs).
pub fn loaded_library() -> Option<&'static str> {
    library().as_deref()
}
