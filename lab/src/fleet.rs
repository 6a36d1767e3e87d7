//! A lab fleet on the Docker Engine: a coordinator and N agent "hosts", each its own container
//! with its own address on a private Docker network, running the real binaries.
//!
//! - **Images** are assembled `FROM scratch` from the host's binaries and the libraries `ldd`
//!   lists ([`crate::image`]): the coordinator image holds `faultline-coordinator`; the agent
//!   image holds `faultline-agent` and the tools its fault mechanisms call (`nft`, `tc`, `ip`,
//!   `iptables-nft`/`-legacy` with their extensions, `unshare`, `nsenter`, whichever of them
//!   the host has). Their tags carry a fingerprint of the
//!   binaries, so a rebuilt binary gets a new image; every image, container and network the
//!   lab makes carries the label [`LABEL`], and [`down`] removes exactly those.
//! - **Agent hosts** get what the agent needs and no more than this engine grants: the host's
//!   PID namespace and cgroup hierarchy (targets are other containers of the same engine), the
//!   engine's socket, `CAP_SYS_ADMIN` (BPF, namespaces, cgroups), `CAP_NET_ADMIN`,
//!   `CAP_SYS_PTRACE` (other processes' namespaces), `CAP_KILL`, `CAP_DAC_OVERRIDE` and
//!   `CAP_IPC_LOCK` (BPF maps), no seccomp or AppArmor profile (they forbid `setns` and
//!   `bpf`). Not `--privileged`: some engines (this project's CI among them) run without
//!   `CAP_SYS_RESOURCE` and cannot grant every capability.
//! - **Certificates** are made on the fly in the lab directory; the coordinator's include its
//!   container name (agents dial it by name on the lab network) and loopback (the CLI dials the
//!   port published on `127.0.0.1`).
//! - **Agent names** default to `agent-1`, `agent-2`, `agent-3`, the hosts the plans in
//!   `examples/game-day/` name, and the demo stack ([`crate::stack`]) runs on them under the
//!   container names those plans use, so they run against the lab as they are. The agent image
//!   also holds the `docker` CLI: the plans' command probes run `docker exec postgres
//!   pg_isready -q` on the agent's host, and the engine socket is mounted.
//! - [`up`] is idempotent: running containers of the same image are kept, anything else of the
//!   lab's is replaced; a container or network with one of the lab's names that is *not*
//!   labelled [`LABEL`] is someone else's, and `up` then fails before it changes anything.
//!   [`down`] stops the agents first (SIGTERM: an agent reverts what it holds before it exits),
//!   then removes the demo stack and the coordinator, the network and the images, and checks
//!   nothing labelled is left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultline_proto::v1 as pb;
use faultline_tls::identity::Role;
use faultline_tls::layout::CertDir;

use crate::image::ImageSpec;
use crate::local::{AGENT_BIN, COORDINATOR_BIN, Certs, OperatorClient};
use crate::{LabError, docker};

/// The label on everything the lab makes.
pub const LABEL: &str = "faultline.lab=1";
/// The lab's private network.
pub const NETWORK: &str = "faultline-lab";
/// The coordinator's container name, which is also its name on the lab network.
pub const COORDINATOR: &str = "faultline-lab-coordinator";
/// The coordinator's port inside its container.
const COORDINATOR_PORT: u16 = 7443;
/// Where the binaries live inside the images.
const BIN_DIR: &str = "/usr/local/bin";
/// Tools the agent's mechanisms run, copied into its image when the host has them.
const AGENT_TOOLS: &[&str] = &[
    "/usr/sbin/nft",
    "/usr/sbin/tc",
    "/usr/sbin/ip",
    "/usr/bin/unshare",
    "/usr/bin/nsenter",
    // The latency fault's NFQUEUE rules (hosts without netem, like this project's CI) and the
    // iptables firewall backends; symlinks to the multi-call binaries, which pick their mode
    // by name.
    "/usr/sbin/iptables-nft",
    "/usr/sbin/ip6tables-nft",
    "/usr/sbin/iptables-legacy",
    "/usr/sbin/ip6tables-legacy",
    // Command probes such as `docker exec postgres pg_isready -q` run on the agent's host.
    "/usr/bin/docker",
];
/// Directories copied into the agent image when the host has them: iptables loads its
/// matches and targets (NFQUEUE, statistic...) from these at run time, out of `ldd`'s sight.
const AGENT_TREES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/lib/aarch64-linux-gnu/xtables",
    "/usr/lib64/xtables",
    "/usr/lib/xtables",
];
/// How long `up` waits for every agent to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time an agent gets to revert and exit on `down` before it is killed.
const STOP_GRACE_S: &str = "15";

