//! The Wan VAE on a kernel device (cuda or emu), through the GPU runtime ([`crate::gpu`]).
//! It walks the same layers as the CPU code (mod.rs), chunk by chunk in time as diffusers
//! does (decode: one latent frame per chunk; encode: the first frame, then 4 at a time).
//! What differs:
//!
//! - activations are f16 (or bf16) channel-last frames, f32 accumulation in every kernel
//!   (see [`DEFAULT_DTYPE`] for why f16); the convolutions are conv3d.cu's implicit GEMM,
//!   the norms `channel_rms_silu`, the
//!   mid-block's per-frame single-head attention the flash kernel (head_dim up to 384);
//! - nothing is concatenated or shuffled: a causal convolution gets its input as a table of
//!   frame pointers (its cache's frames, then the chunk's; a missing cache frame is a null
//!   pointer, read as zeros), the nearest 2× upsampling is folded into the next
//!   convolution's loads, the temporal upsample's frame shuffle is a pointer stride, and
//!   the residual adds are fused into the convolutions' epilogues;
//! - every causal cache lives in the plan's persistent block: two frames per causal
//!   convolution (the downsampler's time conv: one), sized once, refreshed by device copies.
//!   The arena holds one chunk's temporaries, so the peak does not depend on the number of
//!   frames.
//!
//! Phases (see [`crate::gpu::ctx`]): "caches" (the persistent cache frames, once), "first"
//! (the first chunk: 1 frame in, and the temporal upsamplers pass it through undoubled) and
//! "next" (every later chunk). A new sample forgets the caches' contents, not their memory.

use half::f16;

use super::{
    AttnBlock, Coder, Conv, Frames, Layer, Parts, ResBlock, Resample, WanVae, WanVaeConfig,
};
use crate::error::{Error, Result};
use crate::gpu::{Ctx, DeviceWeights, MemoryPlan, View, WDtype, WeightSpec};
use crate::kernels::conv3d::{conv3d, device_weights, ConvShape};
use crate::kernels::{self as k, Arch, AttnView, FlashShape, Half, KernelDevice};
use crate::weights::TensorEntry;

/// Encoder or decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Encode,
    Decode,
}

/// One device tensor: a convolution's weights in the kernel's layout ([co][kt·kh·kw][ci]
/// f16 or bf16), or an f32 vector (biases, norm gammas).
enum DevTensor<'a> {
    ConvWeight(&'a Conv),
    Vector(&'a TensorEntry),
}

fn conv_tensors<'a>(c: &'a Conv, out: &mut Vec<DevTensor<'a>>) {
    out.push(DevTensor::ConvWeight(c));
    out.push(DevTensor::Vector(&c.b));
}

fn coder_tensors<'a>(c: &'a Coder, out: &mut Vec<DevTensor<'a>>) {
    conv_tensors(&c.conv_in, out);
    for l in &c.layers {
        match l {
            Layer::Res(r) => {
                out.push(DevTensor::Vector(&r.norm1));
                conv_tensors(&r.conv1, out);
                out.push(DevTensor::Vector(&r.norm2));
                conv_tensors(&r.conv2, out);
                if let Some(s) = &r.shortcut {
                    conv_tensors(s, out);
                }
            }
            Layer::Attn(a) => {
                out.push(DevTensor::Vector(&a.norm));
                conv_tensors(&a.qkv, out);
                conv_tensors(&a.proj, out);
            }
            Layer::Resample(r) => match r {
                Resample::Up2d { conv } | Resample::Down2d { conv } => conv_tensors(conv, out),
                Resample::Up3d { time_conv, conv } | Resample::Down3d { conv, time_conv } => {
                    conv_tensors(time_conv, out);
                    conv_tensors(conv, out);
                }
            },
        }
    }
    out.push(DevTensor::Vector(&c.norm_out));
    conv_tensors(&c.conv_out, out);
}

/// The tensors one direction uses.
fn tensors<'a>(
    (encoder, decoder, quant, post_quant): (&'a Coder, &'a Coder, &'a Conv, &'a Conv),
    coding: Coding,
) -> Vec<DevTensor<'a>> {
    let mut v = Vec::new();
    match coding {
        Coding::Encode => {
            coder_tensors(encoder, &mut v);
            conv_tensors(quant, &mut v);
        }
        Coding::Decode => {
            conv_tensors(post_quant, &mut v);
            coder_tensors(decoder, &mut v);
        }
    }
    v
}

