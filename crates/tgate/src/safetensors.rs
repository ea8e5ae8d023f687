//! A small, strict reader and writer for the safetensors format
//! (8-byte little-endian header length, a JSON header, then raw little-endian data).
//!
//! Everything is checked up front (header bounds, offsets, dtype × shape = byte length), so a
//! corrupt or truncated file is reported as [`Error::CorruptWeights`] naming the file, and a later
//! read can only fail on a name, a shape or a dtype, each with its own typed error.

use std::collections::BTreeMap;

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Element types found in diffusers checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    Other,
}

impl Dtype {
    fn parse(s: &str) -> Dtype {
        match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            _ => Dtype::Other,
        }
    }

    /// Bytes per element (`None` for unsupported types).
    fn size(self) -> Option<usize> {
        match self {
            Dtype::F64 | Dtype::I64 => Some(8),
            Dtype::F32 | Dtype::I32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            Dtype::Other => None,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    dtype_name: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file (u64: a checkpoint may exceed wasm32's `usize`).
    start: u64,
    end: u64,
}

/// Random access to the bytes of one file. A checkpoint is read tensor by tensor through it, so
/// loading never holds a second full copy of a large file (natively a file handle, in the
/// browser a `Blob`; in tests and for small files, bytes in memory).
pub trait ByteSource {
    /// Length of the file in bytes.
    fn len(&self) -> u64;
    /// The bytes `[start, end)`; `start <= end <= len()` is guaranteed by the caller.
    fn read_range(&self, start: u64, end: u64) -> std::result::Result<Vec<u8>, String>;
}

impl ByteSource for Vec<u8> {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_range(&self, start: u64, end: u64) -> std::result::Result<Vec<u8>, String> {
        Ok(self[start as usize..end as usize].to_vec())
    }
}

/// Headers larger than this are refused as corrupt (as the reference implementation does), so
/// a crafted length cannot make the reader allocate gigabytes.
const MAX_HEADER: u64 = 100 << 20;

/// A parsed safetensors file: the validated header, and the source its tensors are read from.
pub struct SafeTensors {
    file: String,
    data: Box<dyn ByteSource>,
    data_start: u64,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SafeTensors({}, {} tensors)",
            self.file,
            self.entries.len()
        )
    }
}

