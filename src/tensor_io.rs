//! Reading and writing named tensors: safetensors (with string metadata) and PyTorch `.pt`.
//!
//! Writes are atomic (see [`crate::util::write_atomic`]). Reads check the file and name it in
//! every error, so a truncated download or a wrong path gives a message rather than a panic.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// Errors of tensor file IO.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (truncated, corrupt header, ...).
    #[error("{path}: not a valid safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    /// A PyTorch checkpoint could not be read.
    #[error("{path}: cannot read PyTorch checkpoint: {reason}")]
    BadPickle { path: PathBuf, reason: String },
    /// A tensor the caller needs is absent.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    /// A file that is not what its place asks for (a folder, an empty file, a broken config).
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// A metadata entry the caller needs is absent or malformed.
    #[error("{path}: metadata `{key}`: {reason}")]
    BadMetadata { path: PathBuf, key: String, reason: String },
    #[error(transparent)]
    Util(#[from] crate::util::UtilError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TensorIoError>;

/// Named tensors plus the string metadata of a safetensors file.
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// A tensor by name, or an error naming the file and the tensor.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| TensorIoError::MissingTensor { path: self.path.clone(), name: name.to_string() })
    }

    /// A metadata value by key, or an error naming the file and the key.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata.get(key).map(|s| s.as_str()).ok_or_else(|| TensorIoError::BadMetadata {
            path: self.path.clone(),
            key: key.to_string(),
            reason: "absent".to_string(),
        })
    }

    /// A metadata value parsed with `FromStr`.
    pub fn meta_parse<T: std::str::FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let raw = self.meta(key)?;
        raw.parse::<T>().map_err(|e| TensorIoError::BadMetadata {
            path: self.path.clone(),
            key: key.to_string(),
            reason: format!("cannot parse {raw:?}: {e}"),
        })
    }
}

/// Serialises named tensors (and metadata) into safetensors bytes.
pub fn safetensors_bytes(tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    // safetensors' View impl for candle tensors expects contiguous CPU data.
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        owned.push((name.clone(), tensor.to_device(&Device::Cpu)?.contiguous()?));
    }
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    let bytes = safetensors::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), meta)
        .map_err(|e| TensorIoError::BadSafetensors { path: PathBuf::from("<memory>"), reason: e.to_string() })?;
    Ok(canonical_header(bytes))
}

/// The same safetensors bytes with the header's metadata in key order. `safetensors` writes
/// metadata from a `HashMap`, whose order changes from one process to the next, so the same
/// weights exported twice gave different files (and a dirty checkout after re-running
/// `scripts/train-mnist`). Tensor data and offsets are untouched; the header is re-padded with
/// spaces to a multiple of 8 bytes, as the format asks.
fn canonical_header(bytes: Vec<u8>) -> Vec<u8> {
    let Some(n) = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize) else {
        return bytes;
    };
    let Some(header) = bytes.get(8..8 + n) else { return bytes };
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(header) else { return bytes };
    if let Some(meta) = value.get_mut("__metadata__").and_then(|m| m.as_object_mut()) {
        let sorted: BTreeMap<String, serde_json::Value> = std::mem::take(meta).into_iter().collect();
        *meta = sorted.into_iter().collect();
    }
    let Ok(mut json) = serde_json::to_vec(&value) else { return bytes };
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Writes named tensors and metadata to a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let bytes = safetensors_bytes(tensors, metadata).map_err(|e| match e {
        TensorIoError::BadSafetensors { reason, .. } => {
            TensorIoError::BadSafetensors { path: path.to_path_buf(), reason }
        }
        other => other,
    })?;
    crate::util::write_atomic(path, &bytes)?;
    Ok(())
}

/// Reads every tensor and the metadata of a safetensors file onto `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|source| TensorIoError::Io { path: path.to_path_buf(), source })?;
    read_safetensors_bytes(path, &bytes, device)
}

