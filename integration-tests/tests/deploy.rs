#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns may unwrap

//! The packaged deployment in `deploy/`, checked with the real tools that consume it:
//!
//! - systemd units: `systemd-analyze verify` (any warning fails), their environment files
//!   document every option of the binaries' real `--help`, and the agent's capability set —
//!   the same in the unit, the Kubernetes DaemonSet and the Compose file — is what the agent
//!   needs: an agent started with only those capabilities offers every fault a full-root agent
//!   offers on this host.
//! - Kubernetes manifests: `kubernetes-validate --strict` (bundled OpenAPI schemas, run here in
//!   a network namespace of its own, so offline).
//! - Compose: `docker-compose config`, then for real: images built from the debug binaries by
//!   `deploy/compose/build-images.sh`, `docker-compose up`, the agent connects and reports its
//!   pre-flight through the operator CLI, `docker-compose down`; nothing is left behind.
//!
//! Each validator is also shown a deliberately broken copy and must reject it, so a validator
//! that accepts anything cannot pass these tests. The tools come from `.ci/run` (Debian
//! `systemd` and `docker-compose`, PyPI `kubernetes-validate`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use faultline_integration_tests::cluster::{Cluster, bin, cli_raw};
use faultline_integration_tests::docker::TestContainer;
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy(relative: &str) -> PathBuf {
    workspace().join("deploy").join(relative)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs a tool; a tool that cannot be started fails the test with the reason.
fn run(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (.ci/run installs the deployment tools)")
        })
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// --- systemd ------------------------------------------------------------------------------------

const UNITS: &[(&str, &str)] = &[
    ("faultline-coordinator.service", "faultline-coordinator"),
    ("faultline-agent.service", "faultline-agent"),
];

/// `systemd-analyze verify` on copies of `units` (name, text) in a temporary directory, with
/// `/usr/local/bin/faultline-*` pointing at the freshly built binaries (verify checks that
/// every ExecStart= program exists and is executable).
fn systemd_verify(units: &[(String, String)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (name, unit) in units {
        let mut unit = unit.clone();
        for (_, binary) in UNITS {
            let built = bin(binary);
            assert!(
                built.exists(),
                "{} not built (make test builds it)",
                built.display()
            );
            unit = unit.replace(&format!("/usr/local/bin/{binary}"), built.to_str().unwrap());
        }
        let path = dir.path().join(name);
        std::fs::write(&path, unit).unwrap();
        paths.push(path.to_str().unwrap().to_string());
    }
    let mut args = vec!["verify"];
    args.extend(paths.iter().map(String::as_str));
    run("systemd-analyze", &args, &[("SYSTEMD_LOG_COLOR", "0")])
}

fn unit_text(name: &str) -> String {
    read(&deploy("systemd").join(name))
}

#[test]
fn systemd_units_pass_systemd_analyze_verify_without_a_warning() {
    let units: Vec<(String, String)> = UNITS
        .iter()
        .map(|(name, _)| (name.to_string(), unit_text(name)))
        .collect();
    let out = systemd_verify(&units);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify must accept the units silently:\n{}",
        text(&out)
    );

    // systemd's own exposure score (0 = locked down, 10 = unprotected), as a regression
    // guard: the coordinator scores 1.1, the agent (root, host network) 4.0 when written.
    for ((name, unit), threshold) in units.iter().zip(["20", "50"]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, unit).unwrap();
        let out = run(
            "systemd-analyze",
            &[
                "security",
                "--offline=true",
                &format!("--threshold={threshold}"),
                "--no-pager",
                path.to_str().unwrap(),
            ],
            &[("SYSTEMD_COLORS", "0")],
        );
        assert!(
            out.status.success(),
            "{name}: exposure above {threshold}/100:\n{}",
            text(&out)
        );
    }

    // The same check rejects a misspelt directive and a bad value, so it really verifies.
    let broken = unit_text("faultline-agent.service")
        .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
        .replace("RestrictNamespaces=net", "RestrictNamespaces=networks");
    let out = systemd_verify(&[("faultline-agent.service".to_string(), broken)]);
    let report = text(&out);
    assert!(
        report.contains("NoNewPrivilege") && report.contains("networks"),
        "systemd-analyze verify should flag the unknown key and the bad value:\n{report}"
    );
}

