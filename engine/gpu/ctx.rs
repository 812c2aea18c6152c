//! The context a device forward is written against: buffers by name and size, the typed
//! launchers on [`Ctx::dev`], and slices of the buffers for them.
//!
//! The protocol (ggml-alloc's measure, then allocate):
//!
//! ```ignore
//! let mut ctx = Ctx::measure(arch);          // nothing is allocated, nothing runs
//! model.forward(&mut ctx, ...)?;             // records buffers and the launches using them
//! let plan = ctx.finish();                   // offsets by liveness: MemoryPlan
//! let mut ctx = Ctx::run(dev, plan)?;        // one arena + one persistent block
//! model.forward(&mut ctx, ...)?;             // the same code, now launching
//! ```
//!
//! A forward is split into phases ([`Ctx::phase`]): e.g. "text" once per generation and
//! "step" once per denoising step. Temporaries ([`Ctx::temp`]) live within their phase and
//! share the one arena (sized for the largest phase); persistent buffers
//! ([`Ctx::persistent`]: the cross-attention K/V made once per generation) live as long as
//! the context. When running, every request must match the plan's at the same place in the
//! phase (name, size, kind): a run allocates exactly what the plan says.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;

use super::plan::{assign, Lifetime, ALIGN};
use crate::error::{Error, Result};
use crate::kernels::{Arch, DevPtr, DevSlice, DeviceMem, Elem, KernelDevice, Recorder};

/// A buffer of the context: an id, an element offset and a length (Copy; a sub-view such as
/// Q of a fused QKV buffer is the same buffer at an offset).
pub struct View<T> {
    id: u32,
    offset: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for View<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for View<T> {}

impl<T> std::fmt::Debug for View<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "View(buffer {}, {}..+{})",
            self.id, self.offset, self.len
        )
    }
}

impl<T> View<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements start..start + len of this view.
    pub fn sub(self, start: usize, len: usize) -> Result<Self> {
        if start.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::invalid(format!(
                "sub-view {start}..+{len} of a view of {}",
                self.len
            )));
        }
        Ok(View {
            offset: self.offset + start,
            len,
            ..self
        })
    }
}

/// Temporary (arena, by liveness) or persistent (for the context's life).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Temp,
    Persistent,
}

/// One buffer of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub name: String,
    pub bytes: usize,
    pub kind: Kind,
    pub phase: String,
    /// Operations (within the phase) that first and last touch it.
    pub first: usize,
    pub last: usize,
    /// In the arena (temporaries) or the persistent block.
    pub offset: usize,
}

/// What a measured forward needs: every buffer with its place, the arena (the largest
/// phase's peak) and the persistent block.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPlan {
    pub arch: String,
    pub buffers: Vec<Planned>,
    pub phases: Vec<String>,
    /// Arena bytes each phase needs (the arena is their maximum).
    pub phase_peaks: Vec<usize>,
    pub arena_bytes: usize,
    pub persistent_bytes: usize,
    /// Launches recorded per phase.
    pub launches: Vec<usize>,
}

impl MemoryPlan {
    /// The `n` largest buffers, largest first.
    pub fn largest(&self, n: usize) -> Vec<&Planned> {
        let mut v: Vec<&Planned> = self.buffers.iter().collect();
        v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
        v.truncate(n);
        v
    }
}

struct Request {
    name: String,
    bytes: usize,
    kind: Kind,
    phase: usize,
    /// The phase's launch count when the buffer was asked for.
    created: usize,
}

// One State per Ctx (a session's lifetime): the size of its larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum State {
    Measuring {
        recorder: Arc<Recorder>,
        requests: Vec<Request>,
        /// (phase name, index of its first request, launches before it)
        phases: Vec<(String, usize, usize)>,
    },
    Running {
        plan: MemoryPlan,
        arena: Option<DeviceMem>,
        persistent: Option<DeviceMem>,
        /// The address of every planned buffer.
        addrs: Vec<u64>,
        /// The next request of the current phase.
        cursor: usize,
        phase: Option<usize>,
    },
}