/// Parses safetensors bytes that came from `path` (used in messages only).
pub fn read_safetensors_bytes(path: &Path, bytes: &[u8], device: &Device) -> Result<TensorFile> {
    let bad = |reason: String| TensorIoError::BadSafetensors { path: path.to_path_buf(), reason };
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let tensor =
            candle_core::safetensors::Load::load(&view, device).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, tensor);
    }
    Ok(TensorFile { path: path.to_path_buf(), tensors, metadata })
}

/// Reads only the metadata of a safetensors file (cheap: the header is at the front).
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).map_err(|source| TensorIoError::Io { path: path.to_path_buf(), source })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| TensorIoError::BadSafetensors { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// The weight file of a run folder or file path, checked to be a readable, non-empty file:
/// a folder in its place, a missing file or an empty one is an error saying which.
pub fn weight_file(path: &Path) -> Result<PathBuf> {
    let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
    let bad = |reason: &str| TensorIoError::BadFile { path: file.clone(), reason: reason.to_string() };
    match std::fs::metadata(&file) {
        Err(_) if !path.exists() => Err(TensorIoError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        }),
        Err(_) => Err(bad("no such file (a run folder holds model.safetensors)")),
        Ok(m) if m.is_dir() => Err(bad("is a folder, not a weight file")),
        Ok(m) if m.len() == 0 => Err(bad("the file is empty")),
        Ok(_) => Ok(file),
    }
}

/// The config that goes with a weight file: the `config` entry of its metadata, or else the
/// `config.json` beside it. Returns the JSON and the file it came from; `Ok(None)` when there
/// is neither. A config that is there but not JSON is an error naming its file.
pub fn embedded_config(file: &Path) -> Result<Option<(serde_json::Value, PathBuf)>> {
    let is_safetensors = file.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        if let Some(text) = read_safetensors_metadata(file)?.get("config") {
            let value = serde_json::from_str(text).map_err(|e| TensorIoError::BadMetadata {
                path: file.to_path_buf(),
                key: "config".into(),
                reason: format!("not JSON: {e}"),
            })?;
            return Ok(Some((value, file.to_path_buf())));
        }
    }
    let beside = file.with_file_name("config.json");
    if !beside.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&beside).map_err(|source| TensorIoError::Io { path: beside.clone(), source })?;
    let value = serde_json::from_str(&text)
        .map_err(|e| TensorIoError::BadFile { path: beside.clone(), reason: format!("not a JSON config: {e}") })?;
    Ok(Some((value, beside)))
}

/// Reads a PyTorch `.pt`/`.pth` checkpoint, in either `torch.save` format (the ZIP format of
/// torch ≥ 1.6, or the legacy one). `key` selects a nested state dict (LlamaGen stores its
/// weights under `model`); when that key is absent, `model`, `module` and `state_dict` are
/// tried, then the top level.
///
/// The archive is read by [`crate::zipfile`] (which follows ZIP64 end records the way
/// `torch.load` does, see there) and its `data.pkl` by candle's pickle machine. Each tensor's
/// storage is read from its own entry, so a checkpoint is never loaded whole; views (storage
/// offsets, transposes, any strides) are gathered from their storage as `torch.load` would.
pub fn read_pytorch(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let bad = |reason: String| TensorIoError::BadPickle { path: path.to_path_buf(), reason };
    let head = {
        let mut head = [0u8; 4];
        let mut file =
            std::fs::File::open(path).map_err(|source| TensorIoError::Io { path: path.to_path_buf(), source })?;
        let n = std::io::Read::read(&mut file, &mut head).unwrap_or(0);
        head[..n].to_vec()
    };
    let legacy = head.len() >= 2 && head[0] == 0x80 && head[..] != *b"PK\x03\x04";
    // candle's pickle machine panics on some damaged input (found by tests/fuzz.rs: an index
    // out of bounds on a one-byte change); such a panic becomes an error naming the file.
    let guarded = |f: &mut dyn FnMut() -> Result<HashMap<String, Tensor>>| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        std::panic::set_hook(previous);
        result.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(bad(format!("the pickle reader failed ({what}): the file is damaged or not a torch.save checkpoint")))
        })
    };
    if legacy {
        return guarded(&mut || read_legacy_pytorch(path, key).map_err(&bad));
    }
    let mut zip = crate::zipfile::ZipReader::open(path).map_err(|e| bad(e.to_string()))?;
    let tensors = guarded(&mut || {
        let mut found = Vec::new();
        for k in state_dict_keys(key) {
            found = pytorch_tensor_infos(&mut zip, k).map_err(&bad)?;
            if !found.is_empty() {
                break;
            }
        }
        if found.is_empty() {
            return Err(bad("no tensors found".to_string()));
        }
        let mut tensors = HashMap::with_capacity(found.len());
        for info in found {
            let tensor =
                read_pytorch_tensor(&mut zip, &info).map_err(|e| bad(format!("tensor `{}`: {e}", info.name)))?;
            tensors.insert(info.name, tensor);
        }
        Ok(tensors)
    })?;
    Ok(tensors)
}