/// One tensor read to the host as f32.
#[derive(Debug, Clone)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl SafeTensors {
    /// Parses and validates a file held in memory; `file` names it in errors.
    pub fn parse(file: impl Into<String>, bytes: Vec<u8>) -> Result<Self> {
        Self::open(file, Box::new(bytes))
    }

    /// Reads and validates the header of `data` (nothing else is read until a tensor is asked
    /// for); `file` names it in errors.
    pub fn open(file: impl Into<String>, data: Box<dyn ByteSource>) -> Result<Self> {
        let file = file.into();
        let corrupt = |message: String| Error::CorruptWeights {
            file: file.clone(),
            message,
        };
        let len = data.len();
        if len < 8 {
            return Err(corrupt(format!("{len} bytes is too short for a header")));
        }
        let read = |start: u64, end: u64| {
            data.read_range(start, end)
                .map_err(|e| corrupt(format!("cannot read bytes {start}..{end}: {e}")))
        };
        let mut len8 = [0u8; 8];
        len8.copy_from_slice(&read(0, 8)?);
        let header_len = u64::from_le_bytes(len8);
        let data_start = 8u64
            .checked_add(header_len)
            .filter(|&end| end <= len)
            .ok_or_else(|| {
                corrupt(format!(
                    "header length {header_len} runs past the end of the {len}-byte file"
                ))
            })?;
        if header_len > MAX_HEADER {
            return Err(corrupt(format!(
                "a {header_len}-byte header is implausibly large"
            )));
        }
        let header: serde_json::Value = serde_json::from_slice(&read(8, data_start)?)
            .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
        let header = header
            .as_object()
            .ok_or_else(|| corrupt("header is not a JSON object".into()))?;
        let data_len = len - data_start;
        let mut entries = BTreeMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = |what: &str| corrupt(format!("tensor `{name}`: {what}"));
            let dtype_name = info
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| bad("no dtype"))?;
            let shape = info
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad("no shape"))?
                .iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("shape is not a list of sizes"))?;
            let offsets = info
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
                .ok_or_else(|| bad("no data_offsets pair"))?;
            let (start, end) = offsets;
            if start > end || end > data_len {
                return Err(bad(&format!(
                    "data [{start}, {end}) lies outside the {data_len} data bytes (file truncated?)"
                )));
            }
            if usize::try_from(end - start).is_err() {
                return Err(bad(&format!(
                    "{} bytes do not fit this platform's memory",
                    end - start
                )));
            }
            let dtype = Dtype::parse(dtype_name);
            if let Some(size) = dtype.size() {
                let expected = shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
                if expected.map(|n| n as u64) != Some(end - start) {
                    return Err(bad(&format!(
                        "{} bytes for shape {shape:?} of {dtype_name} (needs {expected:?})",
                        end - start
                    )));
                }
            }
            entries.insert(
                name.clone(),
                Entry {
                    dtype,
                    dtype_name: dtype_name.to_string(),
                    shape,
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        Ok(SafeTensors {
            file,
            data,
            data_start,
            entries,
        })
    }

    /// The bytes of one tensor, read from the source now.
    fn raw(&self, e: &Entry) -> Result<Vec<u8>> {
        let bytes = self
            .data
            .read_range(e.start, e.end)
            .map_err(|err| Error::CorruptWeights {
                file: self.file.clone(),
                message: format!("cannot read bytes {}..{}: {err}", e.start, e.end),
            })?;
        if bytes.len() as u64 != e.end - e.start {
            return Err(Error::CorruptWeights {
                file: self.file.clone(),
                message: format!(
                    "read {} bytes where {} were expected (file changed or truncated?)",
                    bytes.len(),
                    e.end - e.start
                ),
            });
        }
        Ok(bytes)
    }

    /// The file name used in errors.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|k| k.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Shape of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Dtype of a tensor, if present.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    fn entry(&self, name: &str, expected: &[usize]) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            file: self.file.clone(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
        })
    }

    /// Reads a floating-point tensor as f32 (from F32, F16, BF16 or F64), without a shape check.
    pub fn read_f32_any(&self, name: &str) -> Result<HostTensor> {
        let e = self.entry(name, &[])?;
        let raw = &self.raw(e)?;
        let data: Vec<f32> = match e.dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            _ => {
                return Err(Error::DtypeMismatch {
                    file: self.file.clone(),
                    tensor: name.to_string(),
                    expected: "F32, F16, BF16 or F64".into(),
                    found: e.dtype_name.clone(),
                })
            }
        };
        Ok(HostTensor {
            shape: e.shape.clone(),
            data,
        })
    }

    /// Reads a floating-point tensor as f32 and checks its shape.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let e = self.entry(name, expected)?;
        if e.shape != expected {
            return Err(Error::ShapeMismatch {
                file: self.file.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: e.shape.clone(),
            });
        }
        self.read_f32_any(name)
    }

    /// Reads an integer tensor (I64 or I32) as i64.
    pub fn read_i64_any(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let e = self.entry(name, &[])?;
        let raw = &self.raw(e)?;
        let data = match e.dtype {
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            Dtype::I32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            _ => {
                return Err(Error::DtypeMismatch {
                    file: self.file.clone(),
                    tensor: name.to_string(),
                    expected: "I64 or I32".into(),
                    found: e.dtype_name.clone(),
                })
            }
        };
        Ok((e.shape.clone(), data))
    }

    /// Bytes of the data section (for size reports).
    pub fn data_len(&self) -> u64 {
        self.data.len() - self.data_start
    }
}

