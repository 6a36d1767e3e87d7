//! SIGTERM/SIGINT handling, installed at start so that a signal arriving early is not lost
//! (and, as PID 1 in a container, not ignored: PID 1 has no default signal actions).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("installing the {name} handler: {source}")]
pub struct ShutdownError {
    name: &'static str,
    #[source]
    source: std::io::Error,
}

/// The installed handlers.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> Result<Signals, ShutdownError> {
        let term = signal(SignalKind::terminate()).map_err(|source| ShutdownError {
            name: "SIGTERM",
            source,
        })?;
        let int = signal(SignalKind::interrupt()).map_err(|source| ShutdownError {
            name: "SIGINT",
            source,
        })?;
        Ok(Signals { term, int })
    }

    /// Waits for the next signal; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