/// Reads a legacy `torch.save` file (torch < 1.6, or `_use_new_zipfile_serialization=False`):
/// pickles of the magic number, the protocol version and system info, then the object (whose
/// tensors refer to storages by key), then the sorted storage keys, then each storage as an
/// int64 element count and its raw little-endian bytes.
fn read_legacy_pytorch(path: &Path, key: Option<&str>) -> std::result::Result<HashMap<String, Tensor>, String> {
    use candle_core::pickle::{Object, Stack};
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    // The magic number 0x1950a86a20f9469cfc6c, pickled (protocol 2, LONG1 of 10 bytes).
    const MAGIC: [u8; 15] = [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e];
    let mut rest = bytes.strip_prefix(&MAGIC[..]).ok_or("not a torch.save file (no torch magic number)")?;
    let mut next_pickle = |what: &str| -> std::result::Result<Object, String> {
        let mut stack = Stack::empty();
        stack.read_loop(&mut rest).map_err(|e| format!("{what}: {e}"))?;
        stack.finalize().map_err(|e| format!("{what}: {e}"))
    };
    next_pickle("protocol version")?;
    next_pickle("system info")?;
    let object = next_pickle("the saved object")?;
    let Object::List(keys) = next_pickle("storage keys")? else {
        return Err("the storage key list is missing".to_string());
    };
    let keys: Vec<String> = keys.into_iter().filter_map(|k| k.unicode().ok()).collect();
    // The storages follow in key order, each an int64 element count then the bytes; the element
    // size comes from the storage type recorded wherever the storage is referenced.
    let mut elem_of = HashMap::new();
    storage_element_sizes(&object, &mut elem_of);
    let mut storages: HashMap<String, &[u8]> = HashMap::new();
    let mut infos = Vec::new();
    // The state dict: the first of the keys LlamaGen's loaders try that is present.
    let present =
        |k: &str| matches!(&object, Object::Dict(e) if e.iter().any(|(n, _)| *n == Object::Unicode(k.to_string())));
    let chosen = state_dict_keys(key).into_iter().flatten().find(|k| present(k));
    let object = match (chosen, object) {
        (Some(k), Object::Dict(entries)) => entries
            .into_iter()
            .find(|(n, _)| *n == Object::Unicode(k.to_string()))
            .map(|(_, v)| v)
            .unwrap_or(Object::None),
        (_, object) => object,
    };
    if let Object::Dict(entries) = object {
        for (name, value) in entries {
            if let Some(info) = value.into_tensor_info(name, Path::new("")).map_err(|e| e.to_string())? {
                infos.push(info);
            }
        }
    }
    for k in &keys {
        let count = rest.get(..8).ok_or_else(|| format!("storage {k} is truncated"))?;
        let count = u64::from_le_bytes(count.try_into().expect("8 bytes"));
        let elem = *elem_of.get(k).ok_or_else(|| format!("storage {k}: unknown element type"))? as u64;
        let len = count
            .checked_mul(elem)
            .filter(|&l| l <= (rest.len() - 8) as u64)
            .ok_or_else(|| format!("storage {k} is truncated"))?;
        storages.insert(k.clone(), &rest[8..8 + len as usize]);
        rest = &rest[8 + len as usize..];
    }
    let mut tensors = HashMap::new();
    for info in infos {
        let storage_key = info.path.trim_start_matches('/');
        let storage =
            storages.get(storage_key).ok_or_else(|| format!("tensor `{}`: no storage {storage_key}", info.name))?;
        let tensor = view_of_storage(storage, &info).map_err(|e| format!("tensor `{}`: {e}", info.name))?;
        tensors.insert(info.name, tensor);
    }
    if tensors.is_empty() {
        return Err("no tensors found".to_string());
    }
    Ok(tensors)
}