fn spec(t: &DevTensor, dtype: WDtype) -> WeightSpec {
    match t {
        DevTensor::ConvWeight(c) => WeightSpec {
            name: c.w.name.clone(),
            len: c.co * c.ci * c.k.iter().product::<usize>(),
            dtype,
        },
        DevTensor::Vector(e) => WeightSpec {
            name: e.name.clone(),
            len: e.numel(),
            dtype: WDtype::F32,
        },
    }
}

/// The storage type of the VAE's activations and convolution weights on a device unless
/// asked otherwise: f16. diffusers runs the Wan VAE in f32; bf16's 8-bit mantissa, rounded
/// at every one of the decoder's ~30 layers, drifts up to 2e-2 from it on the golden cases,
/// f16's 11 bits stay within 1e-2 (activations stay far inside f16's range: the norms keep
/// them near unit scale, and every kernel accumulates in f32).
pub const DEFAULT_DTYPE: WDtype = WDtype::F16;

/// The VAE's storage type from `REEL_VAE_DTYPE` (`f16` or `bf16`), else [`DEFAULT_DTYPE`].
pub fn dtype_from_env() -> Result<WDtype> {
    match std::env::var("REEL_VAE_DTYPE") {
        Err(_) => Ok(DEFAULT_DTYPE),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" => Ok(DEFAULT_DTYPE),
            "f16" | "fp16" | "float16" => Ok(WDtype::F16),
            "bf16" | "bfloat16" => Ok(WDtype::Bf16),
            other => Err(Error::invalid(format!(
                "REEL_VAE_DTYPE={other}: the VAE on a device stores f16 or bf16"
            ))),
        },
    }
}

fn check_dtype(dtype: WDtype) -> Result<()> {
    match dtype {
        WDtype::F16 | WDtype::Bf16 => Ok(()),
        WDtype::F32 => Err(Error::invalid(
            "the VAE on a kernel device stores f16 or bf16, not f32",
        )),
    }
}

/// The device tensors of a config for one direction, named as in the checkpoint; the
/// convolution weights in `dtype` (f16 or bf16).
pub fn device_weight_specs(
    config: &WanVaeConfig,
    coding: Coding,
    dtype: WDtype,
) -> Result<Vec<WeightSpec>> {
    check_dtype(dtype)?;
    let (e, d, q, p) = WanVae::parts_of(config)?;
    Ok(tensors((&e, &d, &q, &p), coding)
        .iter()
        .map(|t| spec(t, dtype))
        .collect())
}

/// The first convolution a direction runs (its weights' dtype is the session's).
fn first_conv(parts: (&Coder, &Coder, &Conv, &Conv), coding: Coding) -> String {
    match coding {
        Coding::Encode => parts.0.conv_in.w.name.clone(),
        Coding::Decode => parts.3.w.name.clone(),
    }
}

impl WanVae {
    fn parts(&self) -> (&Coder, &Coder, &Conv, &Conv) {
        (
            &self.encoder,
            &self.decoder,
            &self.quant_conv,
            &self.post_quant_conv,
        )
    }

    /// Uploads the weights one direction uses: convolutions in the kernel's layout in
    /// `dtype` (f16 or bf16, [`DEFAULT_DTYPE`] unless there is a reason), which the
    /// activations then use too; biases and norm gammas f32.
    pub fn upload(
        &self,
        dev: &KernelDevice,
        coding: Coding,
        dtype: WDtype,
    ) -> Result<DeviceWeights> {
        check_dtype(dtype)?;
        let ts = tensors(self.parts(), coding);
        let specs: Vec<WeightSpec> = ts.iter().map(|t| spec(t, dtype)).collect();
        let mut by_name = std::collections::HashMap::new();
        for t in &ts {
            by_name.insert(spec(t, dtype).name, t);
        }
        DeviceWeights::upload(dev, &specs, |s| {
            Ok(match by_name.get(&s.name) {
                Some(DevTensor::ConvWeight(c)) => device_weights(&self.w(&c.w)?, c.co, c.ci, c.k),
                Some(DevTensor::Vector(e)) => self.w(e)?.into_owned(),
                None => return Err(Error::invalid(format!("no VAE tensor {}", s.name))),
            })
        })
    }

    /// Decodes latents [B, z, T, h, w] on `dev` with weights from [`WanVae::upload`]
    /// (Decode), handing each chunk's frames (clamped to [-1, 1]) to `sink`, like
    /// [`WanVae::decode_to`].
    pub fn decode_on(
        &self,
        dev: &KernelDevice,
        w: &DeviceWeights,
        latents: &crate::Tensor,
        sink: &mut dyn super::FrameSink,
    ) -> Result<()> {
        match self.weights_dtype(w, Coding::Decode)? {
            WDtype::Bf16 => self.decode_as::<half::bf16>(dev, w, latents, sink),
            _ => self.decode_as::<f16>(dev, w, latents, sink),
        }
    }

