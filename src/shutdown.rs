//! Signals: the first SIGTERM or Ctrl-C starts a graceful drain through one
//! [`CancellationToken`]; a second one exits at once. SIGHUP asks for a configuration reload.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancels `token` on the first SIGTERM/SIGINT; exits the process with 130 on the second.
pub fn listen_for_signals(token: CancellationToken) {
    // Registered before returning, not in the task: a SIGTERM that arrives before the task
    // first runs must drain, not kill.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    tokio::spawn(async move {
        let Ok(mut term) = term else {
            warn!("cannot install the SIGTERM handler; only Ctrl-C will stop costwatch gracefully");
            let _ = tokio::signal::ctrl_c().await;
            token.cancel();
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("shutdown requested; draining (send the signal again to exit at once)");
        token.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        warn!("second signal: exiting without draining; unflushed usage is recounted on restart");
        std::process::exit(130);
    });
}

/// SIGHUP, registered now: from here on it asks for a configuration reload instead of ending
/// the process (its default action). `None` when the handler cannot be installed.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            warn!(%error, "cannot install the SIGHUP handler; reload with POST /-/reload instead");
            None
        }
    }
}