/// What [`up`] builds.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Holds the certificates and each container's state (created if missing).
    pub dir: PathBuf,
    /// Agent host names, e.g. `agent-1`.
    pub agents: Vec<String>,
    /// Where `faultline-coordinator` and `faultline-agent` (and, for the stack,
    /// `faultline-order-api`) are.
    pub bin_dir: PathBuf,
    /// Also start the demo stack ([`crate::stack`]) and wait until it is healthy.
    pub stack: bool,
}

/// A running lab fleet.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub dir: PathBuf,
    /// The coordinator as the host reaches it: `https://127.0.0.1:PORT`.
    pub url: String,
    pub certs: PathBuf,
    pub coordinator: LabContainer,
    pub hosts: Vec<LabContainer>,
    /// The demo stack's containers, in start order (empty without the stack).
    pub stack: Vec<LabContainer>,
}

/// One container of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabContainer {
    /// The agent name (`agent-1`), `coordinator`, or the stack service (`postgres`).
    pub role: String,
    pub container: String,
    /// Its address on the lab network.
    pub address: String,
    /// Docker's state: `running`, `exited`...
    pub state: String,
    /// For a stack container, the agent host it stands on (label `faultline.lab.host`);
    /// empty otherwise.
    pub host: String,
}

impl Fleet {
    /// An Operator client with the lab's operator certificate.
    pub fn operator_client(&self) -> Result<OperatorClient, LabError> {
        let dir = CertDir::new(&self.certs);
        let channel = faultline_tls::client::channel(&self.url, &dir, Role::Operator, "operator")
            .map_err(|source| LabError::Tls {
            action: format!("preparing mTLS to {} as the operator", self.url),
            source,
        })?;
        Ok(OperatorClient::new(channel))
    }
}

/// The container name of agent host `agent`.
pub fn host_container(agent: &str) -> String {
    format!("faultline-lab-{agent}")
}