    /// The storage type of weights uploaded for `coding`.
    fn weights_dtype(&self, w: &DeviceWeights, coding: Coding) -> Result<WDtype> {
        let name = first_conv(self.parts(), coding);
        w.dtype_of(&name).ok_or_else(|| {
            Error::invalid(format!(
                "these device weights have no {name}: upload them for the VAE {}",
                match coding {
                    Coding::Encode => "encoder",
                    Coding::Decode => "decoder",
                }
            ))
        })
    }

    fn decode_as<T: Half>(
        &self,
        dev: &KernelDevice,
        w: &DeviceWeights,
        latents: &crate::Tensor,
        sink: &mut dyn super::FrameSink,
    ) -> Result<()> {
        let c = &self.config;
        let [b, _, h, wd] = self.check_video(latents.shape(), c.z_dim, "decoder", "latents")?;
        let mut session = VaeSession::<T>::new(dev, c, Coding::Decode, (h, wd))?;
        for bi in 0..b {
            session.reset();
            session.decode_frames(w, latents, bi, sink)?;
        }
        Ok(())
    }

    /// A streaming decode on `dev` of latent frames of h × w (see
    /// [`DeviceStreamDecoder`]), in the weights' storage type.
    pub fn stream_decoder_on<'w>(
        &self,
        dev: &KernelDevice,
        w: &'w DeviceWeights,
        hw: (usize, usize),
    ) -> Result<DeviceStreamDecoder<'w>> {
        stream_decoder(dev, &self.config, w, hw)
    }

    /// Posterior mean of a video on `dev` with weights from [`WanVae::upload`] (Encode),
    /// like [`WanVae::encode`].
    pub fn encode_on(
        &self,
        dev: &KernelDevice,
        w: &DeviceWeights,
        sample: &crate::Tensor,
    ) -> Result<crate::Tensor> {
        match self.weights_dtype(w, Coding::Encode)? {
            WDtype::Bf16 => self.encode_as::<half::bf16>(dev, w, sample),
            _ => self.encode_as::<f16>(dev, w, sample),
        }
    }

    fn encode_as<T: Half>(
        &self,
        dev: &KernelDevice,
        w: &DeviceWeights,
        sample: &crate::Tensor,
    ) -> Result<crate::Tensor> {
        let c = &self.config;
        let [b, f, h, wd] = self.check_video(sample.shape(), c.in_channels, "encoder", "sample")?;
        super::check_encode_size(c, f, h, wd)?;
        let mut session = VaeSession::<T>::new(dev, c, Coding::Encode, (h, wd))?;
        let mut outs = Vec::with_capacity(b);
        for bi in 0..b {
            session.reset();
            let mut latent: Option<Frames> = None;
            let chunks = std::iter::once((0, 1)).chain((1..f).step_by(4).map(|s| (s, s + 4)));
            for (start, end) in chunks {
                let chunk = super::to_frames_range(sample, bi, start, end)?;
                let out = session.chunk(w, &chunk)?;
                latent = Some(match latent {
                    Some(l) => l.concat(&out),
                    None => out,
                });
            }
            outs.push(latent.ok_or_else(|| Error::invalid("no frames to encode"))?);
        }
        super::frames_to_tensor(&outs)
    }
}

enum AnyVaeSession {
    Bf16(VaeSession<half::bf16>),
    F16(VaeSession<f16>),
}

/// The device twin of [`super::StreamDecoder`]: one video's latents decoded as they come,
/// a push at a time, the causal caches (persistent in the session's plan) carried from
/// push to push.
pub struct DeviceStreamDecoder<'w> {
    session: AnyVaeSession,
    w: &'w DeviceWeights,
}

/// [`WanVae::stream_decoder_on`] for a config and weights alone (random weights made on the
/// device for a benchmark need no checkpoint).
pub fn stream_decoder<'w>(
    dev: &KernelDevice,
    c: &WanVaeConfig,
    w: &'w DeviceWeights,
    hw: (usize, usize),
) -> Result<DeviceStreamDecoder<'w>> {
    let parts = WanVae::parts_of(c)?;
    let name = first_conv((&parts.0, &parts.1, &parts.2, &parts.3), Coding::Decode);
    let session = match w.dtype_of(&name) {
        Some(WDtype::Bf16) => AnyVaeSession::Bf16(VaeSession::new(dev, c, Coding::Decode, hw)?),
        Some(_) => AnyVaeSession::F16(VaeSession::new(dev, c, Coding::Decode, hw)?),
        None => {
            return Err(Error::invalid(format!(
                "these device weights have no {name}: upload them for the VAE decoder"
            )))
        }
    };
    Ok(DeviceStreamDecoder { session, w })
}

