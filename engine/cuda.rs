//! The cuda device: the NVIDIA driver API through cudarc with dynamic loading, so the
//! binary runs (and says why there is no GPU) on machines without libcuda.
//!
//! The bottom layer of the GPU path: driver calls only. It imports nothing of reel's: the
//! kernel images (fatbins) are handed to [`Cuda::open`], and errors are its own
//! [`CudaError`], which the layers above wrap. Every call binds the context to the calling
//! thread first. Kernels run on one non-default (blocking) stream; outside a graph capture a
//! launch synchronises, so a kernel fault is reported by the launch that caused it; inside
//! one ([`Cuda::begin_capture`]) launches are recorded into a CUDA graph that
//! [`Cuda::launch_graph`] replays with no host synchronisation per kernel. Copies use the
//! legacy default stream, which waits for the kernel stream (it is a blocking stream).
//! NVTX ranges ([`nvtx_push`], [`nvtx_pop`]) go to libnvToolsExt when it loads, else
//! nowhere.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext};

/// An error of the driver or of this layer, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("cuda: {0}")]
pub struct CudaError(pub String);

pub type CudaResult<T> = std::result::Result<T, CudaError>;

fn driver(what: &str, e: result::DriverError) -> CudaError {
    CudaError(format!("{what}: {e:?}"))
}

/// Whether the NVIDIA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda by its usual names; nothing is called.
    unsafe { sys::is_culib_present() }
}

/// The driver's CUDA version (13, 0) when libcuda loads.
pub fn driver_version() -> Option<(u32, u32)> {
    if !driver_present() {
        return None;
    }
    let mut v = 0i32;
    // SAFETY: writes one int; libcuda is present (checked above).
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(((v / 1000) as u32, ((v % 1000) / 10) as u32))
}

/// A loaded kernel image, or why the GPU could not load it.
enum Module {
    Loaded(sys::CUmodule),
    Skipped(String),
}

struct Function {
    f: sys::CUfunction,
    /// The CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES last set (0: the default).
    opt_in: u32,
}

/// Whether libnvToolsExt loads (checked once).
fn nvtx_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the library by its usual names.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() })
}

/// Opens an NVTX range (nsys shows it); a no-op without libnvToolsExt.
pub fn nvtx_push(name: &str) {
    if nvtx_present() {
        cudarc::nvtx::result::range_push(name);
    }
}

/// Closes the innermost NVTX range.
pub fn nvtx_pop() {
    if nvtx_present() {
        cudarc::nvtx::result::range_pop();
    }
}

/// A captured and instantiated CUDA graph of `Cuda` it was captured on.
pub struct CudaGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    cuda: Arc<Cuda>,
}

// SAFETY: plain driver handles, used with the owning context bound.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        if self.cuda.bind().is_ok() {
            // SAFETY: made by end_capture on this context, destroyed once.
            unsafe {
                let _ = sys::cuGraphExecDestroy(self.exec);
                let _ = sys::cuGraphDestroy(self.graph);
            }
        }
    }
}

/// One GPU with reel's kernels loaded.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    capturing: AtomicBool,
    name: String,
    ordinal: usize,
    cc: (u32, u32),
    max_shared_optin: u32,
    modules: Vec<(&'static str, Module)>,
    functions: Mutex<HashMap<&'static str, Function>>,
}

// SAFETY: the module and function handles are plain driver handles, valid in the context
// for its lifetime; every use binds that context to the calling thread first, and the
// function cache is behind a mutex.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

