//! Operator commands of the binary besides `run`: offline inspection of a checkpoint directory
//! and savepoint files (`offline`), the restore pre-flight (`preflight`), and requests to a
//! running instance (`remote`).

pub mod offline;
pub mod preflight;
pub mod remote;

/// A command's failure, printed by `main` as `checkpointer: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    File(#[from] crate::store::portable::PortableError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot reach the service at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the service at {url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error(transparent)]
    Token(#[from] crate::http::HttpError),
    #[error("cannot print the result: {0}")]
    Print(#[from] serde_json::Error),
}
