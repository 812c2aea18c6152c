//! Video writers. Frames arrive one latent frame's worth at a time from the VAE (as RGB in
//! [0, 1], already cropped to the requested size) and are written as they come, except for
//! .safetensors, whose single tensor needs every frame. Every writer writes under a
//! temporary name and renames on `finish`, so an interrupted run never leaves a
//! half-written file (or folder) under the final name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::{publish, sync_folder_of, temp_name, write_f32};
use crate::tensor::Tensor;

/// One RGB frame, [h, w, 3] in [0, 1].
pub struct RgbFrame<'a> {
    pub w: usize,
    pub h: usize,
    pub data: &'a [f32],
}

impl RgbFrame<'_> {
    /// 8-bit RGB, rounded as diffusers' numpy output ((x·255).round()).
    pub fn to_u8(&self) -> Vec<u8> {
        self.data
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }
}

/// A streaming video writer.
pub trait VideoWriter {
    fn write(&mut self, frame: &RgbFrame) -> Result<()>;
    /// Completes the file and moves it to its final name.
    fn finish(self: Box<Self>, latents: &Tensor) -> Result<()>;
    /// Removes the partial output (interrupted run).
    fn abort(self: Box<Self>);
}

/// Output formats by the extension of OUT (a trailing `/` means a folder of PNG frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mp4,
    Gif,
    Y4m,
    Safetensors,
    PngDir,
}

impl Format {
    pub fn from_path(out: &str) -> Result<Format> {
        if out.ends_with('/') || out.ends_with(std::path::MAIN_SEPARATOR) {
            return Ok(Format::PngDir);
        }
        let ext = Path::new(out)
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("mp4") => Ok(Format::Mp4),
            Some("gif") => Ok(Format::Gif),
            Some("y4m") => Ok(Format::Y4m),
            Some("safetensors") => Ok(Format::Safetensors),
            _ => Err(Error::invalid(format!(
                "-o {out}: unknown output type; use .mp4, .gif, .y4m, .safetensors, or a folder ending in /"
            ))),
        }
    }
}

/// An encoder's or muxer's error about `path`: an I/O error stays one (the OS error with the
/// path: a full disk is a write failure, not a bad input), anything else is named by `what`.
fn encode_err<'a, E: std::fmt::Display>(
    path: &'a Path,
    what: &'static str,
    io: impl Fn(E) -> std::result::Result<std::io::Error, E> + 'a,
) -> impl Fn(E) -> Error + 'a {
    move |e| match io(e) {
        Ok(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        Err(e) => Error::invalid(format!("{}: {what}: {e}", path.display())),
    }
}

fn mux_io(
    e: muxide::api::MuxerError,
) -> std::result::Result<std::io::Error, muxide::api::MuxerError> {
    match e {
        muxide::api::MuxerError::Io(io) => Ok(io),
        other => Err(other),
    }
}

fn gif_io(e: gif::EncodingError) -> std::result::Result<std::io::Error, gif::EncodingError> {
    match e {
        gif::EncodingError::Io(io) => Ok(io),
        other => Err(other),
    }
}

fn png_io(e: png::EncodingError) -> std::result::Result<std::io::Error, png::EncodingError> {
    match e {
        png::EncodingError::IoError(io) => Ok(io),
        other => Err(other),
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens the writer for `out` (w×h frames at `fps`).
pub fn open(out: &str, w: usize, h: usize, fps: u32) -> Result<Box<dyn VideoWriter>> {
    let format = Format::from_path(out)?;
    let path = PathBuf::from(out.trim_end_matches(['/', std::path::MAIN_SEPARATOR]));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(Error::invalid(format!(
                "-o {out}: folder {} does not exist",
                parent.display()
            )));
        }
    }
    Ok(match format {
        Format::Y4m => Box::new(Y4m::new(path, w, h, fps)?),
        Format::PngDir => Box::new(PngDir::new(path)?),
        Format::Gif => Box::new(Gif::new(path, w, h, fps)?),
        Format::Mp4 => Box::new(Mp4::new(path, w, h, fps)?),
        Format::Safetensors => Box::new(Safetensors {
            path,
            w,
            h,
            frames: Vec::new(),
        }),
    })
}

/// YUV4MPEG2, 4:4:4, full-range BT.601 (XCOLORRANGE=FULL).
struct Y4m {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
}

impl Y4m {
    fn new(path: PathBuf, w: usize, h: usize, fps: u32) -> Result<Self> {
        let tmp = temp_name(&path);
        let mut out = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        writeln!(
            out,
            "YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C444 XCOLORRANGE=FULL"
        )
        .map_err(io_err(&tmp))?;
        Ok(Y4m { path, tmp, out })
    }
}

