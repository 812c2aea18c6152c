//! Memory-mapped safetensors weights.
//!
//! A [`WeightStore`] maps every safetensors file of a component folder (one file, or the
//! shards named by a `*.safetensors.index.json`) and indexes their tensors by name. Nothing
//! is read eagerly: [`WeightStore::f32`] hands out an aligned F32 tensor as a borrowed slice
//! of the map (zero copy) and converts BF16/F16/F64 or unaligned F32 data into a fresh
//! buffer, so a model converts its weights layer by layer as it uses them and never holds a
//! second full copy.
//!
//! Headers are parsed by the `safetensors` crate, which checks the header length, the JSON,
//! that the data offsets are contiguous and cover the file exactly, and that each tensor's
//! byte size matches its dtype and shape. After that every byte range handed out here lies
//! inside the map, so no input bytes can make this module panic.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
pub use safetensors::Dtype;
use safetensors::SafeTensors;

use crate::error::WeightError;

/// One tensor of a mapped file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    /// Absolute byte range inside the file's map.
    range: Range<usize>,
}

impl TensorEntry {
    /// An entry with a name and shape but no data, for listing a model's weights.
    pub(crate) fn placeholder(name: &str, shape: &[usize]) -> Self {
        TensorEntry {
            name: name.to_string(),
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            file: usize::MAX,
            range: 0..0,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.range.len()
    }
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// The tensors of one safetensors file or one component folder, memory-mapped.
pub struct WeightStore {
    /// What errors name: the file, or the folder for sharded weights.
    origin: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorEntry>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightError + '_ {
    move |source| WeightError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A mapped file, its tensors as the header lists them, and where its data starts.
type MappedHeader = (Mmap, Vec<(String, safetensors::tensor::TensorInfo)>, usize);

fn map_file(path: &Path) -> Result<MappedHeader, WeightError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    if len < 8 {
        return Err(WeightError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("file is {len} bytes, too short for the 8-byte header length"),
        });
    }
    // SAFETY: the map is read-only and private to this process. The usual caveat of
    // memory maps applies: if another process truncates or rewrites the file while it is
    // mapped, reads may fault or see new bytes. Model files are not rewritten in place by
    // any tool we know of, and copying 5-20 GB of weights to avoid that risk would defeat
    // the purpose of mapping them.
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let (n, meta) = SafeTensors::read_metadata(&map[..]).map_err(|e| WeightError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let data_start = 8 + n;
    let infos = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    Ok((map, infos, data_start))
}

impl WeightStore {
    /// Maps one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self, WeightError> {
        let mut store = WeightStore {
            origin: path.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        store.add_file(path)?;
        Ok(store)
    }

    /// Maps the weights of a diffusers/transformers component folder: a sharded
    /// `*.safetensors.index.json` if there is one, else `diffusion_pytorch_model.safetensors`
    /// or `model.safetensors`, else the folder's only `*.safetensors` file.
    pub fn open_component(dir: &Path) -> Result<Self, WeightError> {
        let mut indexes = Vec::new();
        let mut singles = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".safetensors.index.json") {
                indexes.push(name);
            } else if name.ends_with(".safetensors") {
                singles.push(name);
            }
        }
        indexes.sort();
        singles.sort();
        let preferred = ["diffusion_pytorch_model", "model"];
        let pick = |names: &[String], suffix: &str| -> Option<String> {
            for p in preferred {
                let want = format!("{p}{suffix}");
                if names.contains(&want) {
                    return Some(want);
                }
            }
            (names.len() == 1).then(|| names[0].clone())
        };
        if let Some(index) = pick(&indexes, ".safetensors.index.json") {
            return Self::open_index(dir, &dir.join(index));
        }
        if !indexes.is_empty() {
            return Err(WeightError::NoWeights {
                path: dir.to_path_buf(),
                detail: format!(
                    "several shard indexes and none is the default: {}",
                    indexes.join(", ")
                ),
            });
        }
        match pick(&singles, ".safetensors") {
            Some(file) => {
                let mut store = Self::open_file(&dir.join(file))?;
                store.origin = dir.to_path_buf();
                Ok(store)
            }
            None if singles.is_empty() => Err(WeightError::NoWeights {
                path: dir.to_path_buf(),
                detail: "expected diffusion_pytorch_model.safetensors, model.safetensors or a *.safetensors.index.json"
                    .into(),
            }),
            None => Err(WeightError::NoWeights {
                path: dir.to_path_buf(),
                detail: format!("several .safetensors files and none is the default: {}", singles.join(", ")),
            }),
        }
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self, WeightError> {
        let bad = |reason: String| WeightError::Index {
            path: index.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(index).map_err(io_err(index))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[`{name}`] is not a file name")))?;
            // Shards live beside the index: refuse anything that would leave the folder.
            if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
                return Err(bad(format!(
                    "weight_map[`{name}`] names `{file}`, not a file in {}",
                    dir.display()
                )));
            }
            wanted.insert(name.clone(), file.to_string());
        }
        let mut shards: Vec<&String> = wanted.values().collect();
        shards.sort();
        shards.dedup();
        let mut store = WeightStore {
            origin: dir.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for shard in shards {
            store.add_file(&dir.join(shard))?;
        }
        for (name, file) in &wanted {
            let found = store.tensors.get(name).map(|e| &store.files[e.file].path);
            match found {
                Some(p) if p.file_name().map(|f| f == file.as_str()).unwrap_or(false) => {}
                Some(p) => {
                    return Err(bad(format!(
                        "weight_map puts `{name}` in {file}, but it is in {}",
                        p.display()
                    )))
                }
                None => {
                    return Err(WeightError::Missing {
                        path: dir.join(file),
                        name: name.clone(),
                    })
                }
            }
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<(), WeightError> {
        let (map, infos, data_start) = map_file(path)?;
        let file = self.files.len();
        for (name, info) in infos {
            let (a, b) = info.data_offsets;
            let entry = TensorEntry {
                name: name.clone(),
                dtype: info.dtype,
                shape: info.shape,
                file,
                range: data_start + a..data_start + b,
            };
            if let Some(prev) = self.tensors.insert(name.clone(), entry) {
                return Err(WeightError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor `{name}` is also in {}",
                        self.files[prev.file].path.display()
                    ),
                });
            }
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            map,
        });
        Ok(())
    }

