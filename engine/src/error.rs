use hetmoe_storage::StorageError;

pub type EngineResult<T> = Result<T, EngineError>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Offload(#[from] hetmoe_offload::OffloadError),
    #[error("token id {token} at prompt position {position} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, position: usize, vocab: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("{needed} positions are needed but the model supports {max} (max_position_embeddings)")]
    ContextTooLong { needed: usize, max: usize },
    #[error("invalid option {option}: {reason}")]
    InvalidOption { option: &'static str, reason: String },
    #[error("the model folder has no tokenizer.json; pass token ids instead of text")]
    NoTokenizer,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("could not start the thread pool: {0}")]
    ThreadPool(String),
}
