//! The CLI side of the control API.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Reply, Request};

/// Errors talking to an agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No agent at that socket.
    #[error("cannot reach the agent at {path}: {cause} (is `vmig agent` running?)")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// Cause.
        cause: std::io::Error,
    },
    /// The agent's socket refused this user (file mode or credentials check).
    #[error("permission denied on the agent's control socket {path}: only root (or the agent's --control-group) may drive it")]
    Denied {
        /// Socket.
        path: PathBuf,
    },
    /// The agent refused this client before reading its request.
    #[error("{0}")]
    Refused(String),
    /// I/O on the socket.
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    /// A reply that does not parse.
    #[error("bad reply from the agent: {0}")]
    Decode(#[from] serde_json::Error),
    /// The agent closed without a final reply.
    #[error("the agent closed the connection without an answer")]
    Closed,
}

/// A connection carrying one request.
#[derive(Debug)]
pub struct Call {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl Call {
    /// Sends `req` to the agent at `path`.
    pub async fn start(path: &Path, req: &Request) -> Result<Call, ClientError> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|cause| match cause.kind() {
                std::io::ErrorKind::PermissionDenied => ClientError::Denied {
                    path: path.to_path_buf(),
                },
                _ => ClientError::Connect {
                    path: path.to_path_buf(),
                    cause,
                },
            })?;
        let (r, mut w) = s.into_split();
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        let mut lines = BufReader::new(r).lines();
        if let Err(e) = w.write_all(&line).await {
            // An agent that refused this client said why before closing: read that.
            if let Ok(Some(l)) = lines.next_line().await {
                if let Ok(Reply::Error(why)) = serde_json::from_str::<Reply>(&l) {
                    return Err(ClientError::Refused(why));
                }
            }
            return Err(e.into());
        }
        Ok(Call { lines, _write: w })
    }

    /// The next reply line.
    pub async fn next(&mut self) -> Result<Reply, ClientError> {
        match self.lines.next_line().await? {
            Some(l) => Ok(serde_json::from_str(&l)?),
            None => Err(ClientError::Closed),
        }
    }
}

/// One request, one reply.
pub async fn call(path: &Path, req: &Request) -> Result<Reply, ClientError> {
    Call::start(path, req).await?.next().await
}
