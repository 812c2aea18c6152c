//! A model's weights on a kernel device: one allocation, bf16 for matrices and f32 for
//! vectors (norms, biases, modulation tables), uploaded once from the memory map one tensor
//! at a time (the host never holds more than one converted tensor). While measuring, the
//! same layout gives addresses that launches record as external (not arena) memory.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::kernels::{DevSlice, DeviceMem, KernelDevice, Recorder};

/// How a weight is stored on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WDtype {
    Bf16,
    F16,
    F32,
}

impl WDtype {
    pub fn size(self) -> usize {
        match self {
            WDtype::Bf16 | WDtype::F16 => 2,
            WDtype::F32 => 4,
        }
    }

    /// The 16-bit type T is stored as.
    pub fn half<T: crate::kernels::Half>() -> Self {
        if T::F16 {
            WDtype::F16
        } else {
            WDtype::Bf16
        }
    }
}

/// One device tensor: its name, element count and dtype.
#[derive(Debug, Clone)]
pub struct WeightSpec {
    pub name: String,
    pub len: usize,
    pub dtype: WDtype,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: usize,
    len: usize,
    dtype: WDtype,
}

/// The measuring-mode buffer id of weights (outside the arena's ids).
pub const WEIGHTS_ID: u32 = 1 << 23;

/// Weights on a device (or their layout, while measuring).
pub struct DeviceWeights {
    mem: Option<DeviceMem>,
    key: usize,
    entries: HashMap<String, Entry>,
    bytes: usize,
}

fn layout(specs: &[WeightSpec]) -> Result<(HashMap<String, Entry>, usize)> {
    let mut entries = HashMap::with_capacity(specs.len());
    let mut bytes = 0usize;
    for s in specs {
        let offset = bytes.div_ceil(256) * 256;
        bytes = offset + s.len * s.dtype.size();
        if entries
            .insert(
                s.name.clone(),
                Entry {
                    offset,
                    len: s.len,
                    dtype: s.dtype,
                },
            )
            .is_some()
        {
            return Err(Error::invalid(format!(
                "device weight {} listed twice",
                s.name
            )));
        }
    }
    Ok((entries, bytes))
}

impl DeviceWeights {
    /// The bytes `specs` take on the device (with 256-byte alignment).
    pub fn bytes_of(specs: &[WeightSpec]) -> Result<usize> {
        Ok(layout(specs)?.1)
    }

    /// The layout alone, for a measuring pass.
    pub fn measure(specs: &[WeightSpec]) -> Result<Self> {
        let (entries, bytes) = layout(specs)?;
        Ok(DeviceWeights {
            mem: None,
            key: crate::kernels::MEASURE_KEY,
            entries,
            bytes,
        })
    }

    /// Allocates `specs` on `dev` and fills each tensor with `data(spec)` (f32 values,
    /// converted to the spec's dtype here).
    pub fn upload(
        dev: &KernelDevice,
        specs: &[WeightSpec],
        mut data: impl FnMut(&WeightSpec) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        let (entries, bytes) = layout(specs)?;
        let mut mem = DeviceMem::new(dev, bytes)?;
        for s in specs {
            let e = entries[&s.name];
            let v = data(s)?;
            if v.len() != s.len {
                return Err(Error::invalid(format!(
                    "device weight {}: {} values for {} elements",
                    s.name,
                    v.len(),
                    s.len
                )));
            }
            match s.dtype {
                WDtype::F32 => mem.write(e.offset, &v)?,
                WDtype::Bf16 => {
                    let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    mem.write(e.offset, &h)?
                }
                WDtype::F16 => {
                    let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
                    mem.write(e.offset, &h)?
                }
            }
        }
        Ok(DeviceWeights {
            key: mem.device_key(),
            mem: Some(mem),
            entries,
            bytes,
        })
    }

    /// Allocates `specs` on `dev` and fills them there with N(0, 0.02²) values (Philox,
    /// tensor i from seed + i): a model to benchmark with no download and no host copy.
    pub fn random(dev: &KernelDevice, specs: &[WeightSpec], seed: u64) -> Result<Self> {
        let (entries, bytes) = layout(specs)?;
        let mem = DeviceMem::new(dev, bytes)?;
        let w = DeviceWeights {
            key: mem.device_key(),
            mem: Some(mem),
            entries,
            bytes,
        };
        for (i, s) in specs.iter().enumerate() {
            let seed = seed.wrapping_add(i as u64);
            match s.dtype {
                WDtype::Bf16 => {
                    crate::kernels::fill_normal(dev, w.bf16(&s.name)?, seed, 0.0, 0.02)?
                }
                WDtype::F16 => crate::kernels::fill_normal(
                    dev,
                    w.half::<half::f16>(&s.name)?,
                    seed,
                    0.0,
                    0.02,
                )?,
                WDtype::F32 => crate::kernels::fill_normal(dev, w.f32(&s.name)?, seed, 0.0, 0.02)?,
            }
        }
        Ok(w)
    }

    /// Identifies this allocation (its address): a graph captured with these weights is
    /// valid for them only.
    pub fn stamp(&self) -> u64 {
        self.mem.as_ref().map_or(0, |m| m.ptr().0)
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The dtype of tensor `name`, if there is one.
    pub fn dtype_of(&self, name: &str) -> Option<WDtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    fn entry(&self, name: &str, dtype: WDtype) -> Result<Entry> {
        let e = *self
            .entries
            .get(name)
            .ok_or_else(|| Error::invalid(format!("no device weight {name}")))?;
        if e.dtype != dtype {
            return Err(Error::invalid(format!(
                "device weight {name} is {:?}, not {dtype:?}",
                e.dtype
            )));
        }
        Ok(e)
    }

    fn slice<T>(&self, e: Entry) -> DevSlice<'_, T> {
        match &self.mem {
            // SAFETY: the entry lies inside the allocation (the layout placed it), which
            // lives as long as `self`, borrowed by the slice.
            Some(m) => unsafe { DevSlice::from_raw(m.ptr().offset(e.offset), e.len, self.key) },
            None => Recorder::slice(WEIGHTS_ID, e.offset / std::mem::size_of::<T>(), e.len),
        }
    }

    /// A bf16 matrix.
    pub fn bf16(&self, name: &str) -> Result<DevSlice<'_, half::bf16>> {
        Ok(self.slice(self.entry(name, WDtype::Bf16)?))
    }

    /// A 16-bit tensor of type T (bf16 or f16).
    pub fn half<T: crate::kernels::Half>(&self, name: &str) -> Result<DevSlice<'_, T>> {
        Ok(self.slice(self.entry(name, WDtype::half::<T>())?))
    }

    /// An f32 vector.
    pub fn f32(&self, name: &str) -> Result<DevSlice<'_, f32>> {
        Ok(self.slice(self.entry(name, WDtype::F32)?))
    }
}