impl DeviceStreamDecoder<'_> {
    /// Decodes latents [1, z, T, h, w] (not normalized) one latent frame at a time, handing
    /// each one's frames (clamped to [-1, 1]) to `sink` as sample 0.
    pub fn push(&mut self, latents: &crate::Tensor, sink: &mut dyn super::FrameSink) -> Result<()> {
        match &mut self.session {
            AnyVaeSession::Bf16(s) => s.decode_frames(self.w, latents, 0, sink),
            AnyVaeSession::F16(s) => s.decode_frames(self.w, latents, 0, sink),
        }
    }

    /// The decoder's plan (its arena and caches: the same for any length).
    pub fn plan(&self) -> &MemoryPlan {
        match &self.session {
            AnyVaeSession::Bf16(s) => s.plan(),
            AnyVaeSession::F16(s) => s.plan(),
        }
    }
}

/// Packed channel-last frames on the device: [t][h][w][c].
#[derive(Debug, Clone, Copy)]
struct Seq<T: Half> {
    v: View<T>,
    t: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl<T: Half> Seq<T> {
    fn frame_len(&self) -> usize {
        self.h * self.w * self.c
    }

    fn frame(&self, i: usize) -> Result<View<T>> {
        self.v.sub(i * self.frame_len(), self.frame_len())
    }

    fn frames(&self) -> Result<Vec<Option<View<T>>>> {
        (0..self.t).map(|i| self.frame(i).map(Some)).collect()
    }
}

/// A causal convolution's cache: its frame buffers and which of them hold entries 0 and 1
/// of the cached sequence (None: a zero frame, or nothing yet — the same to a causal
/// convolution, which pads with zeros).
#[derive(Debug, Clone)]
struct Slot<T: Half> {
    bufs: Vec<View<T>>,
    held: [Option<usize>; 2],
    /// The temporal upsampler has passed its first chunk (Wan's "Rep").
    started: bool,
}

/// Per cache slot: (elements per frame, frames), once known.
type CacheSizes = Vec<Option<(usize, usize)>>;

/// Every cache of one coder; `sizes` (frame elements and frames per slot) are learnt by a
/// first measuring pass in which each slot asks for its buffers when first used.
struct Caches<T: Half> {
    names: Vec<String>,
    slots: Vec<Option<Slot<T>>>,
    sizes: CacheSizes,
}

impl<T: Half> Caches<T> {
    fn new(names: &[String]) -> Self {
        Caches {
            names: names.to_vec(),
            slots: vec![None; names.len()],
            sizes: vec![None; names.len()],
        }
    }

    /// Asks `ctx` for every slot's buffers (sizes known).
    fn allocate(ctx: &mut Ctx, names: &[String], sizes: &[Option<(usize, usize)>]) -> Result<Self> {
        let mut c = Caches::new(names);
        for (i, s) in sizes.iter().enumerate() {
            if let Some((elems, n)) = *s {
                c.slots[i] = Some(Self::buffers(ctx, &names[i], elems, n)?);
                c.sizes[i] = Some((elems, n));
            }
        }
        Ok(c)
    }

    fn buffers(ctx: &mut Ctx, name: &str, elems: usize, n: usize) -> Result<Slot<T>> {
        let bufs = (0..n)
            .map(|j| ctx.persistent::<T>(&format!("cache {name} {j}"), elems))
            .collect::<Result<Vec<_>>>()?;
        Ok(Slot {
            bufs,
            held: [None, None],
            started: false,
        })
    }

    /// Forgets the contents (a new sample).
    fn reset(&mut self) {
        for s in self.slots.iter_mut().flatten() {
            s.held = [None, None];
            s.started = false;
        }
    }
}

/// One chunk's forward: the context, the weights and the caches.
struct Run<'a, T: Half> {
    ctx: &'a mut Ctx,
    w: &'a DeviceWeights,
    caches: &'a mut Caches<T>,
}

fn prefix(c: &Conv) -> &str {
    c.w.name.strip_suffix(".weight").unwrap_or(&c.w.name)
}