/// The element size of every storage a legacy pickle references, by storage key: persistent ids
/// are `('storage', <torch.XStorage>, key, location, numel, …)`.
fn storage_element_sizes(object: &candle_core::pickle::Object, out: &mut HashMap<String, usize>) {
    use candle_core::pickle::Object;
    match object {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(parts) = &**id {
                if let [Object::Unicode(tag), Object::Class { class_name, .. }, Object::Unicode(key), ..] = &parts[..] {
                    let size = match class_name.as_str() {
                        "DoubleStorage" | "LongStorage" | "ComplexFloatStorage" => 8,
                        "FloatStorage" | "IntStorage" => 4,
                        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
                        "ByteStorage" | "CharStorage" | "BoolStorage" => 1,
                        _ => 0,
                    };
                    if tag == "storage" && size > 0 {
                        out.insert(key.clone(), size);
                    }
                }
            }
        }
        Object::Tuple(items) | Object::List(items) => items.iter().for_each(|o| storage_element_sizes(o, out)),
        Object::Dict(entries) => entries.iter().for_each(|(k, v)| {
            storage_element_sizes(k, out);
            storage_element_sizes(v, out);
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            storage_element_sizes(callable, out);
            storage_element_sizes(args, out);
        }
        _ => {}
    }
}

/// Where a checkpoint may keep its state dict, in the order tried: the key asked for, then the
/// ones LlamaGen's scripts look under (`model`, `module` for DeepSpeed saves, `state_dict`),
/// then the top level.
fn state_dict_keys(key: Option<&str>) -> Vec<Option<&str>> {
    let mut keys = vec![key];
    for k in ["model", "module", "state_dict"] {
        if key != Some(k) && key.is_some() {
            keys.push(Some(k));
        }
    }
    keys.push(None);
    keys.dedup();
    keys
}

/// The tensors a checkpoint's `*/data.pkl` describes (under `key` when given and present).
fn pytorch_tensor_infos(
    zip: &mut crate::zipfile::ZipReader,
    key: Option<&str>,
) -> std::result::Result<Vec<candle_core::pickle::TensorInfo>, String> {
    use candle_core::pickle::{Object, Stack};
    let pickles: Vec<String> =
        zip.entries().iter().filter(|e| e.name.ends_with("data.pkl")).map(|e| e.name.clone()).collect();
    if pickles.is_empty() {
        return Err("no data.pkl in the archive: not a torch.save checkpoint".to_string());
    }
    let mut infos = Vec::new();
    for name in pickles {
        let bytes = zip.read(&name).map_err(|e| e.to_string())?;
        let mut stack = Stack::empty();
        stack.read_loop(&mut &bytes[..]).map_err(|e| format!("{name}: {e}"))?;
        let object = stack.finalize().map_err(|e| format!("{name}: {e}"))?;
        // A scripted module pickles as Build(Reduce(__torch__.Module, state)).
        let object = match object {
            Object::Build { callable, args } => match *callable {
                Object::Reduce { callable, .. }
                    if matches!(&*callable, Object::Class { module_name, class_name }
                        if module_name == "__torch__" && class_name == "Module") =>
                {
                    *args
                }
                _ => continue,
            },
            other => other,
        };
        let object = match (key, object) {
            (Some(key), Object::Dict(entries)) => {
                match entries.into_iter().find(|(k, _)| *k == Object::Unicode(key.to_string())) {
                    Some((_, value)) => value,
                    None => continue,
                }
            }
            (_, object) => object,
        };
        let Object::Dict(entries) = object else { continue };
        let dir = std::path::PathBuf::from(name.trim_end_matches(".pkl"));
        for (tensor_name, value) in entries {
            if let Some(info) = value.into_tensor_info(tensor_name, &dir).map_err(|e| e.to_string())? {
                infos.push(info);
            }
        }
    }
    Ok(infos)
}