/// Brings the fleet up (or finds it up) and waits until every agent is connected, then, with
/// [`FleetConfig::stack`], the demo stack until it is healthy.
///
/// Fails before changing anything when a binary or package is missing or when a container or
/// network with one of the lab's names exists that is not the lab's.
pub async fn up(config: &FleetConfig) -> Result<Fleet, LabError> {
    docker::engine_version().await?;
    let coordinator_bin = required_binary(&config.bin_dir, COORDINATOR_BIN)?;
    let agent_bin = required_binary(&config.bin_dir, AGENT_BIN)?;
    if config.stack {
        crate::stack::order_api_binary(&config.bin_dir)?;
        crate::stack::check_host_packages()?;
    }
    let mut names = vec![COORDINATOR.to_string()];
    names.extend(config.agents.iter().map(|agent| host_container(agent)));
    if config.stack {
        names.extend(crate::stack::SERVICES.iter().map(|s| s.name.to_string()));
    }
    refuse_foreign(&names).await?;
    let certs = config.dir.join("certs");
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| LabError::io("creating the lab directory", &config.dir, e))?;
    let hosts = ["localhost", "127.0.0.1", "::1", COORDINATOR].map(str::to_string);
    let issued = crate::local::ensure_certs_for(&certs, &config.agents, &hosts)?;
    if matches!(issued, Certs::Created) {
        tracing_line(&format!("certificates created in {}", certs.display()));
    }

    let coordinator_image = lab_image("coordinator", &coordinator_bin, &[], &[]).await?;
    let tools: Vec<&str> = AGENT_TOOLS
        .iter()
        .copied()
        .filter(|tool| Path::new(tool).exists())
        .collect();
    let trees: Vec<&str> = AGENT_TREES
        .iter()
        .copied()
        .filter(|tree| Path::new(tree).is_dir())
        .collect();
    let agent_image = lab_image("agent", &agent_bin, &tools, &trees).await?;
    ensure_network().await?;

    let certs_mount = format!("{}:/certs:ro", absolute(&certs)?.display());
    let state = config.dir.join("coordinator");
    std::fs::create_dir_all(&state).map_err(|e| LabError::io("creating", &state, e))?;
    let state_mount = format!("{}:/state", absolute(&state)?.display());
    let listen = format!("0.0.0.0:{COORDINATOR_PORT}");
    let publish = format!("127.0.0.1::{COORDINATOR_PORT}");
    let coordinator_cmd = format!("{BIN_DIR}/{COORDINATOR_BIN}");
    let args: Vec<&str> = vec![
        "--hostname",
        COORDINATOR,
        "--publish",
        &publish,
        "--volume",
        &certs_mount,
        "--volume",
        &state_mount,
        &coordinator_image,
        &coordinator_cmd,
        "--listen",
        &listen,
        "--certs",
        "/certs",
        "--db",
        "/state/faultline.db",
        "--metrics-listen",
        "0.0.0.0:9464",
    ];
    ensure_container(COORDINATOR, "coordinator", &coordinator_image, &args, &[]).await?;

    let agent_cmd = format!("{BIN_DIR}/{AGENT_BIN}");
    let coordinator_url = format!("https://{COORDINATOR}:{COORDINATOR_PORT}");
    for agent in &config.agents {
        let state = config.dir.join("hosts").join(agent);
        std::fs::create_dir_all(&state).map_err(|e| LabError::io("creating", &state, e))?;
        let state_mount = format!("{}:/var/lib/faultline-agent", absolute(&state)?.display());
        let name = host_container(agent);
        let args: Vec<&str> = vec![
            "--hostname",
            agent,
            "--pid",
            "host",
            "--cgroupns",
            "host",
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "SYS_PTRACE",
            "--cap-add",
            "KILL",
            "--cap-add",
            "DAC_OVERRIDE",
            "--cap-add",
            "IPC_LOCK",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "apparmor=unconfined",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/tmp",
            "--volume",
            "/var/run/docker.sock:/var/run/docker.sock",
            "--volume",
            "/sys/fs/cgroup:/sys/fs/cgroup",
            "--volume",
            &certs_mount,
            "--volume",
            &state_mount,
            "--env",
            "RUST_LOG=info,h2=warn,tower=warn,hyper=warn",
            &agent_image,
            &agent_cmd,
            "--coordinator",
            &coordinator_url,
            "--name",
            agent,
            "--certs",
            "/certs",
            "--state-dir",
            "/var/lib/faultline-agent",
            "--metrics-listen",
            "0.0.0.0:9465",
        ];
        ensure_container(&name, agent, &agent_image, &args, &[]).await?;
    }

    let port = docker::run(&["port", COORDINATOR, &format!("{COORDINATOR_PORT}/tcp")]).await?;
    // `127.0.0.1:49153` (one line per binding).
    let published = port
        .lines()
        .next()
        .and_then(|line| line.rsplit(':').next())
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut fleet = Fleet {
        dir: config.dir.clone(),
        url: format!("https://127.0.0.1:{published}"),
        certs,
        coordinator: inspect(COORDINATOR, "coordinator").await?,
        hosts: {
            let mut hosts = Vec::new();
            for agent in &config.agents {
                hosts.push(inspect(&host_container(agent), agent).await?);
            }
            hosts
        },
        stack: Vec::new(),
    };
    wait_connected(&fleet, &config.agents).await?;
    if config.stack {
        fleet.stack = crate::stack::up(&config.bin_dir, &config.agents).await?;
    }
    Ok(fleet)
}

/// Fails, naming them, when containers named `names` or the lab network exist without the
/// lab's label: they belong to someone else, and `up` would otherwise replace or reuse them.
async fn refuse_foreign(names: &[String]) -> Result<(), LabError> {
    let (key, value) = LABEL.split_once('=').unwrap_or((LABEL, ""));
    let mut foreign = Vec::new();
    for name in names {
        if let Some(found) = docker::label_of("container", name, key).await?
            && found != value
        {
            foreign.push(format!("container {name}"));
        }
    }
    if let Some(found) = docker::label_of("network", NETWORK, key).await?
        && found != value
    {
        foreign.push(format!("network {NETWORK}"));
    }
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(LabError::Conflict {
            what: foreign.join(", "),
        })
    }
}