impl<T: Half> Run<'_, T> {
    /// The slot of a causal convolution, with buffers of `elems` (`n` frames).
    fn slot(&mut self, conv: &Conv, elems: usize, n: usize) -> Result<usize> {
        let i = conv
            .slot
            .ok_or_else(|| Error::invalid(format!("internal: {} has no cache", prefix(conv))))?;
        match self.caches.sizes[i] {
            Some(s) if s == (elems, n) => {}
            Some(s) => {
                return Err(Error::invalid(format!(
                    "internal: cache {} sized {s:?}, asked for ({elems}, {n})",
                    self.caches.names[i]
                )))
            }
            None if self.ctx.is_measuring() => {
                let name = self.caches.names[i].clone();
                self.caches.slots[i] = Some(Caches::buffers(self.ctx, &name, elems, n)?);
                self.caches.sizes[i] = Some((elems, n));
            }
            None => {
                return Err(Error::invalid(format!(
                    "internal: cache {} is not in the plan",
                    self.caches.names[i]
                )))
            }
        }
        Ok(i)
    }

    fn slot_mut(&mut self, i: usize) -> Result<&mut Slot<T>> {
        self.caches.slots[i]
            .as_mut()
            .ok_or_else(|| Error::invalid("internal: cache without buffers"))
    }

    /// The cached frames of slot i, as entries of a frame table.
    fn held(&mut self, i: usize) -> Result<Vec<Option<View<T>>>> {
        let s = self.slot_mut(i)?;
        Ok(s.held.iter().map(|h| h.map(|j| s.bufs[j])).collect())
    }

    /// conv over a frame table of (h, w) frames at pixel stride ld, read 2× upsampled when
    /// `up`, plus `res`; at most 8 input frames per launch.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        cv: &Conv,
        frames: &[Option<View<T>>],
        (h, w): (usize, usize),
        ld: usize,
        up: bool,
        res: Option<View<T>>,
    ) -> Result<Seq<T>> {
        let shape = ConvShape {
            ld,
            up,
            ..ConvShape::new((h, w, cv.ci, cv.co), cv.k, cv.stride, cv.pad)
        };
        let (t, ho, wo) = shape
            .out_size(frames.len())
            .map_err(|e| Error::invalid(format!("{}: {e}", prefix(cv))))?;
        let fl = ho * wo * cv.co;
        let out = self.ctx.temp::<T>(prefix(cv), t * fl)?;
        let (kt, st) = (cv.k[0], cv.stride[0]);
        let per = (8 - kt) / st + 1; // output frames per launch
        let (wv, bv) = (self.w.half::<T>(&cv.w.name)?, self.w.f32(&cv.b.name)?);
        for g in (0..t).step_by(per) {
            let n = per.min(t - g);
            let ins: Vec<_> = frames[g * st..g * st + (n - 1) * st + kt]
                .iter()
                .map(|f| f.map(|v| self.ctx.slice(v)))
                .collect();
            let r = match res {
                Some(r) => Some(self.ctx.slice(r.sub(g * fl, n * fl)?)),
                None => None,
            };
            let o = self.ctx.slice(out.sub(g * fl, n * fl)?);
            conv3d(self.ctx.dev(), &ins, wv, bv, r, o, shape)
                .map_err(|e| Error::invalid(format!("{}: {e}", prefix(cv))))?;
        }
        Ok(Seq::<T> {
            v: out,
            t,
            h: ho,
            w: wo,
            c: cv.co,
        })
    }

    /// conv over packed frames.
    fn conv_seq(&mut self, cv: &Conv, x: Seq<T>, res: Option<View<T>>) -> Result<Seq<T>> {
        self.conv(cv, &x.frames()?, (x.h, x.w), x.c, false, res)
    }

    /// A cached causal convolution (time padding 2): the cache's two frames, then x's;
    /// the cache then keeps the last two frames of that sequence.
    fn cached_conv(&mut self, cv: &Conv, x: Seq<T>, res: Option<View<T>>) -> Result<Seq<T>> {
        let i = self.slot(cv, x.frame_len(), 2)?;
        let mut frames = self.held(i)?;
        frames.extend(x.frames()?);
        let y = self.conv(cv, &frames, (x.h, x.w), x.c, false, res)?;
        self.keep_last_two(i, x)?;
        Ok(y)
    }

    /// The cache of slot i becomes the last two frames of (cache, x).
    fn keep_last_two(&mut self, i: usize, x: Seq<T>) -> Result<()> {
        let held = self.slot_mut(i)?.held;
        let (src, held_new): (Vec<(usize, usize)>, [Option<usize>; 2]) = if x.t >= 2 {
            (vec![(x.t - 2, 0), (x.t - 1, 1)], [Some(0), Some(1)])
        } else {
            // Entry 1 stays (as entry 0); x's frame goes to the other buffer.
            let keep = held[1];
            let dst = if keep == Some(0) { 1 } else { 0 };
            (vec![(0, dst)], [keep, Some(dst)])
        };
        for (f, b) in src {
            let dst = self.slot_mut(i)?.bufs[b];
            let from = x.frame(f)?;
            k::copy(self.ctx.dev(), self.ctx.slice(from), self.ctx.slice(dst))?;
        }
        self.slot_mut(i)?.held = held_new;
        Ok(())
    }

    fn norm(
        &mut self,
        x: Seq<T>,
        gamma: &TensorEntry,
        silu: bool,
        in_place: bool,
    ) -> Result<Seq<T>> {
        let y = if in_place {
            x
        } else {
            Seq {
                v: self.ctx.temp::<T>(&gamma.name, x.v.len())?,
                ..x
            }
        };
        k::channel_rms_silu(
            self.ctx.dev(),
            self.ctx.slice(x.v),
            self.ctx.slice(y.v),
            x.c,
            self.w.f32(&gamma.name)?,
            silu,
        )?;
        Ok(y)
    }

    fn res_block(&mut self, r: &ResBlock, x: Seq<T>) -> Result<Seq<T>> {
        let shortcut = match &r.shortcut {
            Some(s) => self.conv_seq(s, x, None)?,
            None => x,
        };
        let n = self.norm(x, &r.norm1, true, false)?;
        let y = self.cached_conv(&r.conv1, n, None)?;
        let y = self.norm(y, &r.norm2, true, true)?;
        self.cached_conv(&r.conv2, y, Some(shortcut.v))
    }

    /// Single-head self-attention over each frame's pixels (no causal state).
    fn attn_block(&mut self, a: &AttnBlock, x: Seq<T>) -> Result<Seq<T>> {
        let c = x.c;
        let px = x.h * x.w;
        let n = self.norm(x, &a.norm, false, false)?;
        let qkv = self.conv_seq(&a.qkv, n, None)?; // [T, px, 3c]
        let o = Seq {
            v: self.ctx.temp::<T>("attention", x.v.len())?,
            ..x
        };
        let view = |off: usize| AttnView::packed(off, 3 * c, px);
        let q = self.ctx.slice(qkv.v);
        k::flash_attention(
            self.ctx.dev(),
            (q, view(0)),
            (q, view(c)),
            (q, view(2 * c)),
            (self.ctx.slice(o.v), AttnView::packed(0, c, px)),
            None,
            FlashShape {
                batch: x.t,
                heads: 1,
                head_dim: c,
                lq: px,
                lk: px,
                scale: 1.0 / (c as f32).sqrt(),
            },
        )?;
        self.conv_seq(&a.proj, o, Some(x.v))
    }

    fn resample(&mut self, r: &Resample, x: Seq<T>) -> Result<Seq<T>> {
        match r {
            Resample::Up2d { conv } => self.conv(conv, &x.frames()?, (x.h, x.w), x.c, true, None),
            Resample::Down2d { conv } => self.conv_seq(conv, x, None),
            Resample::Up3d { time_conv, conv } => {
                let i = self.slot(time_conv, x.frame_len(), 2)?;
                if !self.slot_mut(i)?.started {
                    // The first chunk is not doubled in time.
                    self.slot_mut(i)?.started = true;
                    return self.conv(conv, &x.frames()?, (x.h, x.w), x.c, true, None);
                }
                let mut frames = self.held(i)?;
                frames.extend(x.frames()?);
                let y = self.conv(time_conv, &frames, (x.h, x.w), x.c, false, None)?; // [T, h, w, 2c]
                self.keep_last_two(i, x)?;
                // Channels (2, c) become time: frame 2t is the first half of y's frame t,
                // 2t + 1 the second; read in place at pixel stride 2c.
                let c = x.c;
                let span = (x.h * x.w - 1) * 2 * c + c;
                let mut shuffled = Vec::with_capacity(2 * y.t);
                for t in 0..y.t {
                    for half in 0..2 {
                        shuffled.push(Some(y.v.sub(t * y.frame_len() + half * c, span)?));
                    }
                }
                self.conv(conv, &shuffled, (x.h, x.w), 2 * c, true, None)
            }
            Resample::Down3d { conv, time_conv } => {
                let x = self.conv_seq(conv, x, None)?;
                let i = self.slot(time_conv, x.frame_len(), 1)?;
                let y = if self.slot_mut(i)?.started {
                    // The previous chunk's last frame, then this chunk's.
                    let mut frames = self.held(i)?;
                    frames.truncate(1);
                    frames.extend(x.frames()?);
                    self.conv(time_conv, &frames, (x.h, x.w), x.c, false, None)?
                } else {
                    // The first chunk passes through.
                    self.slot_mut(i)?.started = true;
                    x
                };
                let dst = self.slot_mut(i)?.bufs[0];
                let last = x.frame(x.t - 1)?;
                k::copy(self.ctx.dev(), self.ctx.slice(last), self.ctx.slice(dst))?;
                self.slot_mut(i)?.held = [Some(0), None];
                Ok(y)
            }
        }
    }

    fn coder(&mut self, coder: &Coder, x: Seq<T>) -> Result<Seq<T>> {
        let mut x = self.cached_conv(&coder.conv_in, x, None)?;
        for layer in &coder.layers {
            x = match layer {
                Layer::Res(r) => self.res_block(r, x)?,
                Layer::Attn(a) => self.attn_block(a, x)?,
                Layer::Resample(r) => self.resample(r, x)?,
            };
        }
        let x = self.norm(x, &coder.norm_out, true, true)?;
        self.cached_conv(&coder.conv_out, x, None)
    }

    /// One chunk: `input` channel-last frames (t × h × w × c) → the result on the
    /// device.
    fn chunk(
        &mut self,
        parts: &Parts,
        coding: Coding,
        input: &[T],
        dims: [usize; 4],
    ) -> Result<Seq<T>> {
        let [t, h, w, c] = dims;
        let v = self.ctx.temp::<T>("input", input.len())?;
        self.ctx.upload(v, input)?;
        let x = Seq { v, t, h, w, c };
        let (encoder, decoder, quant, post_quant) = parts;
        match coding {
            Coding::Decode => {
                let x = self.conv_seq(post_quant, x, None)?;
                self.coder(decoder, x)
            }
            Coding::Encode => {
                let x = self.coder(encoder, x)?;
                self.conv_seq(quant, x, None)
            }
        }
    }
}

