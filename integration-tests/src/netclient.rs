//! A TCP client in a container, for the network and telemetry tests: a bash loop on the
//! Docker bridge that connects to a service of the test (on the bridge's gateway, this host)
//! every 200 ms and logs each outcome, so a test can compare what the application saw with
//! what the kernel's telemetry counted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::docker::{TEST_LABEL, TestContainer, docker, unique_name};

/// The client image: bash (for `/dev/tcp`) and sleep. Bump when the content changes.
pub const CLIENT_IMAGE: &str = "faultline-test-bash:1";

/// What bash prints (to stderr, merged into the log) when connect() fails with ETIMEDOUT.
pub const TIMED_OUT: &str = "connect: Connection timed out";

/// The client image, built from the host's bash and sleep if the engine lacks it.
pub async fn client_image() -> anyhow::Result<String> {
    faultline_lab::image::ensure_image(
        CLIENT_IMAGE,
        &["/bin/bash", "/bin/sleep"],
        &["/bin/bash"],
        &[TEST_LABEL],
    )
    .await
    .context("building the bash client image")
}

/// The Docker bridge's gateway: this host, as the containers on the bridge reach it.
pub async fn bridge_gateway() -> anyhow::Result<String> {
    let gateway = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ])
    .await?;
    if !gateway.trim().is_empty() {
        return Ok(gateway.trim().to_string());
    }
    // Older engines leave the gateway out of the IPAM config: docker0's address.
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "docker0"])
        .output()
        .context("running ip addr show docker0")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_string)
        .context("docker0 has no IPv4 address")
}

/// Starts a client container (name `PREFIX-...`) on the bridge connecting to `gateway:port`
/// every 200 ms; `docker_args` go to `docker run` (e.g. `--sysctl`). Its log holds `ok` or
/// `fail` per attempt, and bash's error lines.
pub async fn start_client(
    prefix: &str,
    gateway: &str,
    port: u16,
    docker_args: &[&str],
) -> anyhow::Result<TestContainer> {
    let image = client_image().await?;
    let name = unique_name(prefix);
    let script = format!(
        "while :; do if : <>/dev/tcp/{gateway}/{port}; then echo ok; else echo fail; fi; \
         /bin/sleep 0.2; done 2>&1"
    );
    let mut args = vec![
        "run",
        "--detach",
        "--name",
        &name,
        "--label",
        TEST_LABEL,
        "--network",
        "bridge",
    ];
    args.extend_from_slice(docker_args);
    args.extend([image.as_str(), "/bin/bash", "-c", &script]);
    let id = docker(&args).await?;
    let container = TestContainer { name, id };
    container
        .wait_for_state("running", Duration::from_secs(20))
        .await?;
    Ok(container)
}

/// The client's own account: `ok`, `fail`, `timed-out` (bash's ETIMEDOUT message) and
/// `other-error` (any other connect error line).
pub async fn outcomes(container: &TestContainer) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let logs = docker(&["logs", &container.id]).await?;
    let mut counts = BTreeMap::new();
    for line in logs.lines().map(str::trim) {
        let key = match line {
            "ok" => "ok",
            "fail" => "fail",
            // bash prints two lines per failure: `bash: connect: <error>` and
            // `bash: /dev/tcp/HOST/PORT: <error>`; the first names the syscall.
            l if l.contains(TIMED_OUT) => "timed-out",
            l if l.contains("connect:") => "other-error",
            _ => continue,
        };
        *counts.entry(key).or_default() += 1;
    }
    Ok(counts)
}

/// Whether the client's log shows `more` successful connects than it does now, within 10 s.
pub async fn connects_again(client: &TestContainer, more: u64) -> bool {
    let ok = || async {
        outcomes(client)
            .await
            .ok()
            .and_then(|counts| counts.get("ok").copied())
            .unwrap_or(0)
    };
    let since = ok().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ok().await >= since + more {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A TCP service on `gateway` (a free port) that accepts and closes every connection, for
/// clients to reach until a fault cuts them off; abort the handle to stop it.
pub async fn accepting_service(gateway: &str) -> anyhow::Result<(u16, JoinHandle<()>)> {
    let listener = TcpListener::bind((gateway, 0))
        .await
        .with_context(|| format!("binding a service on {gateway}"))?;
    let port = listener.local_addr()?.port();
    let service = tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        }
    });
    Ok((port, service))
}
