//! reel: an inference engine for Sora-style text-to-video diffusion transformers.
//!
//! Layers, bottom up: [`weights`] (memory-mapped safetensors), [`tensor`] and [`io`]
//! (host tensors and tensor files), [`cpu`] (the float32 reference device), [`models`]
//! (the Wan2.1 family), and the command-line front end in [`cli`].

pub mod bench;
pub mod cancel;
pub mod cli;
pub mod cluster;
pub mod convert;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod inspect;
pub mod io;
pub mod kernel_bench;
pub mod kernels;
pub mod models;
pub mod pipeline;
pub mod plan;
pub mod profile;
pub mod rng;
pub mod sampler;
pub mod server;
pub mod stream_bench;
pub mod tensor;
pub mod text;
pub mod video;
pub mod weights;

pub use error::{Error, Result, WeightError};
pub use tensor::Tensor;