/// The frames of one chunk: (1 or 4) × (h, w) input, per direction.
fn chunk_dims(c: &WanVaeConfig, coding: Coding, (h, w): (usize, usize), first: bool) -> [usize; 4] {
    match coding {
        Coding::Decode => [1, h, w, c.z_dim],
        Coding::Encode => [if first { 1 } else { 4 }, h, w, c.in_channels],
    }
}

fn coder_of(parts: &Parts, coding: Coding) -> &Coder {
    match coding {
        Coding::Encode => &parts.0,
        Coding::Decode => &parts.1,
    }
}

/// The memory plan of a decode (latent frames of h × w) or an encode (frames of h × w
/// pixels) on `arch`: the caches, then one first and one later chunk, measured without
/// running anything. Returns the plan and the caches' sizes.
fn measure<T: Half>(
    c: &WanVaeConfig,
    coding: Coding,
    hw: (usize, usize),
    arch: Arch,
) -> Result<(MemoryPlan, CacheSizes)> {
    let parts = WanVae::parts_of(c)?;
    let w = DeviceWeights::measure(&device_weight_specs(c, coding, WDtype::half::<T>())?)?;
    let names = &coder_of(&parts, coding).slots;
    let chunks = |ctx: &mut Ctx, caches: &mut Caches<T>| -> Result<()> {
        for (phase, first) in [("first", true), ("next", false)] {
            ctx.phase(phase)?;
            let dims = chunk_dims(c, coding, hw, first);
            let input = vec![T::from_f32(0.0); dims.iter().product()];
            let mut run = Run { ctx, w: &w, caches };
            let y = run.chunk(&parts, coding, &input, dims)?;
            ctx.download(y.v)?;
        }
        Ok(())
    };
    // Pass 1: each cache asks for its buffers when first used, which gives their sizes.
    let mut ctx = Ctx::measure(arch);
    ctx.phase("caches")?;
    let mut caches = Caches::new(names);
    chunks(&mut ctx, &mut caches)?;
    let sizes = caches.sizes;
    // Pass 2: the caches up front, in their own phase, then the chunks.
    let mut ctx = Ctx::measure(arch);
    ctx.phase("caches")?;
    let mut caches = Caches::allocate(&mut ctx, names, &sizes)?;
    chunks(&mut ctx, &mut caches)?;
    Ok((ctx.finish()?, sizes))
}

