//! Model files handed over from JS: `Map<path, Blob | Uint8Array>`, read tensor by tensor.

use std::cell::Cell;
use std::rc::Rc;

use js_sys::{Function, Map, Uint8Array};
use tgate::loader::ModelSource;
use tgate::safetensors::ByteSource;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;

use crate::errors::js_error;

/// How much of the weights has been read, for progress reports and for the load result.
pub struct ReadStats {
    /// Bytes of all weight files handed over.
    pub total: f64,
    pub read: Cell<f64>,
    pub largest: Cell<f64>,
    pub on_progress: Option<Function>,
}

/// Files handed over from JS: `Map<path, Blob | Uint8Array>`. A weight file is read tensor by
/// tensor (a `Blob` through `FileReaderSync`, which exists in workers), so wasm memory holds one
/// tensor at a time and there is no second full copy of a checkpoint; its entry is removed from
/// the map when it is opened, so the page's reference goes as soon as the load is done with it.
pub struct JsSource {
    files: Map,
    name: &'static str,
    stats: Rc<ReadStats>,
    limits: Limits,
}

/// What the device can hold, in bytes.
#[derive(Clone, Copy)]
pub struct Limits {
    /// The largest storage binding (or the caller's smaller cap).
    pub tensor: Option<u64>,
    /// Memory a generation may use at once.
    pub memory: Option<u64>,
}

/// One file as JS gave it.
#[derive(Clone)]
enum JsFile {
    Bytes(Uint8Array),
    Blob(web_sys::Blob),
}

impl JsFile {
    fn of(value: &JsValue) -> Option<JsFile> {
        if let Some(a) = value.dyn_ref::<Uint8Array>() {
            Some(JsFile::Bytes(a.clone()))
        } else {
            value
                .dyn_ref::<web_sys::Blob>()
                .map(|b| JsFile::Blob(b.clone()))
        }
    }

    fn len(&self) -> u64 {
        match self {
            JsFile::Bytes(a) => a.length() as u64,
            JsFile::Blob(b) => b.size() as u64,
        }
    }

    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let describe = |e: JsValue| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
                .unwrap_or_else(|| format!("{e:?}"))
        };
        match self {
            JsFile::Bytes(a) => Ok(a.subarray(start as u32, end as u32).to_vec()),
            JsFile::Blob(b) => {
                let part = b
                    .slice_with_f64_and_f64(start as f64, end as f64)
                    .map_err(describe)?;
                let buf = web_sys::FileReaderSync::new()
                    .and_then(|r| r.read_as_array_buffer(&part))
                    .map_err(describe)?;
                Ok(Uint8Array::new(&buf).to_vec())
            }
        }
    }
}

/// A weight file being read in ranges (counted for progress).
struct JsBytes {
    file: JsFile,
    stats: Rc<ReadStats>,
}

impl ByteSource for JsBytes {
    fn len(&self) -> u64 {
        self.file.len()
    }

    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        let bytes = self.file.read_range(start, end)?;
        let s = &self.stats;
        let n = bytes.len() as f64;
        s.read.set(s.read.get() + n);
        s.largest.set(s.largest.get().max(n));
        if let Some(f) = &s.on_progress {
            // A failing progress callback must not fail the load.
            let _ = f.call2(&JsValue::NULL, &s.read.get().into(), &s.total.into());
        }
        Ok(bytes)
    }
}

impl JsSource {
    pub fn new(
        files: Map,
        name: &'static str,
        stats: Rc<ReadStats>,
        limits: Limits,
    ) -> Result<Self, JsValue> {
        let mut ok = true;
        files.for_each(&mut |value, key| {
            ok &= key.is_string() && JsFile::of(&value).is_some();
        });
        if !ok {
            return Err(js_error(
                "invalid_parameter",
                "files must map path strings to Blob or Uint8Array",
            ));
        }
        Ok(JsSource {
            files,
            name,
            stats,
            limits,
        })
    }

    /// Bytes of the weight files in `files`.
    pub fn weight_bytes(files: &Map) -> f64 {
        let mut total = 0.0;
        files.for_each(&mut |value, key| {
            if key.as_string().is_some_and(|k| k.ends_with(".safetensors")) {
                total += JsFile::of(&value).map_or(0, |f| f.len()) as f64;
            }
        });
        total
    }

    fn get(&self, path: &str) -> Option<JsFile> {
        JsFile::of(&self.files.get(&JsValue::from_str(path)))
    }
}

impl ModelSource for JsSource {
    fn read(&self, path: &str) -> tgate::Result<Option<Vec<u8>>> {
        let Some(file) = self.get(path) else {
            return Ok(None);
        };
        file.read_range(0, file.len())
            .map(Some)
            .map_err(|e| tgate::Error::MissingFile(format!("{path}: {e}")))
    }

    fn open(&self, path: &str) -> tgate::Result<Option<Box<dyn ByteSource>>> {
        let Some(file) = self.get(path) else {
            return Ok(None);
        };
        self.files.delete(&JsValue::from_str(path));
        Ok(Some(Box::new(JsBytes {
            file,
            stats: self.stats.clone(),
        })))
    }

    fn max_tensor_bytes(&self) -> Option<u64> {
        self.limits.tensor
    }

    fn max_memory_bytes(&self) -> Option<u64> {
        self.limits.memory
    }

    fn describe(&self) -> String {
        self.name.into()
    }
}