impl VideoWriter for Y4m {
    fn write(&mut self, f: &RgbFrame) -> Result<()> {
        let n = f.w * f.h;
        let mut planes = vec![0u8; 3 * n];
        for (i, px) in f.data.chunks_exact(3).enumerate() {
            let (r, g, b) = (px[0] * 255.0, px[1] * 255.0, px[2] * 255.0);
            let y = 0.299 * r + 0.587 * g + 0.114 * b;
            let u = 128.0 - 0.168_736 * r - 0.331_264 * g + 0.5 * b;
            let v = 128.0 + 0.5 * r - 0.418_688 * g - 0.081_312 * b;
            planes[i] = y.round().clamp(0.0, 255.0) as u8;
            planes[n + i] = u.round().clamp(0.0, 255.0) as u8;
            planes[2 * n + i] = v.round().clamp(0.0, 255.0) as u8;
        }
        self.out.write_all(b"FRAME\n").map_err(io_err(&self.tmp))?;
        self.out.write_all(&planes).map_err(io_err(&self.tmp))
    }

    fn finish(self: Box<Self>, _latents: &Tensor) -> Result<()> {
        let Y4m { path, tmp, out } = *self;
        match out.into_inner() {
            Ok(file) => publish(file, &tmp, &path),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(io_err(&tmp)(e.into_error()))
            }
        }
    }

    fn abort(self: Box<Self>) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// A buffered file's last bytes written and the file synced: every error surfaces (a
/// BufWriter dropped unflushed would swallow it).
fn close_synced(out: BufWriter<File>, path: &Path) -> Result<()> {
    let file = out.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))
}

/// A folder of frame_00000.png, ...
struct PngDir {
    path: PathBuf,
    tmp: PathBuf,
    n: usize,
}

impl PngDir {
    fn new(path: PathBuf) -> Result<Self> {
        if path.exists()
            && std::fs::read_dir(&path)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(Error::invalid(format!(
                "{} exists and is not an empty folder",
                path.display()
            )));
        }
        let tmp = temp_name(&path);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(PngDir { path, tmp, n: 0 })
    }
}

/// Encodes one RGB8 image as PNG into `w` (errors name `path`, where `w` writes).
pub fn write_png(
    w: impl Write,
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
) -> Result<()> {
    let err = encode_err(path, "png", png_io);
    let mut enc = png::Encoder::new(w, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().map_err(&err)?;
    wr.write_image_data(rgb).map_err(&err)?;
    // The closing chunk: written here, where its error is seen (a drop would swallow it).
    wr.finish().map_err(&err)
}

/// One RGB8 image as PNG bytes.
pub fn png_bytes(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write_png(&mut out, Path::new("(memory)"), width, height, rgb)?;
    Ok(out)
}

impl VideoWriter for PngDir {
    fn write(&mut self, f: &RgbFrame) -> Result<()> {
        let p = self.tmp.join(format!("frame_{:05}.png", self.n));
        let mut file = BufWriter::new(File::create(&p).map_err(io_err(&p))?);
        write_png(&mut file, &p, f.w, f.h, &f.to_u8())?;
        close_synced(file, &p)?;
        self.n += 1;
        Ok(())
    }

    fn finish(self: Box<Self>, _latents: &Tensor) -> Result<()> {
        let published = (|| {
            sync_folder_of(&self.tmp.join("frame"));
            if self.path.exists() {
                std::fs::remove_dir(&self.path).map_err(io_err(&self.path))?;
            }
            std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))
        })();
        match published {
            Ok(()) => {
                sync_folder_of(&self.path);
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&self.tmp);
                Err(e)
            }
        }
    }

    fn abort(self: Box<Self>) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Animated GIF (NeuQuant palette per frame, looping forever).
struct Gif {
    path: PathBuf,
    tmp: PathBuf,
    enc: gif::Encoder<BufWriter<File>>,
    delay: u16,
}

impl Gif {
    fn new(path: PathBuf, w: usize, h: usize, fps: u32) -> Result<Self> {
        if w > u16::MAX as usize || h > u16::MAX as usize {
            return Err(Error::invalid("gif frames are at most 65535 pixels a side"));
        }
        let tmp = temp_name(&path);
        let file = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        let started = {
            let gif_err = encode_err(&tmp, "gif", gif_io);
            gif::Encoder::new(file, w as u16, h as u16, &[])
                .and_then(|mut enc| enc.set_repeat(gif::Repeat::Infinite).map(|()| enc))
                .map_err(gif_err)
        };
        let enc = match started {
            Ok(enc) => enc,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // GIF delays are in centiseconds.
        let delay = ((100.0 / fps.max(1) as f64).round() as u16).max(1);
        Ok(Gif {
            path,
            tmp,
            enc,
            delay,
        })
    }
}

impl VideoWriter for Gif {
    fn write(&mut self, f: &RgbFrame) -> Result<()> {
        let rgb = f.to_u8();
        let mut frame = gif::Frame::from_rgb_speed(f.w as u16, f.h as u16, &rgb, 10);
        frame.delay = self.delay;
        self.enc
            .write_frame(&frame)
            .map_err(encode_err(&self.tmp, "gif", gif_io))
    }

