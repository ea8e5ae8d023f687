//! CLIP tokenizer reproducing `transformers.CLIPTokenizer` (transformers 5.x, which is backed by the
//! `tokenizers` library), including how it turns a diffusers `tokenizer/` folder's special tokens
//! into added tokens.
//!
//! Pipeline (the same as `CLIPTokenizer.__init__` builds):
//! * special ("added") tokens such as `<|endoftext|>` are split out of the raw text first;
//! * normalizer: NFC, every run of whitespace becomes one space, lowercase;
//! * pre-tokenizer: keep only the matches of CLIP's word regex (contractions, letter runs, single
//!   digits, punctuation runs), then GPT-2 byte-level mapping;
//! * model: BPE with the `</w>` end-of-word suffix, unknown token `<|endoftext|>`;
//! * post-processing: `BOS + first (max_length - 2) tokens + EOS`, right-padded with the pad token.
//!
//! Two folder layouts exist, and transformers reads both the same way:
//! * `vocab.json` + `merges.txt` (the released SD / Würstchen repositories);
//! * `tokenizer.json` (what `save_pretrained` writes since transformers 5). transformers 5's
//!   `CLIPTokenizer` takes only the BPE vocabulary and merges out of it and rebuilds the rest of
//!   the pipeline from its own class definition, with the special tokens from
//!   `tokenizer_config.json` (its `added_tokens_decoder`); so does [`ClipTokenizer::from_tokenizer_json`].
//!   When both layouts are present, `tokenizer.json` wins, as in transformers.
//!
//! Loading takes bytes, so this works on `wasm32-unknown-unknown` too.

