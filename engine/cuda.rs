//! The cuda device: the NVIDIA driver API through cudarc with dynamic loading, so the
//! binary runs (and says why there is no GPU) on machines without libcuda. Kernels come
//! from the fatbins build.rs embedded (sm_90a and sm_80 machine code, compute_80 PTX).
//!
//! This is the runtime under the typed launchers of [`crate::kernels`]: memory, modules and
//! launches. Every call binds the context to the calling thread first, and launches
//! synchronise, so a kernel fault is reported by the launch that caused it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext};

use crate::error::{Error, Result};
use crate::kernels::Dim3;

/// One GPU with reel's kernels loaded.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    name: String,
    ordinal: usize,
    modules: Vec<(&'static str, sys::CUmodule)>,
    functions: Mutex<HashMap<&'static str, usize>>,
}

// SAFETY: the module and function handles are plain driver handles, valid in the context
// for its lifetime; every use binds that context to the calling thread first.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

fn driver(what: &str, e: result::DriverError) -> Error {
    Error::invalid(format!("cuda: {what}: {e:?}"))
}

/// Whether the NVIDIA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its usual names; nothing is called.
    unsafe { sys::is_culib_present() }
}

impl Cuda {
    /// Opens GPU `ordinal` and loads every kernel fatbin. Errors (never panics) when this
    /// build has no GPU kernels, when libcuda is absent, or when the driver refuses.
    pub fn open(ordinal: usize) -> Result<Arc<Cuda>> {
        if crate::kernels::FATBINS.is_empty() {
            return Err(Error::invalid(
                "--device cuda: this reel was built without nvcc, so it has no GPU kernels; run \
                 tools/install-cuda-toolchain.sh and rebuild",
            ));
        }
        if !driver_present() {
            return Err(Error::invalid(
                "--device cuda: the NVIDIA driver library (libcuda.so.1) was not found on this machine; \
                 use --device cpu, or run on a machine with an NVIDIA GPU and driver >= 580",
            ));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| driver(&format!("opening GPU {ordinal}"), e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let mut modules = Vec::new();
        for (stem, image) in crate::kernels::FATBINS {
            // The driver reads the image through a pointer; give it 8-byte alignment.
            let mut aligned = vec![0u64; image.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..image.len()].copy_from_slice(image);
            ctx.bind_to_thread()
                .map_err(|e| driver("binding the context", e))?;
            // SAFETY: `aligned` holds a complete fatbin made by nvcc at build time; the driver
            // copies what it needs before returning.
            let module = unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) }
                .map_err(|e| driver(&format!("loading kernels/{stem}.cu's fatbin on {name}"), e))?;
            modules.push((*stem, module));
        }
        Ok(Arc::new(Cuda {
            ctx,
            name,
            ordinal,
            modules,
            functions: Mutex::new(HashMap::new()),
        }))
    }

    /// The GPU's name as the driver reports it ("NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver("binding the context", e))
    }

    fn function(&self, name: &'static str) -> Result<sys::CUfunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&f) = cache.get(name) {
            return Ok(f as sys::CUfunction);
        }
        let c = CString::new(name).map_err(|_| Error::invalid("kernel name with a NUL"))?;
        for (_, m) in &self.modules {
            // SAFETY: m is a module loaded in this context (bound by the caller).
            if let Ok(f) = unsafe { result::module::get_function(*m, c.clone()) } {
                cache.insert(name, f as usize);
                return Ok(f);
            }
        }
        Err(Error::invalid(format!(
            "cuda: no kernel named {name} in this build's fatbins"
        )))
    }

    /// Device memory of `bytes` (at least 1), uninitialised.
    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: a plain allocation in the bound context.
        unsafe { result::malloc_sync(bytes.max(1)) }
            .map_err(|e| driver(&format!("allocating {bytes} bytes"), e))
    }

    /// Frees memory from [`Cuda::alloc`].
    pub fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: ptr came from alloc on this context and is freed once (by Buf's drop).
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    /// Copies host data to device memory at `dst` (which holds at least `src.len()` items).
    pub fn upload<T: bytemuck::Pod>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.bind()?;
        // SAFETY: dst holds src's bytes (the caller's buffer was allocated for them).
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| driver("copying to the GPU", e))
    }

    /// Copies device memory at `src` into `dst`.
    pub fn download<T: bytemuck::Pod>(&self, dst: &mut [T], src: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: src holds dst's bytes (as above).
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| driver("copying from the GPU", e))
    }

    /// Launches `name` on the default stream and waits for it. `params` points at each
    /// kernel argument, in order, as cuLaunchKernel takes them.
    ///
    /// # Safety
    /// Every pointer argument must address device memory of this context that covers what
    /// the kernel reads and writes for these sizes (the typed launchers check this).
    pub unsafe fn launch(
        &self,
        name: &'static str,
        grid: Dim3,
        block: Dim3,
        shared: usize,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.bind()?;
        let f = self.function(name)?;
        let shared =
            u32::try_from(shared).map_err(|_| Error::invalid("shared memory too large"))?;
        // SAFETY: the caller's contract; the null stream is the context's default stream.
        unsafe {
            result::launch_kernel(
                f,
                (grid.x, grid.y, grid.z),
                (block.x, block.y, block.z),
                shared,
                std::ptr::null_mut(),
                params,
            )
        }
        .map_err(|e| driver(&format!("launching {name}"), e))?;
        result::ctx::synchronize().map_err(|e| driver(&format!("running {name}"), e))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            for (_, m) in &self.modules {
                // SAFETY: loaded in this context, unloaded once.
                let _ = unsafe { result::module::unload(*m) };
            }
        }
    }
}