    /// The file or folder this store was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The mapped files, in load order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// All tensors, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = &TensorEntry> {
        self.tensors.values()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The tensor `name`, or an error naming the file and the tensor.
    pub fn require(&self, name: &str) -> Result<&TensorEntry, WeightError> {
        self.tensors.get(name).ok_or_else(|| WeightError::Missing {
            path: self.origin.clone(),
            name: name.to_string(),
        })
    }

    /// The file holding `entry`.
    pub fn path_of(&self, entry: &TensorEntry) -> &Path {
        &self.files[entry.file].path
    }

    /// The tensor `name` as a float weight of exactly `shape` (F32, F16 or BF16).
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry, WeightError> {
        let e = self.require(name)?;
        if e.shape != shape {
            return Err(WeightError::Shape {
                path: self.path_of(e).to_path_buf(),
                name: name.to_string(),
                got: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(WeightError::Dtype {
                path: self.path_of(e).to_path_buf(),
                name: name.to_string(),
                got: e.dtype.to_string(),
                expected: "F32, F16 or BF16".into(),
            });
        }
        Ok(e)
    }

    /// The raw little-endian bytes of `entry`.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.files[entry.file].map[entry.range.clone()]
    }

    /// `entry` as f32: borrowed from the map when it is aligned F32, converted otherwise
    /// (F16, BF16, F64, integer types, unaligned F32).
    pub fn f32(&self, entry: &TensorEntry) -> Result<Cow<'_, [f32]>, WeightError> {
        let bytes = self.bytes(entry);
        let out: Vec<f32> = match entry.dtype {
            Dtype::F32 => {
                if let Ok(s) = bytemuck::try_cast_slice::<u8, f32>(bytes) {
                    return Ok(Cow::Borrowed(s));
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            Dtype::BF16 => match bytemuck::try_cast_slice::<u8, half::bf16>(bytes) {
                Ok(s) => s.iter().map(|v| v.to_f32()).collect(),
                Err(_) => bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            },
            Dtype::F16 => match bytemuck::try_cast_slice::<u8, half::f16>(bytes) {
                Ok(s) => s.iter().map(|v| v.to_f32()).collect(),
                Err(_) => bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            },
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            other => {
                return Err(WeightError::Dtype {
                    path: self.path_of(entry).to_path_buf(),
                    name: entry.name.clone(),
                    got: other.to_string(),
                    expected: "F32, F16, BF16, F64, I64 or I32".into(),
                })
            }
        };
        Ok(Cow::Owned(out))
    }

    /// Rows `rows` of a 2-D float tensor (an embedding table), converted to f32. Only the
    /// rows asked for are read, so a BF16 vocabulary of 256k rows is never converted whole.
    /// Out: [rows.len(), cols]. Fails naming the tensor when a row is out of range.
    pub fn f32_rows(&self, entry: &TensorEntry, rows: &[usize]) -> Result<Vec<f32>, WeightError> {
        let (n_rows, cols) = match entry.shape[..] {
            [r, c] => (r, c),
            _ => {
                return Err(WeightError::Shape {
                    path: self.path_of(entry).to_path_buf(),
                    name: entry.name.clone(),
                    got: entry.shape.clone(),
                    expected: vec![0, 0],
                })
            }
        };
        let width = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(WeightError::Dtype {
                    path: self.path_of(entry).to_path_buf(),
                    name: entry.name.clone(),
                    got: other.to_string(),
                    expected: "F32, F16 or BF16".into(),
                })
            }
        };
        let bytes = self.bytes(entry);
        let mut out = Vec::with_capacity(rows.len() * cols);
        for &r in rows {
            if r >= n_rows {
                return Err(WeightError::Corrupt {
                    path: self.path_of(entry).to_path_buf(),
                    reason: format!("row {r} of `{}` requested, it has {n_rows}", entry.name),
                });
            }
            let row = &bytes[r * cols * width..(r + 1) * cols * width];
            match entry.dtype {
                Dtype::F32 => out.extend(
                    row.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                Dtype::BF16 => out.extend(
                    row.chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
                _ => out.extend(
                    row.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
            }
        }
        Ok(out)
    }

    /// Fails with [`WeightError::Unexpected`] naming the first tensor not in `expected`.
    pub fn reject_unexpected<'a>(
        &self,
        expected: impl IntoIterator<Item = &'a str>,
        model: &str,
    ) -> Result<(), WeightError> {
        let expected: std::collections::HashSet<&str> = expected.into_iter().collect();
        for e in self.tensors.values() {
            if !expected.contains(e.name.as_str()) {
                return Err(WeightError::Unexpected {
                    path: self.path_of(e).to_path_buf(),
                    name: e.name.clone(),
                    model: model.to_string(),
                });
            }
        }
        Ok(())
    }
}