use crate::error::{Error, Result};
use crate::loader::ModelSource;
use serde_json::{Map, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{self, Lowercase, Replace, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's word regex, as used by `transformers.CLIPTokenizer`.
const WORD_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Sequence length used when the config gives no (sensible) `model_max_length`.
const DEFAULT_MAX_LENGTH: usize = 77;
/// Larger `model_max_length` values are transformers' "no limit" sentinel (1e30).
const MAX_SANE_LENGTH: u64 = 1 << 20;
/// The named special tokens a CLIP tokenizer uses, in transformers' order, with their defaults.
const NAMED: [(&str, &str); 4] = [
    ("bos_token", "<|startoftext|>"),
    ("eos_token", "<|endoftext|>"),
    ("unk_token", "<|endoftext|>"),
    ("pad_token", "<|endoftext|>"),
];

/// A special-token value as written in a config: a bare string or an `AddedToken` object.
/// transformers compares the two kinds as never equal, which matters when it deduplicates them.
#[derive(Clone, PartialEq)]
enum Spec {
    Plain(String),
    Token(AddedToken),
}

impl Spec {
    fn content(&self) -> &str {
        match self {
            Spec::Plain(s) => s,
            Spec::Token(t) => &t.content,
        }
    }
}

/// A CLIP BPE tokenizer producing fixed-length id sequences for the text encoder.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl ClipTokenizer {
    /// From a diffusers `tokenizer/` folder's files: vocab.json, merges.txt, and optionally
    /// tokenizer_config.json and special_tokens_map.json (for pad token and model_max_length).
    pub fn from_files(
        vocab_json: &[u8],
        merges_txt: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        special_tokens_map_json: Option<&[u8]>,
    ) -> Result<Self> {
        let vocab: Vocab = serde_json::from_slice(vocab_json)
            .map_err(|e| Error::config("vocab.json", format!("invalid vocabulary: {e}")))?;
        let merges = parse_merges_txt(merges_txt)?;
        Self::from_parts(
            vocab,
            merges,
            tokenizer_config_json,
            special_tokens_map_json,
        )
    }

    /// From a `tokenizer.json` (the `tokenizers` library's own format, written by transformers 5's
    /// `save_pretrained`) and the optional configs beside it. Like transformers 5's `CLIPTokenizer`,
    /// only the BPE vocabulary and merges are taken from the file; the special tokens come from
    /// `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_tokenizer_json(
        tokenizer_json: &[u8],
        tokenizer_config_json: Option<&[u8]>,
        special_tokens_map_json: Option<&[u8]>,
    ) -> Result<Self> {
        let (vocab, merges) = parse_tokenizer_json(tokenizer_json)?;
        Self::from_parts(
            vocab,
            merges,
            tokenizer_config_json,
            special_tokens_map_json,
        )
    }

    /// From the tokenizer folder `dir` of a model source: `tokenizer.json` when present (as
    /// transformers prefers it), else `vocab.json` + `merges.txt`; the configs beside them when
    /// present.
    pub fn from_folder(src: &dyn ModelSource, dir: &str) -> Result<Self> {
        let config = src.read(&format!("{dir}/tokenizer_config.json"))?;
        let map = src.read(&format!("{dir}/special_tokens_map.json"))?;
        if let Some(json) = src.read(&format!("{dir}/tokenizer.json"))? {
            return Self::from_tokenizer_json(&json, config.as_deref(), map.as_deref());
        }
        let vocab = src.read(&format!("{dir}/vocab.json"))?;
        let merges = src.read(&format!("{dir}/merges.txt"))?;
        match (vocab, merges) {
            (Some(v), Some(m)) => Self::from_files(&v, &m, config.as_deref(), map.as_deref()),
            (v, _) => Err(Error::MissingFile(format!(
                "{dir}/{} ({}): a tokenizer needs {dir}/tokenizer.json, or {dir}/vocab.json and {dir}/merges.txt",
                if v.is_none() { "vocab.json" } else { "merges.txt" },
                src.describe()
            ))),
        }
    }

    fn from_parts(
        vocab: Vocab,
        merges: Vec<(String, String)>,
        tokenizer_config_json: Option<&[u8]>,
        special_tokens_map_json: Option<&[u8]>,
    ) -> Result<Self> {
        let config = parse_object("tokenizer_config.json", tokenizer_config_json)?;
        let map = parse_object("special_tokens_map.json", special_tokens_map_json)?;
        let decoder = added_tokens_decoder(&config)?;
        let named = named_tokens(&config, &map, &decoder)?;
        let added = tokens_to_add(&decoder, &named);
        let max_length = max_length(&config)?;

        let mut tokenizer = clip_pipeline(build_bpe(vocab, merges, named[2].content())?)?;
        // Added after the normalizer is set: normalized added tokens are matched in normalized text.
        tokenizer.add_tokens(&added);

        let id_of = |spec: &Spec| {
            tokenizer.token_to_id(spec.content()).ok_or_else(|| {
                Error::Tokenizer(format!("special token `{}` has no id", spec.content()))
            })
        };
        let (bos_id, eos_id, pad_id) = (id_of(&named[0])?, id_of(&named[1])?, id_of(&named[3])?);
        Ok(Self {
            tokenizer,
            max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// Length of every encoded sequence: `model_max_length` from the config, 77 by default.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id used to fill sequences up to [`Self::max_length`].
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Id of the start-of-text token put before every prompt.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-text token put after every prompt.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// ids padded / truncated to max_length exactly like
    /// `tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids`
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_mask(text)?.0)
    }

    /// The ids and the matching attention mask (1 for real tokens incl. BOS/EOS, 0 for padding).
    pub fn encode_with_mask(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let encoding = self.tokenizer.encode(text, false).map_err(tok_err)?;
        let body = self.max_length - 2;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(encoding.get_ids().iter().take(body));
        ids.push(self.eos_id);
        let mut mask = vec![1; ids.len()];
        mask.resize(self.max_length, 0);
        ids.resize(self.max_length, self.pad_id);
        Ok((ids, mask))
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Parses an optional JSON file that must hold an object; absent means empty.
fn parse_object(file: &str, bytes: Option<&[u8]>) -> Result<Map<String, Value>> {
    match bytes {
        None => Ok(Map::new()),
        Some(b) => match serde_json::from_slice(b) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(Error::config(file, "not a JSON object")),
            Err(e) => Err(Error::config(file, format!("invalid JSON: {e}"))),
        },
    }
}

/// Reads a special-token value: a string, or an object with `content` and optional flags.
/// Objects from special_tokens_map.json are always special (as transformers forces it); elsewhere
/// `special` defaults to false. `normalized` defaults to `!special`, like `tokenizers.AddedToken`.
fn parse_spec(file: &str, key: &str, v: &Value, force_special: bool) -> Result<Option<Spec>> {
    let obj = match v {
        Value::Null => return Ok(None),
        Value::String(s) => return Ok(Some(Spec::Plain(s.clone()))),
        Value::Object(o) => o,
        _ => {
            return Err(Error::config(
                file,
                format!("`{key}` must be a string or an object"),
            ))
        }
    };
    let flag = |name: &str, default: bool| match obj.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Error::config(
            file,
            format!("`{key}.{name}` must be a boolean"),
        )),
    };
    let content = obj.get("content").and_then(Value::as_str);
    let content =
        content.ok_or_else(|| Error::config(file, format!("`{key}` has no string `content`")))?;
    let special = force_special || flag("special", false)?;
    let token = AddedToken::from(content, special)
        .single_word(flag("single_word", false)?)
        .lstrip(flag("lstrip", false)?)
        .rstrip(flag("rstrip", false)?)
        .normalized(flag("normalized", !special)?);
    Ok(Some(Spec::Token(token)))
}

