//! Integration tests on the CPU device, in one binary (linking is slow on 2 cores).
//! Golden data under tests/data comes from tools/golden.py (diffusers, float64).

mod bench;
mod causal_demo;
mod cluster;
mod convert;
mod demo;
mod dit;
mod embeddings;
mod emu;
mod generate;
mod hopper;
mod kernels;
mod kernels_attention;
mod kernels_conv;
mod kernels_gemm;
mod kernels_t5;
mod pipeline;
mod plan;
mod serve;
mod text;
mod vae;
mod weights;
mod wrappers;

use std::path::PathBuf;

/// tests/data/<case>: of the source tree this binary was built from, or, where that is not
/// (the test binary taken to the GPU machine, run from a copy of the repository's root), of
/// the current directory.
pub fn data(case: &str) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data");
    let root = if built.is_dir() {
        built
    } else {
        PathBuf::from("tests").join("data")
    };
    root.join(case)
}

/// A fresh scratch directory under the target dir, removed at the start of each use.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The boxes of an MP4 that tell frame count, size and rate.
#[derive(Debug, Default)]
pub struct Mp4Info {
    pub samples: u32,
    pub width: u32,
    pub height: u32,
    pub timescale: u32,
    pub delta: u32,
    pub moov_before_mdat: bool,
}

pub fn parse_mp4(bytes: &[u8]) -> Mp4Info {
    fn walk(b: &[u8], info: &mut Mp4Info, seen_mdat: &mut bool, top: bool) {
        let mut i = 0;
        while i + 8 <= b.len() {
            let size = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
            let kind = &b[i + 4..i + 8];
            assert!(size >= 8 && i + size <= b.len(), "bad box at {i}");
            let body = &b[i + 8..i + size];
            let u32_at = |o: usize| u32::from_be_bytes(body[o..o + 4].try_into().unwrap());
            match kind {
                b"moov" => {
                    if top {
                        info.moov_before_mdat = !*seen_mdat;
                    }
                    walk(body, info, seen_mdat, false)
                }
                b"trak" | b"mdia" | b"minf" | b"stbl" => walk(body, info, seen_mdat, false),
                b"mdat" => *seen_mdat = true,
                b"tkhd" => {
                    // version 0: width, height are the last 8 bytes (16.16 fixed point).
                    let n = body.len();
                    info.width = u32::from_be_bytes(body[n - 8..n - 4].try_into().unwrap()) >> 16;
                    info.height = u32::from_be_bytes(body[n - 4..n].try_into().unwrap()) >> 16;
                }
                b"mdhd" => info.timescale = if body[0] == 1 { u32_at(20) } else { u32_at(12) },
                b"stsz" => info.samples = u32_at(8),
                b"stts" => info.delta = u32_at(12),
                _ => {}
            }
            i += size;
        }
    }
    let mut info = Mp4Info::default();
    walk(bytes, &mut info, &mut false, true);
    info
}