/// `(long option, environment variable)` pairs from a binary's real `--help`.
fn help_options(binary: &str) -> Vec<(String, String)> {
    let out = run(bin(binary).to_str().unwrap(), &["--help"], &[]);
    assert!(out.status.success(), "{binary} --help: {}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut options = Vec::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("--") {
            let name = rest.split([' ', '<', ',']).next().unwrap_or_default();
            current = Some(format!("--{name}"));
        }
        if let (Some(option), Some(at)) = (&current, line.find("[env: ")) {
            let var = line[at + 6..].split('=').next().unwrap_or_default();
            options.push((option.clone(), var.to_string()));
        }
    }
    options
}

#[test]
fn environment_files_document_every_option_of_the_real_help() {
    for (env_file, binary) in [
        ("coordinator.env", "faultline-coordinator"),
        ("agent.env", "faultline-agent"),
    ] {
        let doc = read(&deploy("systemd").join(env_file));
        let options = help_options(binary);
        assert!(options.len() >= 4, "{binary} --help parsed to {options:?}");
        for (option, var) in &options {
            assert!(
                doc.contains(&format!("# {option} / {var} (")),
                "{env_file} does not document {option} / {var} (a `# {option} / {var} (default \
                 ...)` header with its meaning) — an option was added to {binary}?"
            );
        }
        // Every active setting is a real option (or the logging/tracing variables).
        let known: BTreeSet<&str> = options.iter().map(|(_, var)| var.as_str()).collect();
        for line in doc
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let key = line.split('=').next().unwrap_or_default();
            assert!(
                known.contains(key) || key == "RUST_LOG" || key.starts_with("OTEL_"),
                "{env_file}: `{line}` sets an unknown variable"
            );
        }
    }
}

/// The `CapabilityBoundingSet=` of a unit, without the `CAP_` prefixes.
fn unit_capabilities(unit: &str) -> BTreeSet<String> {
    let line = unit
        .lines()
        .find(|l| l.starts_with("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet= line");
    line.trim_start_matches("CapabilityBoundingSet=")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_string())
        .collect()
}

/// The capability names listed in a YAML block that starts at the line `marker`: `- NAME`
/// items (Kubernetes `add:`) or a flow list on the marker line (Compose `cap_add: [...]`).
fn yaml_capabilities(yaml: &str, marker: &str) -> BTreeSet<String> {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != marker && !l.trim().starts_with(&format!("{marker} [")));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no `{marker}` in the manifest"));
    if let Some((_, flow)) = first.split_once('[') {
        return flow
            .trim_end_matches(']')
            .split(',')
            .map(|c| c.trim().trim_end_matches(']').to_string())
            .filter(|c| !c.is_empty())
            .collect();
    }
    lines
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| {
            let item = l.trim_start().trim_start_matches("- ");
            item.split('#')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

#[test]
fn the_agent_gets_the_same_justified_capabilities_everywhere_and_the_coordinator_none() {
    let agent_unit = unit_text("faultline-agent.service");
    let caps = unit_capabilities(&agent_unit);
    assert!(
        caps.contains("NET_ADMIN") && caps.contains("SYS_ADMIN"),
        "{caps:?}"
    );
    for cap in &caps {
        assert!(
            agent_unit
                .lines()
                .any(|l| l.starts_with("#   CAP_") && l.contains(&format!("CAP_{cap} "))),
            "CAP_{cap} has no justification comment in faultline-agent.service"
        );
    }
    assert!(
        unit_capabilities(&unit_text("faultline-coordinator.service")).is_empty(),
        "the coordinator needs no capability"
    );
    let coordinator_unit = unit_text("faultline-coordinator.service");
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
    ] {
        assert!(
            coordinator_unit.contains(hardening),
            "coordinator: {hardening}"
        );
    }
    for hardening in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=faultline-agent",
        "ReadWritePaths=",
    ] {
        assert!(agent_unit.contains(hardening), "agent: {hardening}");
    }

    let daemonset = read(&deploy("kubernetes/20-agent.yaml"));
    assert_eq!(
        yaml_capabilities(&daemonset, "add:"),
        caps,
        "the DaemonSet's capabilities differ from the unit's"
    );
    // Compose leaves out BPF and PERFMON (Docker < 23 refuses the names; CAP_SYS_ADMIN
    // covers them), nothing else.
    let compose = read(&deploy("compose/docker-compose.yml"));
    let mut expected = caps.clone();
    expected.remove("BPF");
    expected.remove("PERFMON");
    assert_eq!(yaml_capabilities(&compose, "cap_add:"), expected);
}