/// What [`down`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub images: Vec<String>,
}

/// Removes everything the lab made (agents first, so that they revert what they hold), then
/// checks that nothing labelled [`LABEL`] is left. The lab directory (certificates, state,
/// the coordinator's store with the run history) is kept.
pub async fn down() -> Result<Removed, LabError> {
    let mut removed = Removed::default();
    let containers = labelled("ps", &["--all"]).await?;
    let (stack, containers): (Vec<_>, Vec<_>) = containers
        .into_iter()
        .partition(|name| crate::stack::is_stack_container(name));
    let (coordinators, agents): (Vec<_>, Vec<_>) =
        containers.into_iter().partition(|name| name == COORDINATOR);
    // SIGTERM and a grace period: an agent reverts its faults before it exits. One `docker
    // stop` for all of them: the engine stops them in parallel.
    if !agents.is_empty() {
        let mut stop = vec!["stop", "--time", STOP_GRACE_S];
        stop.extend(agents.iter().map(String::as_str));
        docker::run(&stop).await.ok();
    }
    // Then the stack (the agents may have held faults on it until now), at once: throwaway
    // servers need no grace period. The coordinator last, gracefully: it keeps the run history.
    for (batch, grace) in [(agents, false), (stack, false), (coordinators, true)] {
        if batch.is_empty() {
            continue;
        }
        if grace {
            for name in &batch {
                docker::run(&["stop", "--time", STOP_GRACE_S, name])
                    .await
                    .ok();
            }
        }
        let mut remove = vec!["rm", "--force", "--volumes"];
        remove.extend(batch.iter().map(String::as_str));
        docker::run(&remove).await?;
        removed.containers.extend(batch);
    }
    for network in labelled("network", &[]).await? {
        docker::run(&["network", "rm", &network]).await?;
        removed.networks.push(network);
    }
    for image in labelled("image", &[]).await? {
        docker::run(&["image", "rm", "--force", &image]).await?;
        removed.images.push(image);
    }
    let left: Vec<String> = [
        labelled("ps", &["--all"]).await?,
        labelled("network", &[]).await?,
        labelled("image", &[]).await?,
    ]
    .concat();
    if !left.is_empty() {
        return Err(LabError::Process {
            what: "lab down".into(),
            detail: format!("still present after removal: {}", left.join(", ")),
        });
    }
    Ok(removed)
}

/// The lab's containers as they are now (none when the lab is down).
pub async fn status() -> Result<Vec<LabContainer>, LabError> {
    let mut found = Vec::new();
    for name in labelled("ps", &["--all"]).await? {
        let role = if name == COORDINATOR {
            "coordinator".to_string()
        } else {
            name.trim_start_matches("faultline-lab-").to_string()
        };
        let mut container = inspect(&name, &role).await?;
        if crate::stack::is_stack_container(&name) {
            let key = crate::stack::HOST_LABEL;
            container.host = docker::label_of("container", &name, key)
                .await?
                .unwrap_or_default();
        }
        found.push(container);
    }
    // The fleet first (coordinator, agents), then the stack.
    found.sort_by_key(|c| (!c.host.is_empty(), c.role != "coordinator", c.role.clone()));
    Ok(found)
}

/// Names (containers, networks) or tags (images) of the lab's objects of one kind.
async fn labelled(kind: &str, extra: &[&str]) -> Result<Vec<String>, LabError> {
    let filter = format!("label={LABEL}");
    let format = match kind {
        "ps" => "{{.Names}}",
        "network" => "{{.Name}}",
        _ => "{{.Repository}}:{{.Tag}}",
    };
    let mut args = vec![kind];
    if kind != "ps" {
        args.push("ls");
    }
    args.extend_from_slice(extra);
    args.extend(["--filter", &filter, "--format", format]);
    let listed = docker::run(&args).await?;
    Ok(listed
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect())
}