/// The memory plan of a decode of latents with h × w frames (or an encode of h × w pixel
/// frames) on `arch` (f16 and bf16 take the same bytes).
pub fn plan(
    c: &WanVaeConfig,
    coding: Coding,
    hw: (usize, usize),
    arch: Arch,
) -> Result<MemoryPlan> {
    Ok(measure::<f16>(c, coding, hw, arch)?.0)
}

/// A VAE direction on a device for one frame size, activations stored as T (f16 or bf16,
/// as the weights): the plan, its allocations and the caches.
pub struct VaeSession<T: Half> {
    config: WanVaeConfig,
    parts: Parts,
    coding: Coding,
    hw: (usize, usize),
    plan: MemoryPlan,
    ctx: Ctx,
    caches: Caches<T>,
    chunks: usize,
}

impl<T: Half> VaeSession<T> {
    /// Plans `coding` at `hw` (latent frames for a decode, pixels for an encode) for `dev`
    /// and allocates what the plan says.
    pub fn new(
        dev: &KernelDevice,
        c: &WanVaeConfig,
        coding: Coding,
        hw: (usize, usize),
    ) -> Result<Self> {
        let (plan, sizes) = measure::<T>(c, coding, hw, dev.arch()?)?;
        let parts = WanVae::parts_of(c)?;
        let mut ctx = Ctx::run(dev.clone(), plan.clone())?;
        ctx.phase("caches")?;
        let caches = Caches::allocate(&mut ctx, &coder_of(&parts, coding).slots, &sizes)?;
        Ok(VaeSession {
            config: c.clone(),
            parts,
            coding,
            hw,
            plan,
            ctx,
            caches,
            chunks: 0,
        })
    }

    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Bytes the session allocated (the plan's arena + persistent bytes).
    pub fn allocated_bytes(&self) -> usize {
        self.ctx.allocated_bytes()
    }

    /// Starts a new sample: the caches are forgotten.
    pub fn reset(&mut self) {
        self.caches.reset();
        self.chunks = 0;
    }

    /// Decodes sample `bi` of latents [B, z, T, h, w] frame by frame after what the caches
    /// hold, into `sink` as sample `bi`.
    fn decode_frames(
        &mut self,
        w: &DeviceWeights,
        latents: &crate::Tensor,
        bi: usize,
        sink: &mut dyn super::FrameSink,
    ) -> Result<()> {
        let t = latents.shape().get(2).copied().unwrap_or(0);
        for i in 0..t {
            crate::cancel::check()?;
            let frame = super::to_frames_range(latents, bi, i, i + 1)?;
            sink.push(bi, &self.chunk(w, &frame)?)?;
        }
        Ok(())
    }

    /// One chunk of a sample: for a decode one latent frame [1, h, w, z] channel-last →
    /// its frames [1 or 4, H, W, C] clamped to [-1, 1]; for an encode 1 (the first chunk)
    /// or 4 frames [t, H, W, C] → the latent means [1, h, w, z].
    pub fn chunk(&mut self, w: &DeviceWeights, x: &Frames) -> Result<Frames> {
        let first = self.chunks == 0;
        let dims = chunk_dims(&self.config, self.coding, self.hw, first);
        if [x.t, x.h, x.w, x.c] != dims {
            return Err(Error::invalid(format!(
                "VAE chunk {}: {}x{}x{}x{} frames (t, h, w, c), this session takes {dims:?}",
                self.chunks, x.t, x.h, x.w, x.c
            )));
        }
        let input: Vec<T> = x.data.iter().map(|&v| T::from_f32(v)).collect();
        self.ctx.phase(if first { "first" } else { "next" })?;
        let _range = self.ctx.range(match self.coding {
            Coding::Decode => "VAE decode chunk",
            Coding::Encode => "VAE encode chunk",
        });
        let mut run = Run {
            ctx: &mut self.ctx,
            w,
            caches: &mut self.caches,
        };
        let y = run.chunk(&self.parts, self.coding, &input, dims)?;
        let data = self.ctx.download(y.v)?;
        self.chunks += 1;
        Ok(match self.coding {
            Coding::Decode => Frames {
                t: y.t,
                h: y.h,
                w: y.w,
                c: y.c,
                data: data.iter().map(|v| v.to_f32().clamp(-1.0, 1.0)).collect(),
            },
            Coding::Encode => {
                // The posterior mean: the first z of the 2z moments.
                let z = self.config.z_dim;
                let mut data_z = Vec::with_capacity(data.len() / 2);
                for px in data.chunks_exact(y.c) {
                    data_z.extend(px[..z].iter().map(|v| v.to_f32()));
                }
                Frames {
                    t: y.t,
                    h: y.h,
                    w: y.w,
                    c: z,
                    data: data_z,
                }
            }
        })
    }
}
