//! Text conditioning: prompt cleaning, the umT5 tokenizer, and WanPipeline's
//! prompt-embedding step (encode, keep each prompt's own tokens, zero the rest).

pub mod clean;
mod tables;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::models::umt5::Umt5Encoder;
use crate::tensor::Tensor;

pub use clean::prompt_clean;

/// Wan's max_sequence_length: prompts are padded or truncated to 512 tokens.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// tokenizer/tokenizer.json through the `tokenizers` crate (offline, no network).
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pad_id: u32,
}

/// Token ids and attention mask of a batch, padded to one length. ids, mask: [B, L].
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub batch: usize,
    pub len: usize,
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    /// Whether each prompt was cut to fit (a warning is logged too).
    pub truncated: Vec<bool>,
}

impl Tokens {
    /// Tokens of sample b (the mask's count).
    pub fn seq_len(&self, b: usize) -> usize {
        self.mask[b * self.len..(b + 1) * self.len]
            .iter()
            .filter(|&&m| m > 0)
            .count()
    }
}

impl PromptTokenizer {
    /// Loads `tokenizer.json` from a tokenizer folder or a pipeline root's `tokenizer/`.
    pub fn load(path: &Path) -> Result<Self> {
        let file = [path.join("tokenizer.json"), path.join("tokenizer").join("tokenizer.json")]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                reason: "no tokenizer.json here or in tokenizer/ (reel reads the fast-tokenizer JSON, not spiece.model)"
                    .into(),
            })?;
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::Config {
            path: file.clone(),
            reason: format!("cannot load tokenizer: {e}"),
        })?;
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        Ok(PromptTokenizer {
            inner,
            path: file,
            pad_id,
        })
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// WanPipeline's tokenization: prompt_clean, then the tokenizer with special tokens
    /// (the EOS `</s>`), truncated to `max_len` (EOS kept) and padded to `max_len`.
    pub fn encode(&self, prompts: &[&str], max_len: usize) -> Result<Tokens> {
        if max_len < 1 {
            return Err(Error::invalid("max sequence length must be at least 1"));
        }
        let mut tok = self.inner.clone();
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::invalid(format!("{}: {e}", self.path.display())))?;
        tok.with_padding(None);
        let mut ids = vec![self.pad_id as i64; prompts.len() * max_len];
        let mut mask = vec![0i64; prompts.len() * max_len];
        let mut truncated = vec![false; prompts.len()];
        for (b, p) in prompts.iter().enumerate() {
            let clean = prompt_clean(p);
            let enc = tok
                .encode(clean.as_str(), true)
                .map_err(|e| Error::invalid(format!("tokenizing prompt {b}: {e}")))?;
            if !enc.get_overflowing().is_empty() {
                truncated[b] = true;
                tracing::warn!(
                    "prompt {b} is longer than {max_len} tokens and was truncated (as diffusers truncates it)"
                );
            }
            for (i, &id) in enc.get_ids().iter().take(max_len).enumerate() {
                ids[b * max_len + i] = id as i64;
                mask[b * max_len + i] = 1;
            }
        }
        Ok(Tokens {
            batch: prompts.len(),
            len: max_len,
            ids,
            mask,
            truncated,
        })
    }
}

/// An encoder forward: (ids, mask, batch, len) → last_hidden_state [batch, len, d_model].
pub type EncoderForward<'a> = dyn FnMut(&[i64], &[i64], usize, usize) -> Result<Tensor> + 'a;

/// The text side of a pipeline: tokenizer (optional: `reel component text-encoder` takes
/// ids directly) and the umT5 encoder.
pub struct TextEncoder {
    pub tokenizer: Option<PromptTokenizer>,
    pub encoder: Umt5Encoder,
}

impl TextEncoder {
    /// Loads `text_encoder/` and, if present, `tokenizer/` of a pipeline root. Fails when
    /// the tokenizer's vocabulary does not fit the encoder's embedding.
    pub fn load(root: &Path) -> Result<Self> {
        let encoder = Umt5Encoder::load(root)?;
        let tokenizer = if root.join("tokenizer").is_dir() || root.join("tokenizer.json").is_file()
        {
            Some(PromptTokenizer::load(root)?)
        } else {
            None
        };
        if let Some(t) = &tokenizer {
            if t.vocab_size() > encoder.config.vocab_size {
                return Err(Error::Config {
                    path: t.path().to_path_buf(),
                    reason: format!(
                        "the tokenizer has {} tokens but the text encoder's embedding has {} rows",
                        t.vocab_size(),
                        encoder.config.vocab_size
                    ),
                });
            }
        }
        Ok(TextEncoder { tokenizer, encoder })
    }

    /// WanPipeline's `_get_t5_prompt_embeds`: tokenize to `max_len`, encode with the mask,
    /// keep each prompt's first seq_len vectors and zero the rest. Out: [B, max_len, d_model].
    pub fn encode_prompts(&self, prompts: &[&str], max_len: usize) -> Result<Tensor> {
        self.encode_prompts_with(prompts, max_len, &mut |ids, mask, b, l| {
            self.encoder.forward(ids, mask, b, l)
        })
    }

    /// [`TextEncoder::encode_prompts`] with the encoder's forward given (ids, mask, batch,
    /// len → last_hidden_state): the device pipeline passes its umT5 session.
    pub fn encode_prompts_with(
        &self,
        prompts: &[&str],
        max_len: usize,
        forward: &mut EncoderForward<'_>,
    ) -> Result<Tensor> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Error::invalid(
                "this pipeline has no tokenizer/tokenizer.json: pass prompt embeddings instead",
            )
        })?;
        let tokens = tok.encode(prompts, max_len)?;
        let mut out = forward(&tokens.ids, &tokens.mask, tokens.batch, tokens.len)?;
        let d = self.encoder.config.d_model;
        let data = out.data_mut();
        for b in 0..tokens.batch {
            let n = tokens.seq_len(b);
            data[(b * max_len + n) * d..(b + 1) * max_len * d].fill(0.0);
        }
        Ok(out)
    }
}
