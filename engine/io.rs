//! Reading and writing tensor files (safetensors) for `reel component` and tests.
//! Inputs may hold extra tensors, which are ignored; any float or integer dtype is read
//! as f32. Outputs are written as F32 to a temporary name and renamed into place, so a
//! failed or interrupted run never leaves a half-written file under the final name.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result, WeightError};
use crate::tensor::Tensor;
use crate::weights::WeightStore;

/// A safetensors file opened for reading tensors by name.
pub struct TensorFile {
    store: WeightStore,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        Ok(TensorFile {
            store: WeightStore::open_file(path)?,
        })
    }

    pub fn path(&self) -> &Path {
        self.store.origin()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.get(name).is_some()
    }

    /// The tensor `name` converted to f32.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.store.require(name)?;
        let data = self.store.f32(e)?.into_owned();
        Tensor::new(e.shape.clone(), data)
    }

    /// An integer tensor (I64 or I32; token ids, masks) as i64 with its shape.
    pub fn tensor_i64(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let e = self.store.require(name)?;
        let bytes = self.store.bytes(e);
        let data = match e.dtype {
            safetensors::Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            safetensors::Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            other => {
                return Err(Error::Weights(WeightError::Dtype {
                    path: self.path().to_path_buf(),
                    name: name.to_string(),
                    got: other.to_string(),
                    expected: "I64 or I32".into(),
                }))
            }
        };
        Ok((e.shape.clone(), data))
    }

    /// The tensor `name` as f64 (F64 stored data is read exactly; golden references).
    pub fn tensor_f64(&self, name: &str) -> Result<(Vec<usize>, Vec<f64>)> {
        let e = self.store.require(name)?;
        let data = if e.dtype == safetensors::Dtype::F64 {
            self.store
                .bytes(e)
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        } else {
            self.store.f32(e)?.iter().map(|&v| v as f64).collect()
        };
        Ok((e.shape.clone(), data))
    }
}

/// Writes `tensors` as F32 safetensors at `path` (atomically: temp file, then rename).
pub fn write_f32(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, &[u8])> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.shape().to_vec(),
                bytemuck::cast_slice(t.data()),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::invalid(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| {
        Error::Weights(WeightError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    })?;
    write_atomic(path, &data)
}

/// `path` with `.partial-<pid>-<n>` appended (n counts within the process, so two threads
/// writing the same path never share a temporary file): where outputs are written before
/// the rename that publishes them.
pub(crate) fn temp_name(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".partial-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Publishes a finished temporary file: its data synced to the disk, then renamed over
/// `path`, then the folder synced (best effort), so that a crash or a full disk leaves the
/// old file or the whole new one, never a part. On failure the temporary file is removed
/// and the error names the path and the OS error.
pub fn publish(file: std::fs::File, tmp: &Path, path: &Path) -> Result<()> {
    let synced = file.sync_all().map_err(io_error(tmp));
    drop(file);
    let r = synced.and_then(|()| std::fs::rename(tmp, path).map_err(io_error(path)));
    if r.is_err() {
        let _ = std::fs::remove_file(tmp);
        return r;
    }
    sync_folder_of(path);
    Ok(())
}

/// Syncs the folder holding `path` (its new entry), where the platform allows it.
pub(crate) fn sync_folder_of(path: &Path) {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Writes `bytes` at `path` atomically and durably: a temporary file, every byte written
/// and checked, synced, then renamed over `path` ([`publish`]). On failure nothing is left.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = temp_name(path);
    let written = std::fs::File::create(&tmp)
        .map_err(io_error(&tmp))
        .and_then(|mut f| f.write_all(bytes).map(|()| f).map_err(io_error(&tmp)));
    match written {
        Ok(f) => publish(f, &tmp, path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
