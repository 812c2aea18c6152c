//! Memory of the kernel devices: [`DeviceMem`] (raw bytes on a device), [`Buf`] (a typed,
//! owned allocation, for tests and persistent tensors) and [`DevSlice`] (a typed range of
//! device memory borrowed from its owner: what launchers take, so a kernel can run on a
//! [`Buf`], on a slice of one, or on a view into the GPU runtime's arena alike).
//!
//! emu memory is host memory from the global allocator, 256-byte aligned like a cudaMalloc,
//! and only ever reached through raw pointers (the emulated kernels write it), never through
//! Rust references. In measuring mode (the GPU runtime's planning pass) nothing is allocated:
//! addresses encode a buffer id and an offset, and launches only record which buffers they
//! touch.

use std::alloc::Layout;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use super::{DevPtr, KernelDevice};
use crate::cuda::Cuda;
use crate::error::{Error, Result};

/// Element types of kernel buffers.
pub trait Elem: bytemuck::Pod + Send + Sync {}
impl Elem for f32 {}
impl Elem for i32 {}
impl Elem for u32 {}
impl Elem for u8 {}
impl Elem for half::bf16 {}
impl Elem for half::f16 {}

/// The 16-bit storage types tensor-core kernels are compiled for (bf16 and f16; f32 math).
pub trait Half: Elem + Copy + PartialEq + std::fmt::Debug {
    /// Which of the two (kernel variants are chosen by it).
    const F16: bool;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl Half for half::bf16 {
    const F16: bool = false;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}
impl Half for half::f16 {
    const F16: bool = true;
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// The alignment of every allocation (cudaMalloc gives at least 256 bytes).
pub const ALIGN: usize = 256;

/// Measuring-mode addresses: (buffer id + 1) << MEASURE_SHIFT | byte offset.
pub(crate) const MEASURE_SHIFT: u32 = 40;

enum Owner {
    Host(Layout),
    Cuda(Arc<Cuda>),
}

/// The device memory of one owner (a pipeline on a device), counted apart from the rest of
/// the process: allocations made on a thread while its [`MemTracker::enter`] guard lives are
/// charged to it, and released to it whichever thread frees them.
#[derive(Debug, Default)]
pub struct MemTracker {
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

impl MemTracker {
    pub fn new() -> Arc<Self> {
        Arc::new(MemTracker::default())
    }

    /// Bytes charged to this tracker and held now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Relaxed)
    }

    /// The most held at once since the last [`reset_peak`](Self::reset_peak).
    pub fn peak(&self) -> usize {
        self.peak.load(Relaxed)
    }

    pub fn reset_peak(&self) {
        self.peak.store(self.in_use.load(Relaxed), Relaxed);
    }

    /// Charges this thread's device allocations to the tracker until the guard drops.
    pub fn enter(self: &Arc<Self>) -> TrackGuard {
        let prev = TRACKER.with(|t| t.replace(Some(self.clone())));
        TrackGuard { prev }
    }