/// Starts `name` unless it already runs `image`; a stale one (another image, or stopped) is
/// replaced. `args` are the `docker run` arguments after the common ones, `labels` extra
/// `key=value` labels. Only for the lab's own names: [`up`] has checked that a container of
/// that name, if any, is the lab's.
pub(crate) async fn ensure_container(
    name: &str,
    role: &str,
    image: &str,
    args: &[&str],
    labels: &[&str],
) -> Result<(), LabError> {
    if docker::container_exists(name).await? {
        let current = docker::run(&[
            "inspect",
            "--format",
            "{{.Config.Image}} {{.State.Status}}",
            name,
        ])
        .await?;
        if current.trim() == format!("{image} running") {
            return Ok(());
        }
        docker::run(&["rm", "--force", "--volumes", name]).await?;
    }
    let role_label = format!("faultline.lab.role={role}");
    let mut full = vec![
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        NETWORK,
        "--label",
        LABEL,
        "--label",
        &role_label,
    ];
    for label in labels {
        full.extend(["--label", label]);
    }
    full.extend_from_slice(args);
    if let Err(err) = docker::run(&full).await {
        // `docker run` may have created the container before failing to start it.
        docker::run(&["rm", "--force", name]).await.ok();
        return Err(err);
    }
    Ok(())
}

/// A lab container as it is now (`host` left empty).
pub(crate) async fn inspect(name: &str, role: &str) -> Result<LabContainer, LabError> {
    let format = "{{.State.Status}} {{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}";
    let out = docker::run(&["inspect", "--format", format, name]).await?;
    let mut words = out.split_whitespace();
    Ok(LabContainer {
        role: role.to_string(),
        container: name.to_string(),
        state: words.next().unwrap_or_default().to_string(),
        address: words.next().unwrap_or_default().to_string(),
        host: String::new(),
    })
}

async fn ensure_network() -> Result<(), LabError> {
    if labelled("network", &[]).await?.iter().any(|n| n == NETWORK) {
        return Ok(());
    }
    docker::run(&["network", "create", "--label", LABEL, NETWORK]).await?;
    Ok(())
}

/// `faultline-lab-ROLE:FINGERPRINT`: `binary` at [`BIN_DIR`], `tools` at their host paths, each
/// with its libraries, and the host directories `trees` (see [`ImageSpec`]; the tag is a
/// fingerprint of all of it, so a rebuilt binary gets a new image).
async fn lab_image(
    role: &str,
    binary: &Path,
    tools: &[&str],
    trees: &[&str],
) -> Result<String, LabError> {
    let file_name = binary.file_name().unwrap_or_default().to_string_lossy();
    let in_image = format!("{BIN_DIR}/{file_name}");
    let mut binaries = vec![(binary.to_path_buf(), in_image.clone())];
    binaries.extend(
        tools
            .iter()
            .map(|tool| (PathBuf::from(tool), tool.to_string())),
    );
    let spec = ImageSpec {
        binaries,
        trees: trees
            .iter()
            .map(|tree| (PathBuf::from(tree), Vec::new()))
            .collect(),
        cmd: vec![in_image],
        labels: vec![LABEL.into()],
        ..ImageSpec::default()
    };
    spec.ensure(&format!("faultline-lab-{role}")).await
}

fn required_binary(dir: &Path, name: &str) -> Result<PathBuf, LabError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::MissingBinary {
            path,
            hint: "build it first: cargo build --workspace --bins".into(),
        })
    }
}

fn absolute(path: &Path) -> Result<PathBuf, LabError> {
    std::path::absolute(path).map_err(|e| LabError::io("resolving", path, e))
}

fn tracing_line(message: &str) {
    eprintln!("lab: {message}");
}

/// Waits until every agent of the fleet is connected to its coordinator.
async fn wait_connected(fleet: &Fleet, agents: &[String]) -> Result<(), LabError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut client = fleet.operator_client()?;
    loop {
        let connected: Vec<String> = match client.list_agents(pb::ListAgentsRequest {}).await {
            Ok(answer) => answer
                .into_inner()
                .agents
                .into_iter()
                .filter(|a| a.connected)
                .map(|a| a.name)
                .collect(),
            Err(_) => Vec::new(),
        };
        let missing: Vec<&String> = agents.iter().filter(|a| !connected.contains(a)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let logs = docker::run(&["logs", "--tail", "5", &host_container(missing[0])])
                .await
                .unwrap_or_default();
            return Err(LabError::Timeout {
                what: format!(
                    "agent(s) {} to connect to {} (last log lines of {}: {logs})",
                    missing
                        .iter()
                        .map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    fleet.url,
                    missing[0]
                ),
                after: CONNECT_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