/// See the module docs.
pub struct Ctx {
    dev: KernelDevice,
    state: State,
    /// Captured CUDA graphs by key, with the stamp they were captured for (e.g. the weights'
    /// address: another set of weights needs another graph).
    graphs: std::collections::HashMap<String, (u64, crate::cuda::CudaGraph)>,
}

/// Closes an NVTX range when dropped.
pub struct Range(bool);

impl Drop for Range {
    fn drop(&mut self) {
        if self.0 {
            crate::cuda::nvtx_pop();
        }
    }
}

/// Whether steps are captured as CUDA graphs (REEL_CUDA_GRAPHS=0 turns it off).
fn graphs_enabled() -> bool {
    std::env::var("REEL_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

fn aligned(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

impl Ctx {
    /// A measuring context checking launches against `arch`'s limits.
    pub fn measure(arch: Arch) -> Ctx {
        let recorder = Arc::new(Recorder::new(arch));
        Ctx {
            dev: KernelDevice::Measure(recorder.clone()),
            state: State::Measuring {
                recorder,
                requests: Vec::new(),
                phases: Vec::new(),
            },
            graphs: Default::default(),
        }
    }

    /// A running context on `dev`: allocates the plan's arena and persistent block.
    pub fn run(dev: KernelDevice, plan: MemoryPlan) -> Result<Ctx> {
        if matches!(dev, KernelDevice::Measure(_)) {
            return Err(Error::invalid("Ctx::run needs a device that runs kernels"));
        }
        let arena = match plan.arena_bytes {
            0 => None,
            n => Some(DeviceMem::new(&dev, n)?),
        };
        let persistent = match plan.persistent_bytes {
            0 => None,
            n => Some(DeviceMem::new(&dev, n)?),
        };
        let addrs = plan
            .buffers
            .iter()
            .map(|b| {
                let base = match b.kind {
                    Kind::Temp => &arena,
                    Kind::Persistent => &persistent,
                };
                base.as_ref().map(|m| m.ptr().0).unwrap_or(0) + b.offset as u64
            })
            .collect();
        Ok(Ctx {
            dev,
            state: State::Running {
                plan,
                arena,
                persistent,
                addrs,
                cursor: 0,
                phase: None,
            },
            graphs: Default::default(),
        })
    }

    /// An NVTX range around what follows until the guard drops (cuda only; nsys shows it).
    pub fn range(&self, name: &str) -> Range {
        if self.dev.is_cuda() {
            crate::cuda::nvtx_push(name);
            Range(true)
        } else {
            Range(false)
        }
    }

    /// Runs `body` (launches only: no copies, no synchronisation). On cuda, the first call
    /// for `key` captures it as a CUDA graph, later calls with the same `stamp` replay the
    /// graph without running `body` (its buffers have the same addresses every time: the
    /// plan's). Elsewhere, or with REEL_CUDA_GRAPHS=0 or `eager`, it just runs `body`.
    pub fn graph(
        &mut self,
        key: &str,
        stamp: u64,
        eager: bool,
        body: impl FnOnce(&mut Ctx) -> Result<()>,
    ) -> Result<()> {
        let cuda = match &self.dev {
            KernelDevice::Cuda(c) if !self.is_measuring() && !eager && graphs_enabled() => {
                c.clone()
            }
            _ => return body(self),
        };
        if let Some((s, g)) = self.graphs.get(key) {
            if *s == stamp {
                let _r = self.range(key);
                return cuda
                    .launch_graph(g)
                    .map_err(|e| Error::Device(e.to_string()));
            }
        }
        self.graphs.remove(key);
        cuda.begin_capture()
            .map_err(|e| Error::Device(e.to_string()))?;
        let ran = body(self);
        let graph = cuda.end_capture();
        ran?;
        let graph = graph.map_err(|e| Error::Device(e.to_string()))?;
        {
            let _r = self.range(key);
            cuda.launch_graph(&graph)
                .map_err(|e| Error::Device(e.to_string()))?;
        }
        self.graphs.insert(key.to_string(), (stamp, graph));
        Ok(())
    }

    /// The device to launch on (the measuring device while measuring).
    pub fn dev(&self) -> &KernelDevice {
        &self.dev
    }

    pub fn is_measuring(&self) -> bool {
        matches!(self.state, State::Measuring { .. })
    }

    /// Bytes this context allocated (arena + persistent block; 0 while measuring).
    pub fn allocated_bytes(&self) -> usize {
        match &self.state {
            State::Measuring { .. } => 0,
            State::Running {
                arena, persistent, ..
            } => {
                arena.as_ref().map_or(0, |m| m.bytes())
                    + persistent.as_ref().map_or(0, |m| m.bytes())
            }
        }
    }

    /// Starts phase `name`: its temporaries replace the previous phase's in the arena. While
    /// running, a phase may be entered again (a step per denoising step); it then asks for
    /// the same buffers in the same order.
    pub fn phase(&mut self, name: &str) -> Result<()> {
        match &mut self.state {
            State::Measuring {
                recorder,
                requests,
                phases,
            } => {
                if phases.iter().any(|p| p.0 == name) {
                    return Err(Error::invalid(format!(
                        "measuring: phase {name:?} measured twice"
                    )));
                }
                let launches = recorder.len();
                phases.push((name.to_string(), requests.len(), launches));
                Ok(())
            }
            State::Running {
                plan,
                cursor,
                phase,
                ..
            } => {
                let p =
                    plan.phases.iter().position(|p| p == name).ok_or_else(|| {
                        Error::invalid(format!("phase {name:?} is not in the plan"))
                    })?;
                *cursor = plan
                    .buffers
                    .iter()
                    .position(|b| b.phase == name)
                    .unwrap_or(plan.buffers.len());
                *phase = Some(p);
                Ok(())
            }
        }
    }

    fn request(&mut self, name: &str, bytes: usize, kind: Kind) -> Result<u32> {
        match &mut self.state {
            State::Measuring {
                recorder,
                requests,
                phases,
            } => {
                let Some(phase) = phases.len().checked_sub(1) else {
                    return Err(Error::invalid(format!(
                        "buffer {name}: asked for before any phase"
                    )));
                };
                requests.push(Request {
                    name: name.to_string(),
                    bytes,
                    kind,
                    phase,
                    created: recorder.len(),
                });
                Ok((requests.len() - 1) as u32)
            }
            State::Running {
                plan,
                cursor,
                phase,
                ..
            } => {
                let phase_name = match phase {
                    Some(p) => &plan.phases[*p],
                    None => {
                        return Err(Error::invalid(format!(
                            "buffer {name}: asked for before any phase"
                        )))
                    }
                };
                let id = *cursor;
                match plan.buffers.get(id) {
                    Some(b)
                        if b.name == name
                            && b.bytes == bytes
                            && b.kind == kind
                            && &b.phase == phase_name =>
                    {
                        *cursor += 1;
                        Ok(id as u32)
                    }
                    other => Err(Error::invalid(format!(
                        "buffer {name} ({bytes} bytes, {kind:?}, phase {phase_name}) differs from the plan's {}",
                        other
                            .map(|b| format!("{} ({} bytes, {:?}, phase {})", b.name, b.bytes, b.kind, b.phase))
                            .unwrap_or_else(|| "end".into())
                    ))),
                }
            }
        }
    }

    /// A temporary of `len` elements, alive within the current phase.
    pub fn temp<T: Elem>(&mut self, name: &str, len: usize) -> Result<View<T>> {
        let id = self.request(name, len * std::mem::size_of::<T>(), Kind::Temp)?;
        Ok(View {
            id,
            offset: 0,
            len,
            _t: PhantomData,
        })
    }

    /// A buffer of `len` elements alive as long as the context.
    pub fn persistent<T: Elem>(&mut self, name: &str, len: usize) -> Result<View<T>> {
        let id = self.request(name, len * std::mem::size_of::<T>(), Kind::Persistent)?;
        Ok(View {
            id,
            offset: 0,
            len,
            _t: PhantomData,
        })
    }

    /// The memory of `v`, for a launcher.
    pub fn slice<T>(&self, v: View<T>) -> DevSlice<'_, T> {
        match &self.state {
            State::Measuring { .. } => Recorder::slice(v.id, v.offset, v.len),
            State::Running { addrs, .. } => {
                let p = DevPtr(addrs[v.id as usize]).offset(v.offset * std::mem::size_of::<T>());
                // SAFETY: addrs[id] is the planned place of buffer id inside this context's
                // arena or persistent block, which hold the planned bytes (the request matched
                // the plan's size) and live as long as `self`, which the slice borrows.
                unsafe { DevSlice::from_raw(p, v.len, self.dev.key()) }
            }
        }
    }

    /// Copies host data into `v` (not inside a step on cuda: outside the graph).
    pub fn upload<T: Elem>(&mut self, v: View<T>, data: &[T]) -> Result<()> {
        if data.len() != v.len {
            return Err(Error::invalid(format!(
                "upload of {} elements into a view of {}",
                data.len(),
                v.len
            )));
        }
        match &mut self.state {
            State::Measuring { recorder, .. } => {
                recorder.record("upload", vec![v.id]);
                Ok(())
            }
            State::Running {
                plan,
                arena,
                persistent,
                ..
            } => {
                let b = &plan.buffers[v.id as usize];
                let mem = match b.kind {
                    Kind::Temp => arena,
                    Kind::Persistent => persistent,
                }
                .as_mut()
                .ok_or_else(|| Error::invalid("upload into an empty plan"))?;
                mem.write(b.offset + v.offset * std::mem::size_of::<T>(), data)
            }
        }
    }

    /// The contents of `v`, copied to the host (a synchronisation: not inside a step).
    pub fn download<T: Elem>(&mut self, v: View<T>) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); v.len];
        match &mut self.state {
            State::Measuring { recorder, .. } => recorder.record("download", vec![v.id]),
            State::Running {
                plan,
                arena,
                persistent,
                ..
            } => {
                let b = &plan.buffers[v.id as usize];
                let mem = match b.kind {
                    Kind::Temp => arena,
                    Kind::Persistent => persistent,
                }
                .as_ref()
                .ok_or_else(|| Error::invalid("download from an empty plan"))?;
                mem.read(b.offset + v.offset * std::mem::size_of::<T>(), &mut out)?;
            }
        }
        Ok(out)
    }

    /// Ends measuring: lifetimes from the recorded launches, offsets by liveness.
    pub fn finish(self) -> Result<MemoryPlan> {
        let State::Measuring {
            recorder,
            requests,
            phases,
        } = self.state
        else {
            return Err(Error::invalid("finish: this context was not measuring"));
        };
        let launches = recorder.take();
        let n = requests.len();
        // First and last launch touching each buffer (global launch indices).
        let mut first = vec![usize::MAX; n];
        let mut last = vec![0usize; n];
        for (i, (_, bufs)) in launches.iter().enumerate() {
            for &b in bufs {
                let b = b as usize;
                if b < n {
                    first[b] = first[b].min(i);
                    last[b] = last[b].max(i);
                }
            }
        }
        let phase_start = |p: usize| phases[p].2;
        let phase_end = |p: usize| phases.get(p + 1).map_or(launches.len(), |q| q.2);
        let mut buffers = Vec::with_capacity(n);
        let mut lifetimes: Vec<Vec<(usize, Lifetime)>> = vec![Vec::new(); phases.len()];
        let mut persistent_bytes = 0usize;
        for (i, r) in requests.iter().enumerate() {
            // Never touched: alive at its creation only (still allocated: the run asks for it).
            let used = first[i] != usize::MAX;
            let (f, l) = if used {
                (first[i], last[i])
            } else {
                (r.created, r.created)
            };
            if r.kind == Kind::Temp && used && (f < phase_start(r.phase) || l >= phase_end(r.phase))
            {
                return Err(Error::invalid(format!(
                    "temporary {} of phase {} is used outside its phase (make it persistent)",
                    r.name, phases[r.phase].0
                )));
            }
            let offset = match r.kind {
                Kind::Persistent => {
                    let o = persistent_bytes;
                    persistent_bytes += aligned(r.bytes.max(1));
                    o
                }
                Kind::Temp => {
                    lifetimes[r.phase].push((
                        i,
                        Lifetime {
                            bytes: r.bytes,
                            first: f,
                            last: l,
                        },
                    ));
                    0
                }
            };
            buffers.push(Planned {
                name: r.name.clone(),
                bytes: r.bytes,
                kind: r.kind,
                phase: phases[r.phase].0.clone(),
                first: f - phase_start(r.phase),
                last: l - phase_start(r.phase),
                offset,
            });
        }
        let mut phase_peaks = Vec::with_capacity(phases.len());
        for lts in &lifetimes {
            let only: Vec<Lifetime> = lts.iter().map(|x| x.1).collect();
            let (offsets, peak) = assign(&only);
            for ((i, _), o) in lts.iter().zip(offsets) {
                buffers[*i].offset = o;
            }
            phase_peaks.push(peak);
        }
        Ok(MemoryPlan {
            arch: match &self.dev {
                KernelDevice::Measure(r) => r.arch().to_string(),
                _ => String::new(),
            },
            buffers,
            arena_bytes: phase_peaks.iter().copied().max().unwrap_or(0),
            phase_peaks,
            phases: phases.iter().map(|p| p.0.clone()).collect(),
            persistent_bytes,
            launches: (0..phases.len())
                .map(|p| phase_end(p) - phase_start(p))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{self as k, Arch};

    /// A toy forward: y = gelu(x) through two temporaries, a persistent output.
    fn forward(ctx: &mut Ctx, n: usize) -> Result<View<f32>> {
        ctx.phase("step")?;
        let out = ctx.persistent::<f32>("out", n)?;
        let a = ctx.temp::<f32>("a", n)?;
        ctx.upload(a, &vec![1.0; n])?;
        let b = ctx.temp::<f32>("b", n)?;
        k::gelu_tanh_f32(ctx.dev(), ctx.slice(a), ctx.slice(b))?;
        k::gelu_tanh_f32(ctx.dev(), ctx.slice(b), ctx.slice(out))?;
        Ok(out)
    }

    #[test]
    fn a_run_allocates_the_plan_and_asks_for_what_it_measured() {
        let mut m = Ctx::measure(Arch::SM90);
        forward(&mut m, 1000).unwrap();
        let plan = m.finish().unwrap();
        // a (first use: upload, last: first gelu) and b (both gelus) overlap: 2 buffers.
        assert_eq!(plan.arena_bytes, 2 * 4096);
        assert_eq!(plan.persistent_bytes, 4096);
        let mut ctx = Ctx::run(KernelDevice::Emu, plan.clone()).unwrap();
        assert_eq!(ctx.allocated_bytes(), 3 * 4096);
        let out = forward(&mut ctx, 1000).unwrap();
        let g = 0.841_191_9f32; // gelu_tanh(1)
        let want = 0.5 * g * (1.0 + (0.797_884_6 * (g + 0.044715 * g * g * g)).tanh());
        assert!(ctx
            .download(out)
            .unwrap()
            .iter()
            .all(|v| (v - want).abs() < 1e-5));
        // Twice more: the phase asks for the same buffers again.
        forward(&mut ctx, 1000).unwrap();
        // Another size than measured is refused, naming the buffer.
        let mut ctx = Ctx::run(KernelDevice::Emu, plan).unwrap();
        let e = forward(&mut ctx, 999).unwrap_err().to_string();
        assert!(
            e.contains("out") && e.contains("differs from the plan"),
            "{e}"
        );
    }

    #[test]
    fn a_temporary_used_after_its_phase_is_refused() {
        let mut m = Ctx::measure(Arch::SM90);
        m.phase("one").unwrap();
        let a = m.temp::<f32>("a", 10).unwrap();
        m.phase("two").unwrap();
        m.upload(a, &[0.0; 10]).unwrap();
        let e = m.finish().unwrap_err().to_string();
        assert!(e.contains("used outside its phase"), "{e}");
    }
}