    fn charge(&self, bytes: usize) {
        let now = self.in_use.fetch_add(bytes, Relaxed) + bytes;
        self.peak.fetch_max(now, Relaxed);
    }
}

/// Restores the thread's previous tracker (none, or an outer one) when dropped.
pub struct TrackGuard {
    prev: Option<Arc<MemTracker>>,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        let prev = self.prev.take();
        TRACKER.with(|t| *t.borrow_mut() = prev);
    }
}

thread_local! {
    static TRACKER: std::cell::RefCell<Option<Arc<MemTracker>>> = const { std::cell::RefCell::new(None) };
}

/// Charges an allocation to the thread's tracker, if any (returned, to release it to).
/// Every device allocation reel makes goes through [`DeviceMem`] (arenas, persistent buffers,
/// weights, the VAE's and umT5's buffers, cuBLASLt's workspace), so a tracker sees all of
/// them, without the CUDA context's own overhead.
fn count_alloc(bytes: usize) -> Option<Arc<MemTracker>> {
    let t = TRACKER.with(|t| t.borrow().clone());
    if let Some(t) = &t {
        t.charge(bytes);
    }
    t
}

/// Raw bytes on a kernel device, freed on drop.
pub struct DeviceMem {
    ptr: u64,
    bytes: usize,
    owner: Owner,
    tracker: Option<Arc<MemTracker>>,
}

// SAFETY: the memory is reached only through raw pointers by kernels and by the
// upload/download methods, which take &self / &mut self as the owner's borrow allows.
unsafe impl Send for DeviceMem {}
unsafe impl Sync for DeviceMem {}

impl DeviceMem {
    /// `bytes` (at least 1) of uninitialised memory on `dev`.
    pub fn new(dev: &KernelDevice, bytes: usize) -> Result<Self> {
        match dev {
            KernelDevice::Emu => {
                let layout = Layout::from_size_align(bytes.max(1), ALIGN)
                    .map_err(|_| Error::invalid(format!("cannot allocate {bytes} bytes")))?;
                // SAFETY: the layout has a non-zero size.
                let p = unsafe { std::alloc::alloc(layout) };
                if p.is_null() {
                    return Err(Error::Device(format!(
                        "emu: out of host memory allocating {bytes} bytes"
                    )));
                }
                Ok(DeviceMem {
                    ptr: p as u64,
                    bytes,
                    owner: Owner::Host(layout),
                    tracker: count_alloc(bytes),
                })
            }
            KernelDevice::Cuda(c) => {
                let ptr = c.alloc(bytes).map_err(|e| Error::Device(e.to_string()))?;
                Ok(DeviceMem {
                    ptr,
                    bytes,
                    owner: Owner::Cuda(c.clone()),
                    tracker: count_alloc(bytes),
                })
            }
            KernelDevice::Measure(_) => Err(Error::invalid(
                "measuring mode allocates nothing: persistent buffers are made on the real device",
            )),
        }
    }

    pub fn ptr(&self) -> DevPtr {
        DevPtr(self.ptr)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The key of the device this memory lives on ([`KernelDevice::key`]).
    pub fn device_key(&self) -> usize {
        match &self.owner {
            Owner::Host(_) => EMU_KEY,
            Owner::Cuda(c) => Arc::as_ptr(c) as usize,
        }
    }

    /// Copies `src` to byte `offset`.
    pub fn write<T: Elem>(&mut self, offset: usize, src: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(src);
        if offset.checked_add(n).is_none_or(|end| end > self.bytes) {
            return Err(Error::invalid(format!(
                "writing {n} bytes at {offset} into {} bytes",
                self.bytes
            )));
        }
        if n == 0 {
            return Ok(());
        }
        match &self.owner {
            // SAFETY: [offset, offset + n) lies inside the allocation (checked); the source
            // is a valid slice; no reference into the allocation exists.
            Owner::Host(_) => unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr() as *const u8,
                    (self.ptr as *mut u8).add(offset),
                    n,
                )
            },
            Owner::Cuda(c) => c
                .upload(self.ptr + offset as u64, src)
                .map_err(|e| Error::Device(e.to_string()))?,
        }
        Ok(())
    }

    /// Copies byte `offset` onwards into `dst`.
    pub fn read<T: Elem>(&self, offset: usize, dst: &mut [T]) -> Result<()> {
        let n = std::mem::size_of_val(dst);
        if offset.checked_add(n).is_none_or(|end| end > self.bytes) {
            return Err(Error::invalid(format!(
                "reading {n} bytes at {offset} from {} bytes",
                self.bytes
            )));
        }
        if n == 0 {
            return Ok(());
        }
        match &self.owner {
            // SAFETY: as in write; the destination is a valid mutable slice.
            Owner::Host(_) => unsafe {
                std::ptr::copy_nonoverlapping(
                    (self.ptr as *const u8).add(offset),
                    dst.as_mut_ptr() as *mut u8,
                    n,
                )
            },
            Owner::Cuda(c) => c
                .download(dst, self.ptr + offset as u64)
                .map_err(|e| Error::Device(e.to_string()))?,
        }
        Ok(())
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        if let Some(t) = &self.tracker {
            t.in_use.fetch_sub(self.bytes, Relaxed);
        }
        match &self.owner {
            // SAFETY: allocated with this layout by `new`, freed once.
            Owner::Host(layout) => unsafe { std::alloc::dealloc(self.ptr as *mut u8, *layout) },
            Owner::Cuda(c) => c.free(self.ptr),
        }
    }
}

/// The device key of emu memory (cuda devices use their Arc's address; see
/// [`KernelDevice::key`]).
pub(crate) const EMU_KEY: usize = 1;
/// The device key of measuring mode.
pub(crate) const MEASURE_KEY: usize = 2;

