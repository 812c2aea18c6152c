//! The GPU runtime, shared by the `cuda` and `emu` kernel devices: a context with one arena
//! planned before anything runs ([`ctx`], [`plan`]), device weights ([`weights`]).
//! Each model's device forward (`models/*/gpu.rs`) is written against [`Ctx`].

pub mod ctx;
pub mod cublaslt;
pub mod gemm;
pub mod plan;
pub mod weights;

pub use ctx::{Ctx, Kind, MemoryPlan, Planned, View};
pub use weights::{DeviceWeights, WDtype, WeightSpec};
