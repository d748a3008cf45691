//! The one error type of ceccmctl and the exit status each kind of failure maps to.

use std::process::ExitCode;

/// Why a command failed. The variant decides the exit status scripts see.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line or its input (manifests, names, kinds) is wrong; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The server answered with its error JSON.
    #[error("Error from server ({code}): {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// No connection could be made to the server.
    #[error(
        "cannot reach the ceccm server at {url}: {reason}\n\
         Set the server with --server URL, the CECCM_SERVER environment variable, \
         or `ceccmctl config set-context NAME --server URL --current`."
    )]
    Unreachable { url: String, reason: String },
    /// The server's TLS certificate did not verify against the trusted CAs.
    #[error(
        "TLS certificate verification failed for {url}: {reason}\n\
         Trust the server's CA with --ca-file FILE, the CECCM_CA_FILE environment variable or \
         the context's certificateAuthority (a server started with --tls-self-signed keeps it \
         in DATA_DIR/tls/ca.crt)."
    )]
    Certificate { url: String, reason: String },
    /// Anything else that went wrong while carrying the command out (local I/O, a broken stream).
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// 2 for usage errors, 1 for everything that failed after the command was understood.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) => ExitCode::from(2),
            Error::Api { .. }
            | Error::Unreachable { .. }
            | Error::Certificate { .. }
            | Error::Failed(_) => ExitCode::from(1),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api { status: 404, .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shorthand for [`Error::Usage`] with a formatted message.
macro_rules! usage {
    ($($arg:tt)*) => { $crate::error::Error::Usage(format!($($arg)*)) };
}
pub(crate) use usage;

/// Shorthand for [`Error::Failed`] with a formatted message.
macro_rules! failed {
    ($($arg:tt)*) => { $crate::error::Error::Failed(format!($($arg)*)) };
}
pub(crate) use failed;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_documented_contract() {
        assert_eq!(Error::Usage("x".into()).exit_code(), ExitCode::from(2));
        let api = Error::Api {
            status: 404,
            code: "NotFound".into(),
            message: "regions \"x\" not found".into(),
        };
        assert_eq!(api.exit_code(), ExitCode::from(1));
        assert!(api.is_not_found());
        assert_eq!(
            api.to_string(),
            "Error from server (NotFound): regions \"x\" not found"
        );
        let down = Error::Unreachable {
            url: "http://127.0.0.1:9".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(down.exit_code(), ExitCode::from(1));
        let text = down.to_string();
        assert!(text.contains("http://127.0.0.1:9"), "{text}");
        assert!(
            text.contains("--server") && text.contains("CECCM_SERVER"),
            "{text}"
        );
    }
}