/// Reads merges.txt: a `#version` line, then one `left right` pair per line, best first.
fn parse_merges_txt(merges_txt: &[u8]) -> Result<Vec<(String, String)>> {
    let text = std::str::from_utf8(merges_txt)
        .map_err(|e| Error::config("merges.txt", format!("not UTF-8: {e}")))?;
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        match split_merge(line) {
            Some(pair) => merges.push(pair),
            None => {
                return Err(Error::config(
                    "merges.txt",
                    format!("line {}: expected `left right`", n + 1),
                ))
            }
        }
    }
    Ok(merges)
}

/// `"left right"` -> `(left, right)`; `None` unless exactly two non-empty parts.
fn split_merge(line: &str) -> Option<(String, String)> {
    match line.split(' ').collect::<Vec<_>>()[..] {
        [a, b] if !a.is_empty() && !b.is_empty() => Some((a.to_string(), b.to_string())),
        _ => None,
    }
}

/// The BPE vocabulary and merges of a `tokenizer.json`. Merges are written as `"left right"`
/// strings by older `tokenizers` versions and as `["left", "right"]` pairs by newer ones.
fn parse_tokenizer_json(bytes: &[u8]) -> Result<(Vocab, Vec<(String, String)>)> {
    const FILE: &str = "tokenizer.json";
    let root: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::config(FILE, format!("invalid JSON: {e}")))?;
    let model = root
        .get("model")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::config(FILE, "no `model` object"))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => {
            return Err(Error::config(
                FILE,
                format!("model type `{other}` is not a CLIP tokenizer (expected BPE)"),
            ))
        }
    }
    let vocab: Vocab = match model.get("vocab") {
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| Error::config(FILE, format!("`model.vocab`: {e}")))?,
        None => return Err(Error::config(FILE, "no `model.vocab`")),
    };
    let list = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::config(FILE, "no `model.merges` list"))?;
    let mut merges = Vec::with_capacity(list.len());
    for (n, m) in list.iter().enumerate() {
        let pair = match m {
            Value::String(s) => split_merge(s),
            Value::Array(parts) => match &parts[..] {
                [Value::String(a), Value::String(b)] if !a.is_empty() && !b.is_empty() => {
                    Some((a.clone(), b.clone()))
                }
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| {
            Error::config(FILE, format!("`model.merges[{n}]` is not a pair of tokens"))
        })?);
    }
    Ok((vocab, merges))
}

/// Builds CLIP's BPE model from a vocabulary (token -> id) and merges (best first).
fn build_bpe(vocab: Vocab, merges: Vec<(String, String)>, unk: &str) -> Result<BPE> {
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk.to_string())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".to_string())
        .fuse_unk(false)
        .build()
        .map_err(tok_err)
}

/// `added_tokens_decoder` of `tokenizer_config.json`, sorted by id (empty when absent).
fn added_tokens_decoder(config: &Map<String, Value>) -> Result<Vec<(u64, AddedToken)>> {
    // Tokens listed in `added_tokens_decoder` come first, sorted by id; when that key exists,
    // transformers ignores special_tokens_map.json.
    let mut decoder: Vec<(u64, AddedToken)> = Vec::new();
    if let Some(entries) = config.get("added_tokens_decoder") {
        let entries = entries.as_object().ok_or_else(|| {
            Error::config(
                "tokenizer_config.json",
                "`added_tokens_decoder` is not an object",
            )
        })?;
        for (id, v) in entries {
            let id = id.parse().map_err(|_| {
                Error::config(
                    "tokenizer_config.json",
                    format!("bad added token id `{id}`"),
                )
            })?;
            let what = format!("added_tokens_decoder.{id}");
            match parse_spec("tokenizer_config.json", &what, v, false)? {
                Some(Spec::Token(t)) => decoder.push((id, t)),
                _ => {
                    return Err(Error::config(
                        "tokenizer_config.json",
                        format!("`{what}` is not a token object"),
                    ))
                }
            }
        }
        decoder.sort_by_key(|(id, _)| *id);
    }
    Ok(decoder)
}