impl Cuda {
    /// Opens GPU `ordinal` and loads the kernel images `(file stem, fatbin)`. A module the
    /// GPU has no code for (an sm_90a-only file on an A100) is skipped, not fatal; its
    /// kernels then fail to launch with a message saying so. Errors (never panics) when
    /// libcuda is absent or the driver refuses.
    pub fn open(ordinal: usize, images: &[(&'static str, &'static [u8])]) -> CudaResult<Arc<Cuda>> {
        if !driver_present() {
            return Err(CudaError(
                "the NVIDIA driver library (libcuda.so.1) was not found on this machine; use --device \
                 cpu, or run on a machine with an NVIDIA GPU and driver >= 580"
                    .into(),
            ));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| driver(&format!("opening GPU {ordinal}"), e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| driver(&format!("reading an attribute of GPU {ordinal}"), e))
        };
        use sys::CUdevice_attribute as A;
        let cc = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? as u32,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)? as u32,
        );
        let max_shared_optin =
            attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
        let mut modules = Vec::new();
        for &(stem, image) in images {
            // The driver reads the image through a pointer; give it 8-byte alignment.
            let mut aligned = vec![0u64; image.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut aligned)[..image.len()].copy_from_slice(image);
            ctx.bind_to_thread()
                .map_err(|e| driver("binding the context", e))?;
            // SAFETY: `aligned` holds a complete fatbin made by nvcc at build time; the driver
            // copies what it needs before returning.
            match unsafe { result::module::load_data(aligned.as_ptr() as *const c_void) } {
                Ok(m) => modules.push((stem, Module::Loaded(m))),
                Err(e)
                    if matches!(
                        e.0,
                        sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
                            | sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
                            | sys::CUresult::CUDA_ERROR_INVALID_PTX
                    ) =>
                {
                    let why = format!("{e:?}");
                    tracing::debug!(
                        "kernels/{stem}.cu: no code {name} (sm_{}{}) can load ({why}); skipped",
                        cc.0,
                        cc.1
                    );
                    modules.push((stem, Module::Skipped(why)));
                }
                Err(e) => {
                    return Err(driver(
                        &format!("loading kernels/{stem}.cu's fatbin on {name}"),
                        e,
                    ))
                }
            }
        }
        let mut stream: sys::CUstream = std::ptr::null_mut();
        ctx.bind_to_thread()
            .map_err(|e| driver("binding the context", e))?;
        // SAFETY: creates a stream in the bound context; flags 0: blocking, so copies on the
        // legacy default stream wait for its kernels.
        unsafe { sys::cuStreamCreate(&mut stream, 0) }
            .result()
            .map_err(|e| driver("creating the kernel stream", e))?;
        Ok(Arc::new(Cuda {
            ctx,
            stream,
            capturing: AtomicBool::new(false),
            name,
            ordinal,
            cc,
            max_shared_optin,
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

    /// (major, minor): (9, 0) on an H100.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// The shared memory a block may have with an opt-in (232,448 bytes on sm_90).
    pub fn max_shared_per_block_optin(&self) -> u32 {
        self.max_shared_optin
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> CudaResult<(usize, usize)> {
        self.bind()?;
        result::mem_get_info().map_err(|e| driver("reading free memory", e))
    }

    /// The kernel image stems the GPU could not load, with why.
    pub fn skipped_modules(&self) -> Vec<(&'static str, String)> {
        self.modules
            .iter()
            .filter_map(|(s, m)| match m {
                Module::Skipped(why) => Some((*s, why.clone())),
                Module::Loaded(_) => None,
            })
            .collect()
    }

    fn bind(&self) -> CudaResult<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver("binding the context", e))
    }

    /// Device memory of `bytes` (at least 1), uninitialised.
    pub fn alloc(&self, bytes: usize) -> CudaResult<u64> {
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
    pub fn upload<T: bytemuck::Pod>(&self, dst: u64, src: &[T]) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: dst holds src's bytes (the caller's buffer was allocated for them).
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| driver("copying to the GPU", e))
    }

    /// Copies device memory at `src` into `dst`.
    pub fn download<T: bytemuck::Pod>(&self, dst: &mut [T], src: u64) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: src holds dst's bytes (as above).
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| driver("copying from the GPU", e))
    }

    /// Launches kernel `name` of kernels/`module`.cu on the default stream and waits for it.
    /// `opt_in` (bytes; 0 = none) is set as the function's maximum dynamic shared memory
    /// before the first launch that asks for it. `params` points at each kernel argument, in
    /// order, as cuLaunchKernel takes them.
    ///
    /// # Safety
    /// Every pointer argument must address device memory of this context that covers what
    /// the kernel reads and writes for these sizes (the typed launchers check this).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn launch(
        &self,
        module: &'static str,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        opt_in: u32,
        params: &mut [*mut c_void],
    ) -> CudaResult<()> {
        self.bind()?;
        let f = {
            let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
            if !cache.contains_key(name) {
                let f = self.lookup(module, name)?;
                cache.insert(name, Function { f, opt_in: 0 });
            }
            let entry = cache.get_mut(name).expect("inserted above");
            if entry.opt_in != opt_in {
                use sys::CUfunction_attribute as FA;
                // Without an opt-in the limit is the default, 48 KiB less the static shared
                // memory (not 48 KiB: after an opt-in, static + dynamic could pass 48 KiB).
                let limit = if opt_in > 0 {
                    opt_in as i32
                } else {
                    // SAFETY: f is a function of a module loaded in this (bound) context.
                    let static_bytes = unsafe {
                        result::function::get_function_attribute(
                            entry.f,
                            FA::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                        )
                    }
                    .map_err(|e| driver(&format!("{name}: reading its static shared memory"), e))?;
                    48 * 1024 - static_bytes
                };
                // SAFETY: as above.
                unsafe {
                    result::function::set_function_attribute(
                        entry.f,
                        FA::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        limit,
                    )
                }
                .map_err(|e| {
                    driver(
                        &format!("{name}: opting in to {opt_in} bytes of dynamic shared memory"),
                        e,
                    )
                })?;
                entry.opt_in = opt_in;
            }
            entry.f
        };
        // SAFETY: the caller's contract; the stream belongs to this context.
        unsafe { result::launch_kernel(f, grid, block, shared, self.stream, params) }
            .map_err(|e| driver(&format!("launching {name}"), e))?;
        if self.capturing.load(Ordering::Relaxed) {
            return Ok(()); // recorded into the graph; it runs when the graph is launched
        }
        self.synchronize()
            .map_err(|e| CudaError(format!("running {name}: {e}")))
    }

    /// Runs `f` (launches on the kernel stream) between two CUDA events and returns its
    /// result with the device time between them, in seconds (not inside a graph capture).
    pub fn timed<R>(&self, f: impl FnOnce() -> CudaResult<R>) -> CudaResult<(R, f64)> {
        self.bind()?;
        let mut ev: [sys::CUevent; 2] = [std::ptr::null_mut(); 2];
        for e in &mut ev {
            // SAFETY: creates an event in the bound context.
            unsafe { sys::cuEventCreate(e, 0) }
                .result()
                .map_err(|e| driver("creating an event", e))?;
        }
        let destroy = |ev: [sys::CUevent; 2]| {
            for e in ev {
                // SAFETY: created above, destroyed once.
                unsafe {
                    let _ = sys::cuEventDestroy_v2(e);
                }
            }
        };
        // SAFETY: the events and the stream belong to this context.
        let run = (|| {
            unsafe { sys::cuEventRecord(ev[0], self.stream) }
                .result()
                .map_err(|e| driver("recording an event", e))?;
            let r = f()?;
            self.bind()?;
            unsafe { sys::cuEventRecord(ev[1], self.stream) }
                .result()
                .map_err(|e| driver("recording an event", e))?;
            unsafe { sys::cuEventSynchronize(ev[1]) }
                .result()
                .map_err(|e| driver("waiting for an event", e))?;
            let mut ms = 0.0f32;
            unsafe { sys::cuEventElapsedTime_v2(&mut ms, ev[0], ev[1]) }
                .result()
                .map_err(|e| driver("reading an event time", e))?;
            Ok((r, ms as f64 * 1e-3))
        })();
        destroy(ev);
        run
    }

    /// The kernel stream, for libraries that launch on it (cuBLASLt).
    pub fn stream_raw(&self) -> sys::CUstream {
        self.stream
    }

    /// Binds this GPU's context to the calling thread (before a library call on it).
    pub fn make_current(&self) -> CudaResult<()> {
        self.bind()
    }

    /// What a launch on the kernel stream by someone else (a library) is followed by: a
    /// synchronisation reporting its errors, unless a graph is being captured.
    pub fn after_launch(&self, what: &str) -> CudaResult<()> {
        if self.capturing.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.synchronize()
            .map_err(|e| CudaError(format!("running {what}: {e}")))
    }

    /// Waits for the kernel stream.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: the stream belongs to this context.
        unsafe { sys::cuStreamSynchronize(self.stream) }
            .result()
            .map_err(|e| driver("synchronising", e))
    }

    /// Starts recording the kernel stream's launches into a graph (nothing runs until
    /// [`Cuda::launch_graph`]). No copies or synchronisation may happen on this thread until
    /// [`Cuda::end_capture`].
    pub fn begin_capture(&self) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: the stream belongs to this context; thread-local mode: other threads'
        // unrelated work is not disturbed.
        unsafe {
            sys::cuStreamBeginCapture_v2(
                self.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .result()
        .map_err(|e| driver("beginning a graph capture", e))?;
        self.capturing.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(self: &Arc<Self>) -> CudaResult<CudaGraph> {
        self.bind()?;
        self.capturing.store(false, Ordering::Relaxed);
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun on this stream.
        unsafe { sys::cuStreamEndCapture(self.stream, &mut graph) }
            .result()
            .map_err(|e| driver("ending a graph capture", e))?;
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: `graph` was just captured in this context.
        if let Err(e) = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result() {
            // SAFETY: destroyed once, not used after.
            unsafe {
                let _ = sys::cuGraphDestroy(graph);
            }
            return Err(driver("instantiating a graph", e));
        }
        Ok(CudaGraph {
            graph,
            exec,
            cuda: self.clone(),
        })
    }

    /// Runs a captured graph on the kernel stream and waits for it.
    pub fn launch_graph(&self, g: &CudaGraph) -> CudaResult<()> {
        self.bind()?;
        // SAFETY: the graph was instantiated in this context.
        unsafe { sys::cuGraphLaunch(g.exec, self.stream) }
            .result()
            .map_err(|e| driver("launching a graph", e))?;
        self.synchronize()
    }

    fn lookup(&self, module: &str, name: &str) -> CudaResult<sys::CUfunction> {
        let m = match self.modules.iter().find(|(s, _)| *s == module) {
            Some((_, Module::Loaded(m))) => *m,
            Some((_, Module::Skipped(why))) => {
                return Err(CudaError(format!(
                    "{name}: kernels/{module}.cu has no code {} (sm_{}{}) can run ({why})",
                    self.name, self.cc.0, self.cc.1
                )))
            }
            None => {
                return Err(CudaError(format!(
                    "{name}: no kernels/{module}.cu in this build's fatbins"
                )))
            }
        };
        let c = CString::new(name).map_err(|_| CudaError("kernel name with a NUL".into()))?;
        // SAFETY: m is a module loaded in this context (bound by the caller).
        unsafe { result::module::get_function(m, c) }
            .map_err(|e| driver(&format!("no kernel {name} in kernels/{module}.cu"), e))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // SAFETY: created in open, destroyed once.
            unsafe {
                let _ = sys::cuStreamDestroy_v2(self.stream);
            }
            for (_, m) in &self.modules {
                if let Module::Loaded(m) = m {
                    // SAFETY: loaded in this context, unloaded once.
                    let _ = unsafe { result::module::unload(*m) };
                }
            }
        }
    }
}
