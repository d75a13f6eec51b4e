//! Safetensors checkpoints, single-file or sharded, memory-mapped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::dtype::DType;
use crate::error::{StorageError, StorageResult};
use crate::tensor::{Tensor, TensorData};

#[derive(Debug)]
struct Entry {
    file: usize,
    /// `Err(name)` for dtypes hetmoe cannot compute with; reported when the tensor is used.
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// Every tensor of a model folder, by checkpoint name.
#[derive(Debug)]
pub struct Checkpoint {
    files: Vec<MappedFile>,
    entries: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> StorageResult<Self> {
        let dir = dir.as_ref();
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| StorageError::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|source| StorageError::Json { path: index_path.clone(), source })?;
            let mut shard_names: Vec<&String> = index.weight_map.values().collect();
            shard_names.sort();
            shard_names.dedup();
            let mut ckpt = Checkpoint { files: Vec::new(), entries: HashMap::new() };
            for name in shard_names {
                if name.contains('/') || name.contains("..") {
                    return Err(StorageError::InvalidSafetensors {
                        path: index_path.clone(),
                        reason: format!("shard name {name:?} leaves the model folder"),
                    });
                }
                ckpt.add_file(&dir.join(name))?;
            }
            for (tensor, shard) in &index.weight_map {
                let in_file = ckpt.entries.get(tensor).map(|e| &ckpt.files[e.file].path);
                if in_file != Some(&dir.join(shard)) {
                    return Err(StorageError::MissingTensor { name: format!("{tensor} (in {shard})") });
                }
            }
            Ok(ckpt)
        } else if single.exists() {
            let mut ckpt = Checkpoint { files: Vec::new(), entries: HashMap::new() };
            ckpt.add_file(&single)?;
            Ok(ckpt)
        } else {
            Err(StorageError::NoWeights { path: dir.to_path_buf() })
        }
    }

    /// Opens one safetensors file on its own.
    pub fn open_file(path: impl AsRef<Path>) -> StorageResult<Self> {
        let mut ckpt = Checkpoint { files: Vec::new(), entries: HashMap::new() };
        ckpt.add_file(path.as_ref())?;
        Ok(ckpt)
    }

    fn add_file(&mut self, path: &Path) -> StorageResult<()> {
        let file = File::open(path).map_err(|e| StorageError::io(path, e))?;
        // SAFETY: the map is read-only and checkpoint files are treated as immutable while
        // a model is loaded (as every safetensors loader does); all reads go through
        // bounds-checked slices of the map.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StorageError::io(path, e))?;
        let bad = |reason: String| StorageError::InvalidSafetensors { path: path.into(), reason };
        // read_metadata checks the header length, the JSON, that offsets are contiguous and
        // match each shape and dtype, and that the file is exactly as long as the header says.
        let (header_len, metadata) = SafeTensors::read_metadata(&map[..]).map_err(|e| bad(format!("{e}")))?;
        let data_start = header_len.checked_add(8).ok_or_else(|| bad("header length overflows".into()))?;
        let file_index = self.files.len();
        for (name, info) in metadata.tensors() {
            let (rel_start, rel_end) = info.data_offsets;
            let start = data_start.checked_add(rel_start);
            let end = data_start.checked_add(rel_end);
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if s <= e && e <= map.len() => (s, e),
                _ => {
                    return Err(StorageError::TensorOutOfBounds {
                        path: path.into(),
                        name: name.clone(),
                        dtype: format!("{:?}", info.dtype),
                    })
                }
            };
            if let Some(prev) = self.entries.get(&name) {
                return Err(StorageError::DuplicateTensor {
                    name,
                    first: self.files[prev.file].path.clone(),
                    second: path.into(),
                });
            }
            let dtype = DType::from_safetensors(info.dtype).ok_or(format!("{:?}", info.dtype));
            self.entries
                .insert(name, Entry { file: file_index, dtype, shape: info.shape.clone(), start, end });
        }
        self.files.push(MappedFile { path: path.into(), map: Arc::new(map) });
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The tensor called `name`, any shape.
    pub fn tensor(&self, name: &str) -> StorageResult<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| StorageError::MissingTensor { name: name.into() })?;
        let dtype =
            e.dtype.clone().map_err(|dtype| StorageError::UnsupportedDtype { name: name.into(), dtype })?;
        Ok(Tensor {
            name: name.into(),
            dtype,
            shape: e.shape.clone(),
            data: TensorData::Mapped { map: self.files[e.file].map.clone(), start: e.start, end: e.end },
        })
    }

    /// The tensor called `name`, which must have exactly `shape`.
    pub fn tensor_with_shape(&self, name: &str, shape: &[usize]) -> StorageResult<Tensor> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(StorageError::ShapeMismatch {
                name: name.into(),
                expected: shape.to_vec(),
                actual: t.shape,
            });
        }
        Ok(t)
    }
}