/// A typed allocation on a kernel device: host memory for emu, device memory for cuda.
pub struct Buf<T: Elem> {
    mem: DeviceMem,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Elem> Buf<T> {
    /// `n` uninitialised elements on `dev`.
    pub fn uninit(dev: &KernelDevice, n: usize) -> Result<Self> {
        let bytes = n
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::invalid(format!("{n} elements overflow")))?;
        Ok(Buf {
            mem: DeviceMem::new(dev, bytes)?,
            len: n,
            _t: PhantomData,
        })
    }

    /// A buffer on `dev` holding a copy of `data`.
    pub fn upload(dev: &KernelDevice, data: &[T]) -> Result<Self> {
        let mut b = Self::uninit(dev, data.len())?;
        b.mem.write(0, data)?;
        Ok(b)
    }

    /// `n` copies of `v` (a poison value for outputs, or zeros).
    pub fn filled(dev: &KernelDevice, n: usize, v: T) -> Result<Self> {
        Self::upload(dev, &vec![v; n])
    }

    /// Overwrites the contents with `data` (same length).
    pub fn write(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::invalid(format!(
                "writing {} elements into a buffer of {}",
                data.len(),
                self.len
            )));
        }
        self.mem.write(0, data)
    }

    /// The contents, copied to the host.
    pub fn download(&self) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        self.mem.read(0, &mut out)?;
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as a slice.
    pub fn slice(&self) -> DevSlice<'_, T> {
        DevSlice {
            ptr: self.mem.ptr(),
            len: self.len,
            device: self.mem.device_key(),
            _p: PhantomData,
        }
    }

    /// The address a kernel on `dev` uses, or an error if the buffer lives elsewhere.
    pub(crate) fn addr(&self, dev: &KernelDevice, what: &str) -> Result<DevPtr> {
        self.slice().addr(dev, what)
    }
}

/// A typed range of device memory, borrowed from its owner for 'a (a [`Buf`], or the GPU
/// runtime's arena). Launchers take these for inputs and outputs alike: device memory is
/// written by kernels, never through Rust references, so a shared borrow is what an output
/// needs too.
pub struct DevSlice<'a, T> {
    ptr: DevPtr,
    len: usize,
    device: usize,
    _p: PhantomData<&'a T>,
}

impl<T> Clone for DevSlice<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DevSlice<'_, T> {}

impl<T> std::fmt::Debug for DevSlice<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevSlice({:#x}, {} elements)", self.ptr.0, self.len)
    }
}

impl<'a, T> DevSlice<'a, T> {
    /// A slice of `len` elements at `ptr` on the device with key `device`.
    ///
    /// # Safety
    /// `ptr` must address `len` elements of T on that device that stay allocated for 'a
    /// (in measuring mode: an address of the runtime's encoding, never dereferenced).
    pub unsafe fn from_raw(ptr: DevPtr, len: usize, device: usize) -> Self {
        DevSlice {
            ptr,
            len,
            device,
            _p: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements start..start + len of this slice.
    pub fn sub(self, start: usize, len: usize) -> Result<Self> {
        if start.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::invalid(format!(
                "sub-slice {start}..+{len} of a slice of {}",
                self.len
            )));
        }
        Ok(DevSlice {
            ptr: self.ptr.offset(start * std::mem::size_of::<T>()),
            len,
            ..self
        })
    }

    /// The address for a kernel on `dev`, or an error naming `what` if the memory lives on
    /// another device.
    pub(crate) fn addr(self, dev: &KernelDevice, what: &str) -> Result<DevPtr> {
        if self.device != dev.key() {
            return Err(Error::invalid(format!(
                "{what}: the buffer is not on {}",
                dev.describe()
            )));
        }
        Ok(self.ptr)
    }
}

impl<'a, T: Elem> From<&'a Buf<T>> for DevSlice<'a, T> {
    fn from(b: &'a Buf<T>) -> Self {
        b.slice()
    }
}

impl<'a, T: Elem> From<&'a mut Buf<T>> for DevSlice<'a, T> {
    fn from(b: &'a mut Buf<T>) -> Self {
        b.slice()
    }
}

/// A typed slice of an optional buffer: `opt(Some(&b))`, `opt(None)`.
pub fn opt<'a, T: Elem>(b: Option<&'a Buf<T>>) -> Option<DevSlice<'a, T>> {
    b.map(Buf::slice)
}
