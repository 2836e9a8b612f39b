//! The client library's error type. Remote failures carry enough detail to print a one-line
//! warning; the build flow turns them into warnings instead of failing (see `build`).
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A config file that does not parse: names the file and the line.
    #[error("{path}: line {line}, column {column}: {message}")]
    ConfigSyntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A setting that parses but makes no sense (bad URL, bad env var value…).
    #[error("{0}")]
    ConfigInvalid(String),
    #[error("{0}")]
    Recipe(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    /// The build command exited unsuccessfully (the only failure a build reports).
    #[error("build of {key} failed: {message}")]
    BuildFailed { key: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("artifact {0} is corrupt: {1}")]
    Corrupt(String, String),
    /// An artifact that would unpack past the configured bounds, or into something other than
    /// files, directories and symlinks: nothing of it is kept.
    #[error("artifact {0} refused: {1}")]
    Refused(String, String),
}

impl ClientError {
    /// Whether the artifact itself is at fault (corrupt, or refused by the unpack bounds), so
    /// its archive is discarded; other errors (this machine's disk, a lock) leave it.
    pub fn blames_the_artifact(&self) -> bool {
        matches!(self, ClientError::Corrupt(..) | ClientError::Refused(..))
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Adds a context line to I/O errors: `io_err("create /x")(e)`.
pub fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClientError {
    let context = context.into();
    move |source| ClientError::Io { context, source }
}