/// `len` bytes of a storage entry from byte `skip` (stored entries are streamed, not loaded).
fn read_storage(
    zip: &mut crate::zipfile::ZipReader,
    entry: &str,
    skip: usize,
    len: usize,
) -> std::result::Result<Vec<u8>, String> {
    let mut bytes = vec![0u8; len];
    let info = zip.entry(entry).map_err(|e| e.to_string())?.clone();
    if info.method == 0 && skip == 0 && len as u64 == info.size {
        // The whole storage: read it so that its CRC-32 is checked.
        let mut reader = zip.verified_reader(entry).map_err(|e| e.to_string())?;
        std::io::Read::read_exact(&mut reader, &mut bytes).map_err(|e| format!("{entry}: {e}"))?;
        reader.finish().map_err(|e| format!("{entry}: {e}"))?;
    } else if info.method == 0 {
        let mut reader = zip.stored_reader(entry, skip as u64).map_err(|e| e.to_string())?;
        std::io::Read::read_exact(&mut reader, &mut bytes).map_err(|e| format!("{entry}: {e}"))?;
    } else {
        let all = zip.read(entry).map_err(|e| e.to_string())?;
        bytes.copy_from_slice(all.get(skip..skip + len).ok_or_else(|| format!("{entry} is too short"))?);
    }
    Ok(bytes)
}

/// Reads one tensor: its storage entry, then the view (offset, shape, strides) over it.
fn read_pytorch_tensor(
    zip: &mut crate::zipfile::ZipReader,
    info: &candle_core::pickle::TensorInfo,
) -> std::result::Result<Tensor, String> {
    let layout = &info.layout;
    let elem = info.dtype.size_in_bytes();
    let dims = layout.dims().to_vec();
    let entry_size = zip.entry(&info.path).map_err(|e| e.to_string())?.size;
    // candle records the storage offset in bytes. Sizes come from a file: checked arithmetic, so
    // a damaged one is an error, not an overflow or a huge allocation.
    let offset = layout.start_offset() / elem;
    let too_big = || format!("its shape {dims:?} does not fit its storage of {entry_size} bytes");
    let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(too_big)?;
    let count_bytes = count.checked_mul(elem).ok_or_else(too_big)?;
    if layout.is_contiguous() {
        if (offset * elem).checked_add(count_bytes).is_none_or(|end| end as u64 > entry_size) {
            return Err(too_big());
        }
        let bytes = read_storage(zip, &info.path, offset * elem, count_bytes)?;
        return Tensor::from_raw_buffer(&bytes, info.dtype, &dims, &Device::Cpu).map_err(|e| e.to_string());
    }
    let storage_len = (entry_size as usize) / elem;
    let bytes = read_storage(zip, &info.path, 0, storage_len * elem)?;
    view_of_storage(&bytes, info)
}