    fn finish(self: Box<Self>, _latents: &Tensor) -> Result<()> {
        let Gif { path, tmp, enc, .. } = *self;
        let closed = enc
            .into_inner()
            .map_err(encode_err(&tmp, "gif", gif_io))
            .and_then(|out| out.into_inner().map_err(|e| io_err(&tmp)(e.into_error())));
        match closed {
            Ok(file) => publish(file, &tmp, &path),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn abort(self: Box<Self>) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// H.264 (OpenH264, built from source by the openh264 crate) in MP4 (muxide), fast-start.
struct Mp4 {
    path: PathBuf,
    tmp: PathBuf,
    encoder: openh264::encoder::Encoder,
    muxer: Option<muxide::api::Muxer<BufWriter<File>>>,
    file: Option<BufWriter<File>>,
    w: usize,
    h: usize,
    fps: u32,
    n: usize,
}

impl Mp4 {
    fn new(path: PathBuf, w: usize, h: usize, fps: u32) -> Result<Self> {
        use openh264::encoder::{BitRate, EncoderConfig, FrameRate};
        if w % 2 != 0 || h % 2 != 0 {
            return Err(Error::invalid(format!("mp4 needs even sizes, got {w}x{h}")));
        }
        // ~0.2 bits per pixel per frame: clean output for short clips.
        let bps = ((w * h) as f64 * fps as f64 * 0.2).clamp(200_000.0, 50_000_000.0) as u32;
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bps))
            .max_frame_rate(FrameRate::from_hz(fps as f32));
        let encoder = openh264::encoder::Encoder::with_api_config(
            openh264::OpenH264API::from_source(),
            config,
        )
        .map_err(|e| Error::invalid(format!("openh264: {e}")))?;
        // The file last: nothing to clean up when the encoder cannot start.
        let tmp = temp_name(&path);
        let file = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        Ok(Mp4 {
            path,
            tmp,
            encoder,
            muxer: None,
            file: Some(file),
            w,
            h,
            fps,
            n: 0,
        })
    }
}

impl VideoWriter for Mp4 {
    fn write(&mut self, f: &RgbFrame) -> Result<()> {
        use openh264::formats::{RgbSliceU8, YUVBuffer};
        let rgb = f.to_u8();
        let yuv = YUVBuffer::from_rgb8_source(RgbSliceU8::new(&rgb, (f.w, f.h)));
        let bits = self
            .encoder
            .encode(&yuv)
            .map_err(|e| Error::invalid(format!("openh264: {e}")))?;
        let keyframe = matches!(
            bits.frame_type(),
            openh264::encoder::FrameType::IDR | openh264::encoder::FrameType::I
        );
        let data = bits.to_vec();
        if data.is_empty() {
            return Err(Error::invalid(format!(
                "openh264 produced no data for frame {}",
                self.n
            )));
        }
        if self.muxer.is_none() {
            let file = self
                .file
                .take()
                .ok_or_else(|| Error::invalid("mp4: writer already closed"))?;
            let muxer = muxide::api::MuxerBuilder::new(file)
                .video(
                    muxide::api::VideoCodec::H264,
                    self.w as u32,
                    self.h as u32,
                    self.fps as f64,
                )
                .with_fast_start(true)
                .build()
                .map_err(encode_err(&self.tmp, "mp4 muxer", mux_io))?;
            self.muxer = Some(muxer);
        }
        let pts = self.n as f64 / self.fps as f64;
        if let Some(m) = self.muxer.as_mut() {
            m.write_video(pts, &data, keyframe).map_err(encode_err(
                &self.tmp,
                "mp4 muxer",
                mux_io,
            ))?;
        }
        self.n += 1;
        Ok(())
    }

    fn finish(self: Box<Self>, _latents: &Tensor) -> Result<()> {
        let Mp4 {
            path, tmp, muxer, ..
        } = *self;
        let closed = (|| {
            let mut muxer = muxer.ok_or_else(|| Error::invalid("mp4: no frames were written"))?;
            // The muxer writes its index here; its buffered writer then flushed and the file
            // handed back, so that every write's error is seen.
            muxer
                .finish_in_place()
                .map_err(encode_err(&tmp, "mp4 muxer", mux_io))?;
            muxer
                .into_writer()
                .into_inner()
                .map_err(|e| io_err(&tmp)(e.into_error()))
        })();
        match closed {
            Ok(file) => publish(file, &tmp, &path),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn abort(self: Box<Self>) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// `video` [1, F, 3, H, W] in [0, 1] (diffusers' output_type "pt") and `latents`.
struct Safetensors {
    path: PathBuf,
    w: usize,
    h: usize,
    frames: Vec<Vec<f32>>,
}

impl VideoWriter for Safetensors {
    fn write(&mut self, f: &RgbFrame) -> Result<()> {
        // [h, w, 3] → [3, h, w]
        let mut chw = vec![0.0f32; 3 * f.w * f.h];
        for (p, px) in f.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * f.w * f.h + p] = px[c];
            }
        }
        self.frames.push(chw);
        Ok(())
    }

    fn finish(self: Box<Self>, latents: &Tensor) -> Result<()> {
        let n = self.frames.len();
        let video = Tensor::new(vec![1, n, 3, self.h, self.w], self.frames.concat())?;
        write_f32(&self.path, &[("video", &video), ("latents", latents)])
    }

    fn abort(self: Box<Self>) {}
}
