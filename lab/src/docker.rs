//! The docker CLI calls the lab makes, each bounded by a timeout.
//!
//! Async calls run through [`run`]; the few that must work inside `Drop` (removing containers,
//! listing them by label) are blocking on purpose, since `Drop` cannot await and must also
//! work while a thread unwinds.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;

use crate::LabError;

/// Upper bound for any single docker CLI call but a build, so a wedged engine fails the caller
/// instead of hanging it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Appended to "could not run docker" errors.
const CLI_HINT: &str = " (is the docker CLI installed and on PATH?)";

/// Runs `docker <args>` with [`CALL_TIMEOUT`] and returns its trimmed stdout.
pub async fn run(args: &[&str]) -> Result<String, LabError> {
    run_with_timeout(args, CALL_TIMEOUT).await
}

/// Runs `docker <args>`, killing it after `timeout`, and returns its trimmed stdout.
pub async fn run_with_timeout(args: &[&str], timeout: Duration) -> Result<String, LabError> {
    let command = format!("docker {}", args.join(" "));
    let output = tokio::time::timeout(
        timeout,
        Command::new("docker")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| LabError::CommandTimeout {
        command: command.clone(),
        timeout,
    })?
    .map_err(|source| LabError::Spawn {
        command: command.clone(),
        hint: CLI_HINT.to_string(),
        source,
    })?;
    if !output.status.success() {
        return Err(LabError::CommandFailed {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The Docker Engine's version; fails when the CLI is missing or the engine unreachable.
pub async fn engine_version() -> Result<String, LabError> {
    run_with_timeout(
        &["version", "--format", "{{.Server.Version}}"],
        Duration::from_secs(20),
    )
    .await
}

/// Whether an image with this tag exists locally.
pub async fn image_exists(tag: &str) -> Result<bool, LabError> {
    match run(&["image", "inspect", "--format", "{{.Id}}", tag]).await {
        Ok(_) => Ok(true),
        Err(LabError::CommandFailed { stderr, .. }) if is_missing(&stderr) => Ok(false),
        Err(err) => Err(err),
    }
}

/// Whether a container with this id or name exists, in any state.
pub async fn container_exists(id_or_name: &str) -> Result<bool, LabError> {
    match run(&["container", "inspect", "--format", "{{.Id}}", id_or_name]).await {
        Ok(_) => Ok(true),
        Err(LabError::CommandFailed { stderr, .. }) if is_missing(&stderr) => Ok(false),
        Err(err) => Err(err),
    }
}

/// The value of label `key` on the container or network (`kind`) `name`: `None` when there is
/// no such object, `Some("")` when it exists without that label.
pub async fn label_of(kind: &str, name: &str, key: &str) -> Result<Option<String>, LabError> {
    let format = format!("{{{{index .Labels {key:?}}}}}");
    let format = if kind == "container" {
        // Containers keep their labels in their config.
        format.replace(".Labels", ".Config.Labels")
    } else {
        format
    };
    match run(&[kind, "inspect", "--format", &format, name]).await {
        // A missing key prints Go's zero value, or `<no value>` for a nil map.
        Ok(value) => Ok(Some(value.replace("<no value>", "").trim().to_string())),
        Err(LabError::CommandFailed { stderr, .. }) if is_missing(&stderr) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Starts a detached container `name` from `image` with no network and the given `key=value`
/// labels, running `command` (empty: the image's default command), and returns its id. A container left half-created by a failed
/// `docker run` is removed again.
pub async fn run_container(
    name: &str,
    image: &str,
    labels: &[&str],
    command: &[&str],
) -> Result<String, LabError> {
    let mut args = vec!["run", "--detach", "--network", "none", "--name", name];
    for label in labels {
        args.extend(["--label", label]);
    }
    args.push(image);
    args.extend(command);
    match run(&args).await {
        Ok(id) => Ok(id),
        Err(err) => {
            // `docker run` may have created the container before failing to start it.
            let _ = remove_blocking(name);
            Err(err)
        }
    }
}

/// Docker's `.State.Status` of a container: `running`, `paused`, `exited`, `created`...
pub async fn state(id_or_name: &str) -> Result<String, LabError> {
    run(&["inspect", "--format", "{{.State.Status}}", id_or_name]).await
}

/// Waits until [`state`] reports `wanted`; the error names the last state seen.
pub async fn wait_for_state(
    id_or_name: &str,
    wanted: &str,
    timeout: Duration,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = state(id_or_name).await?;
        if seen == wanted {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: format!("container {id_or_name} to be {wanted} (it is {seen})"),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Force-removes a container (running or paused) and its anonymous volumes. A container that
/// does not exist is not an error: it is the outcome the caller wants anyway.
pub fn remove_blocking(id_or_name: &str) -> Result<(), LabError> {
    match run_blocking(&["rm", "--force", "--volumes", id_or_name]) {
        Ok(_) => Ok(()),
        Err(LabError::CommandFailed { stderr, .. }) if is_missing(&stderr) => Ok(()),
        Err(err) => Err(err),
    }
}

/// Ids of every container, running or not, carrying `label` (`key` or `key=value`).
pub fn list_labelled_blocking(label: &str) -> Result<Vec<String>, LabError> {
    let filter = format!("label={label}");
    let listed = run_blocking(&["ps", "--all", "--quiet", "--no-trunc", "--filter", &filter])?;
    Ok(listed.split_whitespace().map(str::to_string).collect())
}

/// `docker ... ` says this when an object does not exist.
fn is_missing(stderr: &str) -> bool {
    stderr.contains("No such container")
        || stderr.contains("No such image")
        || stderr.contains("No such object")
        || stderr.contains("No such network")
        // `docker network inspect` of an unknown network.
        || (stderr.contains("network ") && stderr.ends_with(" not found"))
}

/// Blocking variant of [`run`] for `Drop`. A helper thread collects the output (so a full
/// pipe can never stall the child) while this thread enforces [`CALL_TIMEOUT`].
fn run_blocking(args: &[&str]) -> Result<String, LabError> {
    let command = format!("docker {}", args.join(" "));
    let child = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            hint: CLI_HINT.to_string(),
            source,
        })?;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(CALL_TIMEOUT) {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(LabError::Spawn {
                command,
                hint: String::new(),
                source,
            });
        }
        Err(_) => {
            // The helper thread reaps the killed child.
            let _ = kill(pid, Signal::SIGKILL);
            return Err(LabError::CommandTimeout {
                command,
                timeout: CALL_TIMEOUT,
            });
        }
    };
    if !output.status.success() {
        return Err(LabError::CommandFailed {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