/// Starts `faultline-agent` with only the capabilities of the systemd unit (setpriv drops the
/// rest from the bounding set, as systemd's CapabilityBoundingSet= does for a root service).
fn spawn_agent_with_unit_capabilities(
    cluster: &Cluster,
    name: &str,
    log: &Path,
) -> tokio::process::Child {
    let caps = unit_capabilities(&unit_text("faultline-agent.service"));
    let keep: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let bounding = format!("-all,{}", keep.join(","));
    let state = cluster.dir.path().join("state").join(name);
    tokio::process::Command::new("setpriv")
        .args(["--bounding-set", &bounding, "--inh-caps", "-all", "--"])
        .arg(bin("faultline-agent"))
        .args(["--coordinator", &cluster.url(), "--name", name, "--certs"])
        .arg(&cluster.certs)
        .arg("--state-dir")
        .arg(state)
        .args(["--metrics-listen", "off"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("setpriv (util-linux)")
}

/// `fault kind -> available` from `faultline preflight --output json` for one agent.
fn offered(report: &Value, agent: &str) -> BTreeSet<String> {
    let entry = report
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == agent)
        .unwrap_or_else(|| panic!("{agent} not in {report}"));
    let mut kinds: BTreeSet<String> = entry["faults"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["available"] == true)
        .map(|f| f["fault"].as_str().unwrap().to_string())
        .collect();
    kinds.extend(
        entry["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["available"] == true)
            .map(|p| format!("probe:{}", p["name"].as_str().unwrap())),
    );
    kinds
}

/// Agent names unique to this process: agents sweep only their own tags, so concurrent test
/// runs on one machine never touch each other's faults.
fn agent_name(role: &str) -> String {
    format!("deploy-{role}-{}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_only_the_units_capabilities_offers_every_fault_a_root_agent_offers() {
    let full = agent_name("root");
    let limited = agent_name("unitcaps");
    let mut cluster = Cluster::start(&[&full, &limited]).await.unwrap();
    // Replace the second agent by one confined to the unit's capability set.
    cluster.agents.pop();
    let log = cluster.dir.path().join("limited-agent.log");
    let _child = spawn_agent_with_unit_capabilities(&cluster, &limited, &log);
    // The coordinator may still list the old connection for a moment: wait for the new one's
    // start-up (its log line) before trusting the listing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read(&log).contains("coordinator welcomed us") {
        assert!(
            Instant::now() < deadline,
            "the confined agent did not connect:\n{}",
            read(&log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster
        .wait_connected(&[&full, &limited], Duration::from_secs(20))
        .await
        .unwrap();
    let report = cluster
        .cli_json(&["preflight", "--output", "json"])
        .await
        .unwrap();
    let root = offered(&report, &full);
    let confined = offered(&report, &limited);
    assert!(
        root.contains("partition") && root.contains("cpu-throttle"),
        "{root:?}"
    );
    let missing: Vec<_> = root.difference(&confined).collect();
    assert!(
        missing.is_empty(),
        "with the unit's CapabilityBoundingSet the agent loses {missing:?}:\n{}",
        serde_json::to_string_pretty(&report).unwrap()
    );

    // Pre-flight assumes what it cannot try; applying real faults cannot.
    apply_real_faults(
        &cluster.certs,
        &cluster.url(),
        &limited,
        cluster.dir.path(),
        &log,
    )
    .await;
}

/// Pre-flight assumes some things it cannot try (e.g. firewall features without a scratch
/// namespace); applying real faults cannot. Through `agent`: a partition (setns into a
/// container's network namespace, nft/iptables), a CPU throttle (cgroup files), a freeze and
/// a CPU hog (a stressor joined to the container's cgroups), each applied, verified and
/// reverted, on a throwaway container. `log` is the agent's log for the failure message.
async fn apply_real_faults(certs: &Path, url: &str, agent: &str, dir: &Path, log: &Path) {
    let target = TestContainer::start("fl-deploy").await.unwrap();
    let stage = |name: &str, fault: &str| {
        format!(
            "  - name: {name}\n    faults:\n      - {{ agent: {agent}, target: {{ container: {} }}, duration: 1s, {fault} }}\n",
            target.name
        )
    };
    let plan = format!(
        "apiVersion: faultline/v1\ntitle: Deployed agent\nlease: 10s\nstages:\n{}{}{}{}",
        stage(
            "net",
            "kind: partition, scope: { ports: [5432], protocol: tcp }"
        ),
        stage("cpu", "kind: cpu-throttle, cpus: 0.5"),
        stage("freeze", "kind: freeze"),
        stage("hog", "kind: cpu-hog, workers: 1"),
    );
    let plan_path = dir.join(format!("faults-{agent}.yaml"));
    std::fs::write(&plan_path, plan).unwrap();
    let out = cli_raw(
        certs,
        url,
        &["run", plan_path.to_str().unwrap(), "--follow"],
    )
    .await
    .unwrap();
    let json = |args: &'static [&'static str]| async move {
        let out = cli_raw(certs, url, args).await.unwrap();
        assert!(out.status.success(), "faultline {args:?}: {}", text(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let runs = json(&["runs", "list", "--output", "json"]).await;
    let run_id = runs[0]["id"].as_str().unwrap().to_string();
    let out_show = cli_raw(certs, url, &["runs", "show", &run_id, "--output", "json"])
        .await
        .unwrap();
    let run: Value = serde_json::from_slice(&out_show.stdout).unwrap();
    let agent_log = std::fs::read_to_string(log).unwrap_or_default();
    assert_eq!(
        run["state"],
        "completed",
        "{agent} could not apply a fault:\n{}\n{run:#}\nagent log:\n{agent_log}",
        text(&out),
    );
    let count = |kind: &str| {
        run["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .count()
    };
    assert_eq!(
        (
            count("fault-applied"),
            count("fault-reverted"),
            count("fault-failed")
        ),
        (4, 4, 0),
        "{run:#}"
    );
    assert_eq!(target.state().await.unwrap(), "running");
}

// --- Kubernetes ---------------------------------------------------------------------------------

fn manifests() -> Vec<PathBuf> {
    manifests_in("kubernetes")
}

fn manifests_in(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `kubernetes-validate --strict` (unknown fields are errors), offline: in a network
/// namespace of its own, so only its bundled schemas can be used.
fn kubernetes_validate(files: &[PathBuf]) -> Output {
    let mut args = vec![
        "--net",
        "python3",
        "-m",
        "kubernetes_validate",
        "--strict",
        "--quiet",
    ];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    run("unshare", &args, &[])
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation_offline() {
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["00-namespace.yaml", "10-coordinator.yaml", "20-agent.yaml"]
    );
    let out = kubernetes_validate(&files);
    assert!(out.status.success(), "kubernetes-validate:\n{}", text(&out));
    let all = files.iter().map(|f| read(f)).collect::<Vec<_>>().join("\n");
    for kind in [
        "kind: Namespace",
        "kind: Deployment",
        "kind: Service",
        "kind: PersistentVolumeClaim",
        "kind: DaemonSet",
        "hostPID: true",
        "hostNetwork: true",
        "secretName: faultline-coordinator-certs",
        "secretName: faultline-agent-certs",
        "path: /sys/fs/cgroup",
        "path: /var/run/docker.sock",
    ] {
        assert!(all.contains(kind), "manifests lack `{kind}`");
    }

    // The high-availability variant replaces 10-coordinator.yaml: several replicas on a
    // PostgreSQL store from a Secret, no SQLite volume, and a readiness probe on the gRPC port
    // (standbys do not listen, so the Service only reaches the active replica).
    let ha = manifests_in("kubernetes/ha");
    let out = kubernetes_validate(&ha);
    assert!(out.status.success(), "kubernetes-validate:\n{}", text(&out));
    let ha_text = ha.iter().map(|f| read(f)).collect::<Vec<_>>().join("\n");
    for needed in [
        "replicas: 2",
        "name: FAULTLINE_DB",
        "name: faultline-coordinator-store",
        "kind: PodDisruptionBudget",
        "readinessProbe:\n            tcpSocket:\n              port: grpc",
    ] {
        assert!(ha_text.contains(needed), "HA manifests lack `{needed}`");
    }
    assert!(
        !ha_text.contains("persistentVolumeClaim"),
        "HA replicas must not share a SQLite volume"
    );

    // The validator rejects a misspelt field and a wrongly typed value.
    let dir = tempfile::tempdir().unwrap();
    let agent = read(&deploy("kubernetes/20-agent.yaml"));
    let misspelt = dir.path().join("misspelt.yaml");
    std::fs::write(&misspelt, agent.replace("hostPID: true", "hostPid: true")).unwrap();
    let coordinator = read(&deploy("kubernetes/10-coordinator.yaml"));
    let mistyped = dir.path().join("mistyped.yaml");
    std::fs::write(
        &mistyped,
        coordinator.replace("replicas: 1", "replicas: one"),
    )
    .unwrap();
    for (file, field) in [(&misspelt, "hostPid"), (&mistyped, "replicas")] {
        let out = kubernetes_validate(std::slice::from_ref(file));
        assert!(
            !out.status.success() && text(&out).contains(field),
            "kubernetes-validate should reject {field}:\n{}",
            text(&out)
        );
    }
}

// --- Compose ------------------------------------------------------------------------------------

fn compose_file() -> PathBuf {
    deploy("compose/docker-compose.yml")
}

#[test]
fn compose_file_passes_docker_compose_config() {
    let dir = tempfile::tempdir().unwrap();
    let compose = compose_file();
    let out = run(
        "docker-compose",
        &["-f", compose.to_str().unwrap(), "config", "-q"],
        &[("FAULTLINE_CERTS_DIR", dir.path().to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "docker-compose config:\n{}",
        text(&out)
    );

    let broken = dir.path().join("docker-compose.yml");
    std::fs::write(
        &broken,
        read(&compose).replace("    pid: host\n", "    pids: host\n"),
    )
    .unwrap();
    let out = run(
        "docker-compose",
        &["-f", broken.to_str().unwrap(), "config", "-q"],
        &[],
    );
    assert!(
        !out.status.success() && text(&out).contains("pids"),
        "docker-compose config should reject an unknown key:\n{}",
        text(&out)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a Compose project `name` with images tagged `tag` left: containers, networks,
/// volumes, images (their ids, one a line; empty when nothing is left).
fn leftovers(name: &str, tag: &str) -> String {
    let label = format!("label=com.docker.compose.project={name}");
    let mut found = String::new();
    for what in [
        vec!["ps", "-aq", "--filter", &label],
        vec!["network", "ls", "-q", "--filter", &label],
        vec!["volume", "ls", "-q", "--filter", &label],
    ] {
        found.push_str(&String::from_utf8_lossy(&run("docker", &what, &[]).stdout));
    }
    for image in ["faultline-coordinator", "faultline-agent"] {
        let reference = format!("{image}:{tag}");
        found.push_str(&String::from_utf8_lossy(
            &run("docker", &["images", "-q", &reference], &[]).stdout,
        ));
    }
    found.trim().to_string()
}

/// A Compose project and its images; `down -v` and the images removed on drop, however the
/// test ends.
#[derive(Debug)]
struct ComposeProject {
    name: String,
    tag: String,
    envs: Vec<(String, String)>,
}

impl ComposeProject {
    fn compose(&self, args: &[&str]) -> Output {
        let compose = compose_file();
        let mut all = vec!["-p", &self.name, "-f", compose.to_str().unwrap()];
        all.extend_from_slice(args);
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        run("docker-compose", &all, &envs)
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "--remove-orphans", "--timeout", "30"]);
        for image in ["faultline-coordinator", "faultline-agent"] {
            let _ = run(
                "docker",
                &["rmi", "-f", &format!("{image}:{}", self.tag)],
                &[],
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_brings_up_a_coordinator_and_a_connected_agent_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let name = agent_name("compose");
    let out = cli_raw(
        &certs,
        "https://127.0.0.1:1",
        &[
            "certs",
            "init",
            "--dir",
            certs.to_str().unwrap(),
            "--agents",
            &name,
        ],
    )
    .await
    .unwrap();
    assert!(out.status.success(), "certs init: {}", text(&out));

    let id = format!("{}-{}", std::process::id(), free_port());
    let port = free_port();
    let project = ComposeProject {
        name: format!("fldeploy{}", id.replace('-', "")),
        tag: format!("deploytest-{id}"),
        envs: vec![
            ("FAULTLINE_IMAGE_TAG".into(), format!("deploytest-{id}")),
            ("FAULTLINE_CERTS_DIR".into(), certs.to_str().unwrap().into()),
            ("FAULTLINE_AGENT_NAME".into(), name.clone()),
            ("FAULTLINE_PORT".into(), port.to_string()),
            ("FAULTLINE_METRICS_PORT".into(), free_port().to_string()),
            ("FAULTLINE_AGENT_METRICS_LISTEN".into(), "off".into()),
        ],
    };

    // Images from the debug binaries the test suite runs.
    let build = deploy("compose/build-images.sh");
    let bin_dir = bin("faultline-agent").parent().unwrap().to_path_buf();
    let out = run(
        build.to_str().unwrap(),
        &[
            "--tag",
            &project.tag,
            "--bin-dir",
            bin_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "build-images.sh:\n{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "faultline-coordinator:{0}\nfaultline-agent:{0}",
            project.tag
        )
    );

    let out = project.compose(&["up", "-d"]);
    assert!(out.status.success(), "docker-compose up:\n{}", text(&out));

    // The agent (host PID and network namespaces, the reduced capability set) connects, and
    // the operator CLI sees it through the published port.
    let url = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = loop {
        let out = cli_raw(&certs, &url, &["preflight", "--output", "json"])
            .await
            .unwrap();
        if out.status.success() {
            let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let connected = report.as_array().is_some_and(|agents| {
                agents
                    .iter()
                    .any(|a| a["agent"] == name.as_str() && a["connected"] == true)
            });
            if connected {
                break report;
            }
        }
        if Instant::now() > deadline {
            let logs = project.compose(&["logs", "--no-color"]);
            panic!(
                "the compose agent did not connect within 60 s:\n{}\n{}",
                text(&out),
                text(&logs)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let kinds = offered(&report, &name);
    for kind in [
        "container-pause",
        "partition",
        "cpu-throttle",
        "freeze",
        "cpu-hog",
        "disk-fill",
        "process-kill",
        "probe:docker",
        "probe:cgroups",
    ] {
        assert!(
            kinds.contains(kind),
            "the agent in its container cannot do {kind}: {}",
            serde_json::to_string_pretty(&report).unwrap()
        );
    }
    let logs = text(&project.compose(&["logs", "--no-color", "coordinator"]));
    assert!(
        logs.contains("faultline-coordinator listening on 0.0.0.0:7443"),
        "{logs}"
    );
    // And it really applies faults from inside its container.
    let agent_log = dir.path().join("compose-agent.log");
    std::fs::write(
        &agent_log,
        text(&project.compose(&["logs", "--no-color", "agent"])),
    )
    .unwrap();
    apply_real_faults(&certs, &url, &name, dir.path(), &agent_log).await;

    // Down, and nothing left: containers, network, volumes, then (on drop) the images.
    let out = project.compose(&["down", "-v", "--remove-orphans", "--timeout", "30"]);
    assert!(out.status.success(), "docker-compose down:\n{}", text(&out));
    let (name, tag) = (project.name.clone(), project.tag.clone());
    drop(project);
    assert_eq!(
        leftovers(&name, &tag),
        "",
        "left behind by the compose test"
    );
}
