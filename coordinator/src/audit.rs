//! Writes the audit log: every operator action, every command sent, every refusal. A failure
//! to write is logged loudly but never turns an allowed action into an error.

use crate::clock::now_ms;
use crate::store::Store;

/// Audit writer over the store.
#[derive(Debug, Clone)]
pub struct Auditor {
    store: Store,
}

impl Auditor {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub async fn ok(&self, actor: &str, action: &str, detail: &str) {
        self.write(actor, action, "ok", detail).await;
    }

    pub async fn refused(&self, actor: &str, action: &str, detail: &str) {
        tracing::warn!(%actor, %action, "refused: {detail}");
        self.write(actor, action, "refused", detail).await;
    }

    pub async fn failed(&self, actor: &str, action: &str, detail: &str) {
        self.write(actor, action, "failed", detail).await;
    }

    async fn write(&self, actor: &str, action: &str, outcome: &str, detail: &str) {
        if let Err(err) = self
            .store
            .audit(now_ms(), actor, action, outcome, detail)
            .await
        {
            tracing::error!(%err, %actor, %action, "could not write audit entry");
        }
    }

    /// For synchronous callers (the TLS accept loop): writes in the background.
    pub fn spawn_refused(&self, actor: String, action: &'static str, detail: String) {
        let auditor = self.clone();
        tokio::spawn(async move { auditor.refused(&actor, action, &detail).await });
    }
}