/// The named special tokens (`NAMED` order): special_tokens_map.json overrides
/// tokenizer_config.json, which overrides CLIPTokenizer's defaults (given as plain strings); when
/// `added_tokens_decoder` exists, transformers ignores special_tokens_map.json.
fn named_tokens(
    config: &Map<String, Value>,
    map: &Map<String, Value>,
    decoder: &[(u64, AddedToken)],
) -> Result<Vec<Spec>> {
    let use_map = decoder.is_empty() && !config.contains_key("added_tokens_decoder");
    // Resolve each named token: special_tokens_map.json overrides tokenizer_config.json,
    // which overrides CLIPTokenizer's defaults (given as plain strings).
    let mut named = Vec::with_capacity(NAMED.len());
    for (key, default) in NAMED {
        let from_map = match map.get(key) {
            Some(v) if use_map => parse_spec("special_tokens_map.json", key, v, true)?,
            _ => None,
        };
        let from_config = match config.get(key) {
            Some(v) => parse_spec("tokenizer_config.json", key, v, false)?,
            None => None,
        };
        let mut spec = from_map
            .or(from_config)
            .unwrap_or_else(|| Spec::Plain(default.into()));
        if let Some((_, t)) = decoder.iter().find(|(_, t)| t.content == spec.content()) {
            spec = Spec::Token(t.clone());
        }
        named.push(spec);
    }

    Ok(named)
}

/// The tokens transformers hands to the backend, in order; a named token is skipped when its
/// content is already a decoder entry or an equal value is already listed.
fn tokens_to_add(decoder: &[(u64, AddedToken)], named: &[Spec]) -> Vec<AddedToken> {
    // The list of tokens transformers hands to the backend, in order; a named token is skipped
    // when its content is already a decoder entry or an equal value is already listed.
    let mut listed: Vec<Spec> = decoder
        .iter()
        .map(|(_, t)| Spec::Token(t.clone()))
        .collect();
    for spec in named {
        let known = decoder.iter().any(|(_, t)| t.content == spec.content());
        if !known && !listed.contains(spec) {
            listed.push(spec.clone());
        }
    }
    // The backend keeps the flags of the last token added with a given content.
    let mut added: Vec<AddedToken> = Vec::new();
    for spec in listed {
        let token = match spec {
            Spec::Plain(s) => AddedToken::from(s, true),
            Spec::Token(mut t) => {
                t.special |= named.iter().any(|n| n.content() == t.content);
                t
            }
        };
        match added.iter_mut().find(|a| a.content == token.content) {
            Some(slot) => *slot = token,
            None => added.push(token),
        }
    }

    added
}

/// `model_max_length` (77 when absent; transformers' "very large" placeholder means the default).
fn max_length(config: &Map<String, Value>) -> Result<usize> {
    Ok(match config.get("model_max_length") {
        None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
        Some(v) => match v.as_u64() {
            Some(n) if (2..=MAX_SANE_LENGTH).contains(&n) => n as usize,
            Some(n) if n > MAX_SANE_LENGTH => DEFAULT_MAX_LENGTH,
            None if v.as_f64().is_some_and(|f| f > MAX_SANE_LENGTH as f64) => DEFAULT_MAX_LENGTH,
            _ => {
                return Err(Error::config(
                    "tokenizer_config.json",
                    format!("`model_max_length` must be an integer >= 2, got {v}"),
                ))
            }
        },
    })
}

/// CLIP's normalizer and pre-tokenizer around a BPE model.
fn clip_pipeline(model: BPE) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(model);
    let normalizer = normalizers::Sequence::new(vec![
        NFC.into(),
        Replace::new(
            normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(tok_err)?
        .into(),
        Lowercase.into(),
    ]);
    let split = Split::new(
        SplitPattern::Regex(WORD_REGEX.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(tok_err)?;
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    Ok(tokenizer)
}
