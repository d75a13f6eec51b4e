//! Text ↔ token ids through the model folder's `tokenizer.json` (Hugging Face `tokenizers`).

use std::path::Path;

use crate::error::{EngineError, EngineResult};

/// The model's tokenizer. Encoding applies the file's post-processor (e.g. Mixtral's BOS).
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> EngineResult<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    pub fn encode(&self, text: &str) -> EngineResult<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> EngineResult<String> {
        self.inner.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()))
    }
}

/// Turns a stream of ids into text pieces, emitting only completed characters (byte-level
/// BPE can split a UTF-8 character across tokens).
#[derive(Debug, Default)]
pub(crate) struct StreamDecoder {
    ids: Vec<u32>,
    emitted: usize,
}

impl StreamDecoder {
    pub(crate) fn push(&mut self, tok: &TextTokenizer, id: u32) -> EngineResult<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}
