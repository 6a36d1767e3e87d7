//! Real Docker fixtures: a locally built test image and throwaway containers that are always
//! removed, even when a test panics.
//!
//! Nothing can be pulled on test machines, so the image is assembled from the host's own
//! `/bin/sleep` and `/bin/sh` plus the shared libraries they load, on top of `scratch`
//! ([`faultline_lab::image::ensure_image`]). Every container made here carries the label
//! [`TEST_LABEL`], so a harness can sweep leftovers with [`sweep_test_containers`].
//!
//! Docker is driven through the CLI calls of [`faultline_lab::docker`]: `Drop` needs a
//! synchronous way to remove containers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use faultline_lab::docker as lab_docker;
use tokio::sync::OnceCell;

/// Tag of the test image. Bump the version when [`IMAGE_BINARIES`] or the Dockerfile change:
/// an existing image with this tag is reused as is.
pub const TEST_IMAGE: &str = "faultline-test-sleeper:1";

/// Label carried by the test image and every test container (`key=value`).
pub const TEST_LABEL: &str = "faultline.test=1";

/// Host binaries copied into the test image at the same paths.
const IMAGE_BINARIES: &[&str] = &["/bin/sleep", "/bin/sh"];

/// The test image's command.
const IMAGE_CMD: &[&str] = &["/bin/sleep", "infinity"];

/// How long a fresh container may take to report `running`.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The image, built at most once per process (tests run concurrently and all want it).
static IMAGE: OnceCell<String> = OnceCell::const_new();

/// Per-process counter making container names unique together with pid and randomness.
static NAME_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Returns [`TEST_IMAGE`], building it from host binaries if the engine does not have it yet.
///
/// Safe to call concurrently: within a process the build happens once; across processes a
/// duplicate build is harmless (same content, same tag).
pub async fn ensure_test_image() -> anyhow::Result<String> {
    IMAGE
        .get_or_try_init(|| async {
            faultline_lab::image::ensure_image(TEST_IMAGE, IMAGE_BINARIES, IMAGE_CMD, &[TEST_LABEL])
                .await
                .with_context(|| format!("building test image {TEST_IMAGE} from host binaries"))
        })
        .await
        .cloned()
}

/// A name unique across processes and runs: `<prefix>-<pid>-<counter>-<random>`.
pub fn unique_name(prefix: &str) -> String {
    let counter = NAME_COUNTER.fetch_add(1, Ordering::Relaxed);
    // Randomness guards against pid reuse meeting a leftover container of an earlier run.
    let random = getrandom::u32().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or_default()
    });
    format!("{prefix}-{}-{counter}-{random:08x}", std::process::id())
}

/// A running test container (`sleep infinity`, no network) that is force-removed on drop.
#[derive(Debug)]
pub struct TestContainer {
    /// Exact container name (no leading slash).
    pub name: String,
    /// Full container id.
    pub id: String,
}

impl TestContainer {
    /// Starts a container named `<name_prefix>-<unique suffix>`.
    pub async fn start(name_prefix: &str) -> anyhow::Result<TestContainer> {
        Self::start_named(&unique_name(name_prefix), &[]).await
    }

    /// Starts a container with exactly this name and extra `(key, value)` labels, and waits
    /// until it is running. Callers must make `name` unique (see [`unique_name`]).
    pub async fn start_named(name: &str, labels: &[(&str, &str)]) -> anyhow::Result<TestContainer> {
        Self::start_running(name, labels, &[]).await
    }

    /// Starts a container named `<name_prefix>-<unique suffix>` that runs `command` (a
    /// program of [`IMAGE_BINARIES`], e.g. a `/bin/sh -c` loop) instead of `sleep infinity`.
    pub async fn start_with_command(
        name_prefix: &str,
        command: &[&str],
    ) -> anyhow::Result<TestContainer> {
        Self::start_running(&unique_name(name_prefix), &[], command).await
    }

    async fn start_running(
        name: &str,
        labels: &[(&str, &str)],
        command: &[&str],
    ) -> anyhow::Result<TestContainer> {
        let image = ensure_test_image().await?;
        let mut all_labels = vec![TEST_LABEL.to_string()];
        all_labels.extend(labels.iter().map(|(key, value)| format!("{key}={value}")));
        let label_refs: Vec<&str> = all_labels.iter().map(String::as_str).collect();
        let id = lab_docker::run_container(name, &image, &label_refs, command)
            .await
            .with_context(|| format!("starting test container {name}"))?;
        // From here on Drop cleans up, whatever happens.
        let container = TestContainer {
            name: name.to_string(),
            id,
        };
        container.wait_for_state("running", START_TIMEOUT).await?;
        Ok(container)
    }

    /// Docker's `.State.Status`: `running`, `paused`, `exited`, `created`...
    pub async fn state(&self) -> anyhow::Result<String> {
        lab_docker::state(&self.id)
            .await
            .with_context(|| format!("inspecting test container {}", self.name))
    }

    /// Waits until [`TestContainer::state`] reports `wanted`.
    pub async fn wait_for_state(&self, wanted: &str, timeout: Duration) -> anyhow::Result<()> {
        lab_docker::wait_for_state(&self.id, wanted, timeout)
            .await
            .with_context(|| format!("waiting for test container {}", self.name))
    }
}

impl Drop for TestContainer {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and it must also run while a test is
        // unwinding. `rm -f` removes running and paused containers alike.
        remove_container(&self.id);
    }
}

/// Force-removes a container by id or name, reporting (not raising) failures; already gone
/// (a test removed it on purpose) is the outcome we want.
fn remove_container(id_or_name: &str) {
    if let Err(err) = lab_docker::remove_blocking(id_or_name) {
        eprintln!("warning: could not remove test container {id_or_name}: {err}");
    }
}

/// Removes every container labelled [`TEST_LABEL`], from any process or run, and returns how
/// many were removed.
///
/// Meant for harness set-up/tear-down; calling it while other tests run kills their containers.
pub fn sweep_test_containers() -> usize {
    let ids = match lab_docker::list_labelled_blocking(TEST_LABEL) {
        Ok(ids) => ids,
        Err(err) => {
            eprintln!("warning: could not list test containers: {err}");
            return 0;
        }
    };
    for id in &ids {
        remove_container(id);
    }
    ids.len()
}

/// Runs `docker <args>` (bounded by [`lab_docker::CALL_TIMEOUT`]) and returns its trimmed
/// stdout.
pub async fn docker(args: &[&str]) -> anyhow::Result<String> {
    Ok(lab_docker::run(args).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_valid_container_names() {
        let first = unique_name("x-db");
        let second = unique_name("x-db");
        assert_ne!(first, second);
        assert!(first.starts_with("x-db-"));
        assert!(first.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