/// The tensor `info` describes (offset, shape, strides) over the whole storage `bytes`.
fn view_of_storage(bytes: &[u8], info: &candle_core::pickle::TensorInfo) -> std::result::Result<Tensor, String> {
    let layout = &info.layout;
    let elem = info.dtype.size_in_bytes();
    let dims = layout.dims().to_vec();
    let offset = layout.start_offset() / elem;
    let storage_len = bytes.len() / elem;
    let too_big = || format!("its shape {dims:?} does not fit its storage of {} bytes", bytes.len());
    let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or_else(too_big)?;
    if count == 0 {
        return Tensor::zeros(dims, info.dtype, &Device::Cpu).map_err(|e| e.to_string());
    }
    // A broadcast view may hold more elements than its storage, within reason.
    let last = dims
        .iter()
        .zip(layout.stride())
        .try_fold(offset, |acc, (d, s)| d.saturating_sub(1).checked_mul(*s).and_then(|x| acc.checked_add(x)))
        .ok_or_else(too_big)?;
    if last >= storage_len || count > 4 * storage_len + (1 << 20) || last > u32::MAX as usize {
        return Err(too_big());
    }
    if layout.is_contiguous() {
        return Tensor::from_raw_buffer(
            &bytes[offset * elem..(offset + count) * elem],
            info.dtype,
            &dims,
            &Device::Cpu,
        )
        .map_err(|e| e.to_string());
    }
    let storage = Tensor::from_raw_buffer(&bytes[..storage_len * elem], info.dtype, &[storage_len], &Device::Cpu)
        .map_err(|e| e.to_string())?;
    let mut index = vec![offset as u32];
    for (&d, &s) in dims.iter().zip(layout.stride()) {
        index = index.iter().flat_map(|&base| (0..d).map(move |i| base + (i * s) as u32)).collect();
    }
    let index = Tensor::new(index, &Device::Cpu).map_err(|e| e.to_string())?;
    storage.index_select(&index, 0).and_then(|t| t.reshape(dims)).map_err(|e| e.to_string())
}

/// Reads named tensors from `.safetensors`, `.pt`, `.pth` or `.bin` by extension.
pub fn read_weights(path: &Path, device: &Device, pt_key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "pt" | "pth" | "bin" | "ckpt" => {
            let map = read_pytorch(path, pt_key)?;
            let mut out = HashMap::with_capacity(map.len());
            for (name, tensor) in map {
                out.insert(name, tensor.to_device(device)?);
            }
            Ok(out)
        }
        _ => Ok(read_safetensors(path, device)?.tensors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_keeps_values_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::arange(0f32, 6f32, &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let b = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
        let mut meta = BTreeMap::new();
        meta.insert("grid".to_string(), "16".to_string());
        write_safetensors(&path, &[("a".into(), a.t().unwrap()), ("b".into(), b)], &meta).unwrap();
        let file = read_safetensors(&path, &Device::Cpu).unwrap();
        assert_eq!(file.tensor("a").unwrap().to_vec2::<f32>().unwrap(), vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]);
        assert_eq!(file.tensor("b").unwrap().to_vec1::<u32>().unwrap(), vec![1, 2, 3]);
        assert_eq!(file.meta_parse::<usize>("grid").unwrap(), 16);
        assert!(file.tensor("c").unwrap_err().to_string().contains("missing tensor `c`"));
    }

    /// The same tensors and metadata always give the same bytes (the metadata is written in key
    /// order, whatever the order of the map `safetensors` builds), and they read back.
    #[test]
    fn safetensors_bytes_are_deterministic() {
        let a = Tensor::arange(0f32, 12f32, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let b = Tensor::new(&[7u32, 8], &Device::Cpu).unwrap();
        let meta: BTreeMap<String, String> = (0..12).map(|i| (format!("key{i}"), format!("value {i}"))).collect();
        let tensors = [("w".to_string(), a), ("ids".to_string(), b)];
        let first = safetensors_bytes(&tensors, &meta).unwrap();
        for _ in 0..8 {
            assert_eq!(safetensors_bytes(&tensors, &meta).unwrap(), first);
        }
        let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let file = read_safetensors_bytes(Path::new("m.safetensors"), &first, &Device::Cpu).unwrap();
        assert_eq!(file.tensor("w").unwrap().to_vec2::<f32>().unwrap()[2], vec![8., 9., 10., 11.]);
        assert_eq!(file.tensor("ids").unwrap().to_vec1::<u32>().unwrap(), vec![7, 8]);
        for (k, v) in &meta {
            assert_eq!(file.meta(k).unwrap(), v);
        }
    }

    #[test]
    fn truncated_safetensors_gives_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        write_safetensors(&path, &[("a".into(), a)], &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let err = read_safetensors(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("t.safetensors"), "{err}");
        assert!(err.contains("not a valid safetensors"), "{err}");
    }
}