/// Serialises f32 tensors to safetensors bytes (names sorted, as the reference format does).
pub fn write_f32(tensors: &[(&str, &[usize], &[f32])]) -> Vec<u8> {
    let mut sorted: Vec<_> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in &sorted {
        let len = data.len() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len] }),
        );
        offset += len;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for (_, _, data) in &sorted {
        for v in data.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let a = [1.0f32, -2.5, 3.0, 4.0];
        let bytes = write_f32(&[("a", &[2, 2], &a)]);
        let st = SafeTensors::parse("x.safetensors", bytes.clone()).unwrap();
        assert_eq!(st.read_f32("a", &[2, 2]).unwrap().data, a);
        assert!(matches!(
            st.read_f32("a", &[4]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            st.read_f32("b", &[4]),
            Err(Error::MissingTensor { .. })
        ));
        // Truncation is caught at parse time.
        let cut = bytes[..bytes.len() - 3].to_vec();
        assert!(matches!(
            SafeTensors::parse("x", cut),
            Err(Error::CorruptWeights { .. })
        ));
        assert!(matches!(
            SafeTensors::parse("x", vec![1, 2, 3]),
            Err(Error::CorruptWeights { .. })
        ));
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            SafeTensors::parse("x", huge),
            Err(Error::CorruptWeights { .. })
        ));
    }

    /// A source that records every read.
    struct Counting {
        bytes: Vec<u8>,
        reads: std::rc::Rc<std::cell::RefCell<Vec<(u64, u64)>>>,
    }

    impl ByteSource for Counting {
        fn len(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_range(&self, start: u64, end: u64) -> std::result::Result<Vec<u8>, String> {
            self.reads.borrow_mut().push((start, end));
            Ok(self.bytes[start as usize..end as usize].to_vec())
        }
    }

    #[test]
    fn reads_tensor_by_tensor() {
        let big = vec![0.5f32; 1000];
        let small = [1.0f32, 2.0];
        let bytes = write_f32(&[("big", &[1000], &big), ("small", &[2], &small)]);
        let total = bytes.len() as u64;
        let reads = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let st = SafeTensors::open(
            "c",
            Box::new(Counting {
                bytes,
                reads: reads.clone(),
            }),
        )
        .unwrap();
        // Opening reads the length and the header only.
        let header_end = reads.borrow().iter().map(|r| r.1).max().unwrap();
        assert!(header_end < total - 4000, "{header_end} of {total}");
        assert_eq!(st.read_f32("small", &[2]).unwrap().data, small);
        assert_eq!(*reads.borrow().last().unwrap(), (total - 8, total));
        assert_eq!(st.read_f32("big", &[1000]).unwrap().data, big);
        let largest = reads.borrow().iter().map(|r| r.1 - r.0).max().unwrap();
        assert_eq!(largest, 4000);
        // A source that comes back short is an error, not garbage.
        struct Short(Vec<u8>);
        impl ByteSource for Short {
            fn len(&self) -> u64 {
                self.0.len() as u64
            }
            fn read_range(&self, start: u64, end: u64) -> std::result::Result<Vec<u8>, String> {
                let end = if end - start > 100 { end - 1 } else { end };
                Ok(self.0[start as usize..end as usize].to_vec())
            }
        }
        let st =
            SafeTensors::open("s", Box::new(Short(write_f32(&[("big", &[1000], &big)])))).unwrap();
        assert!(matches!(
            st.read_f32("big", &[1000]),
            Err(Error::CorruptWeights { .. })
        ));
    }

    #[test]
    fn half_precision() {
        let header = br#"{"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[4,6]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&f16::from_f32(1.5).to_le_bytes());
        bytes.extend_from_slice(&f16::from_f32(-0.25).to_le_bytes());
        bytes.extend_from_slice(&bf16::from_f32(3.0).to_le_bytes());
        let st = SafeTensors::parse("h", bytes).unwrap();
        assert_eq!(st.read_f32("h", &[2]).unwrap().data, vec![1.5, -0.25]);
        assert_eq!(st.read_f32("b", &[1]).unwrap().data, vec![3.0]);
    }
}
