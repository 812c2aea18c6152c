//! A plain host tensor: row-major f32 data with a shape. Model code works on slices with
//! the shapes written in comments; this type carries tensors across API boundaries (files,
//! the CLI, tests).

use crate::error::{Error, Result};

/// `n` zeros of `T`, or [`Error::OutOfMemory`] naming `what` and the bytes asked for when
/// the allocation fails (a `vec![0; n]` would abort the process). For the allocations that
/// grow with the video (activations, latents, frames), where running out is plausible.
/// Zeroed by the allocator, as `vec!` does: pages are not touched until written.
pub fn zeroed<T: bytemuck::Zeroable>(n: usize, what: &'static str) -> Result<Vec<T>> {
    let oom = || Error::OutOfMemory {
        what,
        bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
    };
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| oom())?;
    if layout.size() == 0 {
        let mut v = Vec::new();
        v.resize_with(n, T::zeroed);
        return Ok(v);
    }
    // SAFETY: the layout has a non-zero size; a non-null result is `n` zeroed `T`s, which
    // are valid values (T: Zeroable), allocated by the global allocator with exactly the
    // layout Vec<T> of capacity n uses, so the Vec may own and free it.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<T>();
        if p.is_null() {
            return Err(oom());
        }
        Ok(Vec::from_raw_parts(p, n, n))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Fails when `data.len()` is not the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("shape {shape:?} overflows")))?;
        if numel != data.len() {
            return Err(Error::invalid(format!(
                "shape {shape:?} needs {numel} elements, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Relative L2 error ‖a − b‖ / ‖b‖, accumulated in f64 (the parity metric of DESIGN.md).
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_l2 of tensors of different sizes");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y;
        num += d * d;
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_gives_zeros_or_an_error_naming_the_bytes() {
        let v: Vec<f32> = zeroed(1000, "x").unwrap();
        assert_eq!(v.len(), 1000);
        assert!(v.iter().all(|&x| x == 0.0));
        assert!(zeroed::<f32>(0, "x").unwrap().is_empty());
        // More than any address space: the layout itself overflows.
        match zeroed::<f32>(usize::MAX / 2, "the test's buffer") {
            Err(Error::OutOfMemory { what, bytes }) => {
                assert_eq!(what, "the test's buffer");
                assert_eq!(bytes, u64::MAX); // saturated
            }
            other => panic!("{:?}", other.map(|v| v.len())),
        }
        // A size that fits the layout but no machine (1 PB): the allocator refuses.
        let e = zeroed::<u8>(1 << 50, "a petabyte").unwrap_err();
        assert!(
            e.to_string()
                .contains("a petabyte needs 1125899906842624 bytes"),
            "{e}"
        );
    }
}
