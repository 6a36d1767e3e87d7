//! [`DockerRuntime`] against the real local Docker Engine: selector resolution, the idempotency
//! every revert relies on, limits, networks, and the processes inside containers. Each step is
//! checked through the runtime and, as an independent witness, through the docker CLI (and for
//! limits the container's cgroup files).

use faultline_agent::process;
use faultline_agent::runtime::docker::DockerRuntime;
use faultline_agent::runtime::{
    ContainerLimits, ContainerRuntime, ContainerState, EndpointSnapshot, MEMORY_UNLIMITED,
    RuntimeError,
};
use faultline_domain::fault::{Signal, TargetSelector};
use faultline_integration_tests::docker::{TestContainer, docker, unique_name};

/// The runtime under test; unwrapped in each test, where a panic is the failure report.
async fn runtime() -> Result<DockerRuntime, RuntimeError> {
    DockerRuntime::connect().await
}

fn container(name: &str) -> TargetSelector {
    TargetSelector::Container(name.to_string())
}

#[tokio::test]
async fn resolve_by_name_is_exact_not_a_substring_match() {
    let rt = runtime().await.unwrap();
    let base = unique_name("x-db");
    let db = TestContainer::start_named(&base, &[]).await.unwrap();
    // Both sides of a substring match: a longer name and a prefixed one.
    let backup = TestContainer::start_named(&format!("{base}-backup"), &[])
        .await
        .unwrap();
    let prefixed = TestContainer::start_named(&format!("old{base}"), &[])
        .await
        .unwrap();

    let found = rt.resolve(&container(&base)).await.unwrap();
    assert_eq!(found.id, db.id);
    assert_eq!(found.name, base);
    assert_eq!(found.id.len(), 64, "full id expected: {}", found.id);
    let found_backup = rt.resolve(&container(&backup.name)).await.unwrap();
    assert_eq!(found_backup.id, backup.id);
    assert_eq!(
        rt.resolve(&container(&prefixed.name)).await.unwrap().id,
        prefixed.id
    );

    // The CLI agrees on which container carries the name.
    let cli_name = docker(&["inspect", "--format", "{{.Name}}", &found.id])
        .await
        .unwrap();
    assert_eq!(cli_name, format!("/{base}"));
}

#[tokio::test]
async fn resolve_by_label_value_or_key() {
    let rt = runtime().await.unwrap();
    let key = unique_name("faultline.test.sel");
    let target = TestContainer::start_named(&unique_name("x-lbl"), &[(&key, "db")])
        .await
        .unwrap();
    let _other = TestContainer::start_named(&unique_name("x-lbl"), &[(&key, "web")])
        .await
        .unwrap();

    let found = rt
        .resolve(&TargetSelector::Label(format!("{key}=db")))
        .await
        .unwrap();
    assert_eq!(found.id, target.id);
    assert_eq!(found.name, target.name);
    let label = docker(&[
        "inspect",
        "--format",
        &format!("{{{{index .Config.Labels \"{key}\"}}}}"),
        &found.id,
    ])
    .await
    .unwrap();
    assert_eq!(label, "db");

    // Key only: both containers carry it, so it is ambiguous.
    let err = rt
        .resolve(&TargetSelector::Label(key.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::Ambiguous { count: 2, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn resolve_reports_not_found_and_ambiguous() {
    let rt = runtime().await.unwrap();
    let missing = unique_name("x-missing");
    let err = rt.resolve(&container(&missing)).await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains(&missing), "{err}");
    // Regex metacharacters never reach Docker's regex-based name filter.
    let err = rt.resolve(&container("x-db.*")).await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
    let err = rt
        .resolve(&TargetSelector::Label(format!("{missing}=1")))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");

    let key = unique_name("faultline.test.dup");
    let first = TestContainer::start_named(&unique_name("x-dup"), &[(&key, "1")])
        .await
        .unwrap();
    let second = TestContainer::start_named(&unique_name("x-dup"), &[(&key, "1")])
        .await
        .unwrap();
    let err = rt
        .resolve(&TargetSelector::Label(format!("{key}=1")))
        .await
        .unwrap_err();
    match &err {
        RuntimeError::Ambiguous { count, names, .. } => {
            assert_eq!(*count, 2);
            assert!(
                names.contains(&first.name) && names.contains(&second.name),
                "{names}"
            );
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    let listed = docker(&["ps", "--quiet", "--filter", &format!("label={key}=1")])
        .await
        .unwrap();
    assert_eq!(listed.lines().count(), 2);
}

#[tokio::test]
async fn pause_and_unpause_are_idempotent() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-pause").await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Running);

    rt.pause(&c.id).await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Paused);
    assert_eq!(c.state().await.unwrap(), "paused");
    rt.pause(&c.id)
        .await
        .expect("pausing a paused container is not an error");
    assert_eq!(c.state().await.unwrap(), "paused");

    rt.unpause(&c.id).await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Running);
    assert_eq!(c.state().await.unwrap(), "running");
    rt.unpause(&c.id)
        .await
        .expect("unpausing a running container is not an error");
    assert_eq!(c.state().await.unwrap(), "running");
}

#[tokio::test]
async fn stop_and_start_are_idempotent() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-stop").await.unwrap();

    // `sleep` as PID 1 ignores SIGTERM, so this also exercises the escalation to SIGKILL.
    rt.stop(&c.id, 1).await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Stopped);
    assert_eq!(c.state().await.unwrap(), "exited");
    rt.stop(&c.id, 1)
        .await
        .expect("stopping a stopped container is not an error");
    assert_eq!(c.state().await.unwrap(), "exited");
    // A pause revert replayed after someone stopped the container has nothing left to do.
    rt.unpause(&c.id)
        .await
        .expect("unpausing a stopped container is not an error");
    // But pausing it cannot apply the fault.
    let err = rt.pause(&c.id).await.unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Engine {
                operation: "pause",
                ..
            }
        ),
        "{err}"
    );

    rt.start(&c.id).await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Running);
    assert_eq!(c.state().await.unwrap(), "running");
    rt.start(&c.id)
        .await
        .expect("starting a running container is not an error");
    assert_eq!(c.state().await.unwrap(), "running");
}

#[tokio::test]
async fn kill_stops_the_container_and_start_revives_it() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-kill").await.unwrap();

    rt.kill(&c.id, Signal::KILL).await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Stopped);
    assert_eq!(c.state().await.unwrap(), "exited");
    let exit_code = docker(&["inspect", "--format", "{{.State.ExitCode}}", &c.id])
        .await
        .unwrap();
    assert_eq!(exit_code, "137", "SIGKILL exit status");

    // Killing is a fault, not a revert: a second kill must say it did nothing.
    let err = rt.kill(&c.id, Signal::KILL).await.unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Engine {
                operation: "kill",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("not running"), "{err}");

    rt.start(&c.id).await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Running);
    assert_eq!(c.state().await.unwrap(), "running");
}

#[tokio::test]
async fn a_paused_container_can_be_killed_and_stopped() {
    let rt = runtime().await.unwrap();
    let killed = TestContainer::start("x-pkill").await.unwrap();
    let stopped = TestContainer::start("x-pstop").await.unwrap();

    rt.pause(&killed.id).await.unwrap();
    rt.kill(&killed.id, Signal::KILL).await.unwrap();
    killed
        .wait_for_state("exited", std::time::Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(rt.state(&killed.id).await.unwrap(), ContainerState::Stopped);

    rt.pause(&stopped.id).await.unwrap();
    rt.stop(&stopped.id, 1).await.unwrap();
    assert_eq!(stopped.state().await.unwrap(), "exited");
    assert_eq!(
        rt.state(&stopped.id).await.unwrap(),
        ContainerState::Stopped
    );
}

#[tokio::test]
async fn a_removed_container_is_gone_for_every_operation() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-gone").await.unwrap();
    let id = c.id.clone();
    drop(c);
    let listed = docker(&[
        "ps",
        "--all",
        "--quiet",
        "--no-trunc",
        "--filter",
        &format!("id={id}"),
    ])
    .await
    .unwrap();
    assert!(listed.is_empty(), "container still listed: {listed}");

    let gone = |result: Result<(), RuntimeError>| match result {
        Err(RuntimeError::Gone { id: gone_id }) => assert_eq!(gone_id, id),
        other => panic!("expected Gone, got {other:?}"),
    };
    match rt.state(&id).await {
        Err(RuntimeError::Gone { id: gone_id }) => assert_eq!(gone_id, id),
        other => panic!("expected Gone, got {other:?}"),
    }
    gone(rt.pause(&id).await);
    gone(rt.unpause(&id).await);
    gone(rt.stop(&id, 1).await);
    gone(rt.start(&id).await);
    gone(rt.kill(&id, Signal::KILL).await);
}

#[tokio::test]
async fn describe_names_the_engine_and_negotiated_api() {
    let rt = runtime().await.unwrap();
    let line = rt.describe().await.unwrap();
    let version = docker(&["version", "--format", "{{.Server.Version}}"])
        .await
        .unwrap();
    let api = docker(&["version", "--format", "{{.Server.APIVersion}}"])
        .await
        .unwrap();
    assert_eq!(line, format!("docker engine {version} (API {api})"));
}

// --- selectors by id and regex -------------------------------------------------------------

#[tokio::test]
async fn resolve_by_id_prefix_and_by_name_regex() {
    let rt = runtime().await.unwrap();
    let base = unique_name("x-idre");
    let first = TestContainer::start_named(&format!("{base}-a1"), &[])
        .await
        .unwrap();
    let second = TestContainer::start_named(&format!("{base}-b2"), &[])
        .await
        .unwrap();

    let full = rt
        .resolve(&TargetSelector::ContainerId(first.id.clone()))
        .await
        .unwrap();
    assert_eq!(full.id, first.id);
    assert_eq!(full.name, first.name);
    let short = rt
        .resolve(&TargetSelector::ContainerId(first.id[..12].to_uppercase()))
        .await
        .unwrap();
    assert_eq!(short.id, first.id);
    let err = rt
        .resolve(&TargetSelector::ContainerId(first.id[..8].to_string()))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidSelector { .. }), "{err}");
    assert!(err.to_string().contains("12 digits"), "{err}");
    // A well-formed prefix of no container. (Flip the first digit of a real id.)
    let flipped = format!(
        "{}{}",
        if first.id.starts_with('0') { '1' } else { '0' },
        &first.id[1..12]
    );
    if !second.id.starts_with(&flipped) {
        let err = rt
            .resolve(&TargetSelector::ContainerId(flipped))
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
    }

    let regex = |pattern: String| TargetSelector::ContainerRegex(pattern);
    let found = rt
        .resolve(&regex(format!("^{base}-b[0-9]$")))
        .await
        .unwrap();
    assert_eq!(found.id, second.id);
    assert_eq!(found.name, second.name);
    let err = rt.resolve(&regex(format!("^{base}-"))).await.unwrap_err();
    match &err {
        RuntimeError::Ambiguous { count, names, .. } => {
            assert_eq!(*count, 2);
            assert!(
                names.contains(&first.name) && names.contains(&second.name),
                "{names}"
            );
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    let err = rt.resolve(&regex(format!("^{base}-("))).await.unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidSelector { .. }), "{err}");
    assert!(
        err.to_string().contains("not a valid regular expression"),
        "{err}"
    );
    let err = rt
        .resolve(&regex(format!("^{base}-zz$")))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");

    for selector in [
        TargetSelector::Pid(1),
        TargetSelector::ProcessName("sleep".into()),
        TargetSelector::Cgroup("docker".into()),
    ] {
        let err = rt.resolve(&selector).await.unwrap_err();
        assert!(matches!(err, RuntimeError::NotAContainer { .. }), "{err}");
    }
}

// --- main process and restart --------------------------------------------------------------

#[tokio::test]
async fn main_pid_follows_restarts_and_needs_a_running_container() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-pid").await.unwrap();

    let pid = rt.main_pid(&c.id).await.unwrap();
    let cli_pid = docker(&["inspect", "--format", "{{.State.Pid}}", &c.id])
        .await
        .unwrap();
    assert_eq!(pid.to_string(), cli_pid);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "sleep");

    rt.restart(&c.id, 1).await.unwrap();
    assert_eq!(rt.state(&c.id).await.unwrap(), ContainerState::Running);
    let after = rt.main_pid(&c.id).await.unwrap();
    assert_ne!(after, pid, "a restarted container has a new main process");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());

    // Paused containers still have their process; restart resumes them as well.
    rt.pause(&c.id).await.unwrap();
    assert_eq!(rt.main_pid(&c.id).await.unwrap(), after);
    rt.restart(&c.id, 1).await.unwrap();
    assert_eq!(c.state().await.unwrap(), "running");

    rt.stop(&c.id, 1).await.unwrap();
    let err = rt.main_pid(&c.id).await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotRunning { .. }), "{err}");
    assert!(err.to_string().contains("exited"), "{err}");
    // Restarting a stopped container starts it.
    rt.restart(&c.id, 1).await.unwrap();
    assert_eq!(c.state().await.unwrap(), "running");
    rt.main_pid(&c.id).await.unwrap();

    let id = c.id.clone();
    drop(c);
    assert!(matches!(
        rt.restart(&id, 1).await,
        Err(RuntimeError::Gone { .. })
    ));
    assert!(matches!(
        rt.main_pid(&id).await,
        Err(RuntimeError::Gone { .. })
    ));
}

// --- limits --------------------------------------------------------------------------------

const MIB: i64 = 1024 * 1024;

/// CPU and memory limits as the kernel applies them to the container's cgroup: the
/// independent witness that `docker update` reached the running container.
#[derive(Debug, PartialEq, Eq)]
struct CgroupLimits {
    /// `None` when unlimited.
    cpu: Option<(i64, i64)>,
    memory: Option<i64>,
    /// cgroup v1 only (`memory.memsw.limit_in_bytes`); `None` when unlimited or unknown.
    memory_swap: Option<i64>,
}

fn cgroup_limits(pid: u32) -> anyhow::Result<CgroupLimits> {
    use anyhow::Context as _;
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path_of = |controller: &str| {
        membership
            .lines()
            .find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == controller)
                    .then(|| path.to_string())
            })
            .with_context(|| format!("pid {pid} is in no {controller:?} cgroup"))
    };
    let read = |path: String| -> anyhow::Result<String> {
        let text = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        Ok(text.trim().to_string())
    };
    let number = |path: String| -> anyhow::Result<i64> {
        let text = read(path.clone())?;
        text.parse().with_context(|| format!("{path}: {text:?}"))
    };
    let bounded = |value: i64| (value > 0 && value < MEMORY_UNLIMITED).then_some(value);
    if std::path::Path::new("/sys/fs/cgroup/memory").is_dir() {
        let memory = format!("/sys/fs/cgroup/memory{}", path_of("memory")?);
        let cpu = format!("/sys/fs/cgroup/cpu{}", path_of("cpu")?);
        let quota = number(format!("{cpu}/cpu.cfs_quota_us"))?;
        let period = number(format!("{cpu}/cpu.cfs_period_us"))?;
        Ok(CgroupLimits {
            cpu: (quota > 0).then_some((quota, period)),
            memory: bounded(number(format!("{memory}/memory.limit_in_bytes"))?),
            memory_swap: bounded(number(format!("{memory}/memory.memsw.limit_in_bytes"))?),
        })
    } else {
        // cgroup v2: one hierarchy; swap is accounted apart from memory, so not compared.
        let dir = format!("/sys/fs/cgroup{}", path_of("")?);
        let max = read(format!("{dir}/cpu.max"))?;
        let (quota, period) = max.split_once(' ').context("cpu.max")?;
        let cpu = match quota {
            "max" => None,
            quota => Some((quota.parse()?, period.parse()?)),
        };
        let memory = read(format!("{dir}/memory.max"))?;
        Ok(CgroupLimits {
            cpu,
            memory: memory.parse().ok().and_then(bounded),
            memory_swap: None,
        })
    }
}

/// What the cgroup should show for `limits` (swap only on cgroup v1).
fn expected_cgroup(limits: &ContainerLimits) -> CgroupLimits {
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory").is_dir();
    CgroupLimits {
        cpu: limits.effective_cpu(),
        memory: limits.effective_memory(),
        memory_swap: if v1 {
            limits.effective_memory_swap()
        } else {
            None
        },
    }
}

#[tokio::test]
async fn limits_of_an_unlimited_container_are_applied_and_reverted() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-lim").await.unwrap();
    let pid = rt.main_pid(&c.id).await.unwrap();

    let original = rt.limits(&c.id).await.unwrap();
    assert_eq!(
        original,
        ContainerLimits::default(),
        "created without limits"
    );
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&original));

    let faulted = original.with_cpu_millis(250).with_memory_bytes(64 << 20);
    rt.set_limits(&c.id, &faulted).await.unwrap();
    assert_eq!(rt.limits(&c.id).await.unwrap(), faulted, "stored exactly");
    let cli = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.CpuQuota}} {{.HostConfig.CpuPeriod}} {{.HostConfig.Memory}} {{.HostConfig.MemorySwap}}",
        &c.id,
    ])
    .await
    .unwrap();
    assert_eq!(cli, format!("25000 100000 {} {}", 64 * MIB, 64 * MIB));
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&faulted));
    assert_eq!(cgroup_limits(pid).unwrap().cpu, Some((25_000, 100_000)));
    // Applying again changes nothing.
    rt.set_limits(&c.id, &faulted).await.unwrap();

    // Revert. Docker can set none of these back to 0; the equivalents are stored instead.
    rt.set_limits(&c.id, &original).await.unwrap();
    let reverted = rt.limits(&c.id).await.unwrap();
    assert!(reverted.equivalent(&original), "{reverted}");
    assert_eq!(reverted.cpu_quota, -1, "{reverted}");
    assert_eq!(reverted.memory, MEMORY_UNLIMITED, "{reverted}");
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&original));
    assert_eq!(cgroup_limits(pid).unwrap().memory, None);
    // Replayed revert: a no-op.
    rt.set_limits(&c.id, &original).await.unwrap();
    assert_eq!(rt.limits(&c.id).await.unwrap(), reverted);

    // The stored equivalents hold across a restart too.
    rt.restart(&c.id, 0).await.unwrap();
    let pid = rt.main_pid(&c.id).await.unwrap();
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&original));
}

#[tokio::test]
async fn limits_with_nano_cpus_and_unlimited_swap_are_restored_exactly() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-lims").await.unwrap();
    // `--memory-swap -1` is only stored by `docker update`; a restart applies it.
    docker(&[
        "update",
        "--cpus",
        "0.5",
        "--memory",
        "32m",
        "--memory-swap",
        "-1",
        &c.id,
    ])
    .await
    .unwrap();
    rt.restart(&c.id, 0).await.unwrap();
    let pid = rt.main_pid(&c.id).await.unwrap();
    let original = rt.limits(&c.id).await.unwrap();
    assert_eq!(
        original,
        ContainerLimits {
            nano_cpus: 500_000_000,
            memory: 32 * MIB,
            memory_swap: -1,
            ..Default::default()
        }
    );
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&original));

    let faulted = original.with_cpu_millis(100).with_memory_bytes(16 << 20);
    assert_eq!(faulted.nano_cpus, 100_000_000, "nano_cpus in use: kept");
    rt.set_limits(&c.id, &faulted).await.unwrap();
    assert_eq!(rt.limits(&c.id).await.unwrap(), faulted);
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&faulted));
    assert_eq!(cgroup_limits(pid).unwrap().cpu, Some((10_000, 100_000)));

    // Memory goes back above the swap limit in force, and swap to unlimited: exact.
    rt.set_limits(&c.id, &original).await.unwrap();
    assert_eq!(rt.limits(&c.id).await.unwrap(), original);
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&original));
    rt.set_limits(&c.id, &original).await.unwrap();
    assert_eq!(rt.limits(&c.id).await.unwrap(), original);
}

#[tokio::test]
async fn raising_memory_above_the_old_swap_limit_and_back() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-limr").await.unwrap();
    let pid = rt.main_pid(&c.id).await.unwrap();
    docker(&["update", "--memory", "32m", "--memory-swap", "64m", &c.id])
        .await
        .unwrap();
    let original = rt.limits(&c.id).await.unwrap();
    assert_eq!(
        (original.memory, original.memory_swap),
        (32 * MIB, 64 * MIB)
    );

    // Docker refuses memory above the stored swap limit unless both change together.
    let err = docker(&["update", "--memory", "128m", &c.id])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("memoryswap"), "{err:#}");
    let raised = original.with_memory_bytes(128 << 20);
    rt.set_limits(&c.id, &raised).await.unwrap();
    assert_eq!(rt.limits(&c.id).await.unwrap(), raised);
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&raised));

    rt.set_limits(&c.id, &original).await.unwrap();
    assert_eq!(rt.limits(&c.id).await.unwrap(), original);
    assert_eq!(cgroup_limits(pid).unwrap(), expected_cgroup(&original));

    let id = c.id.clone();
    drop(c);
    assert!(matches!(
        rt.set_limits(&id, &original).await,
        Err(RuntimeError::Gone { .. })
    ));
}

// --- networks ------------------------------------------------------------------------------

/// A user-defined bridge network with its own /24 in 10.254.0.0/16, removed on drop (after
/// the containers on it: declare it before them).
struct TestNetwork {
    name: String,
    /// `10.254.N.` — append a host number.
    prefix: String,
}

impl TestNetwork {
    async fn create() -> anyhow::Result<TestNetwork> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("flt-test-net-{}-{n}", std::process::id());
        let mut last = None;
        // Concurrent test processes may hold a subnet: try others.
        for attempt in 0..40u32 {
            let third = (std::process::id() * 7 + n * 13 + attempt * 31) % 250 + 2;
            let subnet = format!("10.254.{third}.0/24");
            match docker(&[
                "network",
                "create",
                "--driver",
                "bridge",
                "--subnet",
                &subnet,
                "--label",
                "faultline.test=1",
                &name,
            ])
            .await
            {
                Ok(_) => {
                    return Ok(TestNetwork {
                        name,
                        prefix: format!("10.254.{third}."),
                    });
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no subnet tried")))
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let removed = std::process::Command::new("docker")
            .args(["network", "rm", &self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        if !removed.is_ok_and(|status| status.success()) {
            eprintln!("warning: could not remove test network {}", self.name);
        }
    }
}

/// Moves a test container (started on `--network none`, which excludes every other network)
/// onto `network` with extra `docker network connect` arguments.
async fn attach(c: &TestContainer, network: &str, extra: &[&str]) -> anyhow::Result<()> {
    docker(&["network", "disconnect", "none", &c.id]).await?;
    let mut args = vec!["network", "connect"];
    args.extend_from_slice(extra);
    args.extend([network, c.id.as_str()]);
    docker(&args).await?;
    Ok(())
}

/// The container's networks as the CLI sees them, names sorted.
async fn cli_networks(c: &TestContainer) -> anyhow::Result<Vec<String>> {
    let listed = docker(&[
        "inspect",
        "--format",
        "{{range $name, $_ := .NetworkSettings.Networks}}{{$name}} {{end}}",
        &c.id,
    ])
    .await?;
    let mut names: Vec<String> = listed.split_whitespace().map(str::to_string).collect();
    names.sort();
    Ok(names)
}

fn sorted(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list
}

#[tokio::test]
async fn disconnect_and_reconnect_keep_address_and_aliases() {
    let rt = runtime().await.unwrap();
    let net = TestNetwork::create().await.unwrap();
    let c = TestContainer::start("x-net").await.unwrap();
    let ip = format!("{}10", net.prefix);
    let alias = format!("svc-{}", &c.id[..6]);
    attach(&c, &net.name, &["--ip", &ip, "--alias", &alias])
        .await
        .unwrap();

    let snapshot = rt
        .network_endpoint(&c.id, &net.name)
        .await
        .unwrap()
        .expect("attached");
    assert_eq!(snapshot.network, net.name);
    assert_eq!(snapshot.ipv4_address.as_deref(), Some(ip.as_str()));
    assert_eq!(snapshot.static_ipv4.as_deref(), Some(ip.as_str()));
    assert!(snapshot.aliases.contains(&alias), "{:?}", snapshot.aliases);
    assert!(
        snapshot.aliases.contains(&c.id[..12].to_string()),
        "Docker adds the short id: {:?}",
        snapshot.aliases
    );
    let network_id = docker(&["network", "inspect", "--format", "{{.Id}}", &net.name])
        .await
        .unwrap();
    assert_eq!(snapshot.network_id, network_id);
    assert_eq!(
        rt.network_endpoint(&c.id, &network_id[..12]).await.unwrap(),
        Some(snapshot.clone()),
        "found by id prefix too"
    );
    // Journaled as JSON.
    let json = serde_json::to_string(&snapshot).unwrap();
    assert_eq!(
        serde_json::from_str::<EndpointSnapshot>(&json).unwrap(),
        snapshot
    );

    rt.disconnect(&c.id, &net.name, false).await.unwrap();
    assert_eq!(rt.network_endpoint(&c.id, &net.name).await.unwrap(), None);
    assert!(cli_networks(&c).await.unwrap().is_empty());
    rt.disconnect(&c.id, &net.name, false)
        .await
        .expect("disconnecting a disconnected container is not an error");
    rt.disconnect(&c.id, &net.name, true).await.unwrap();

    rt.connect(&c.id, &net.name, &snapshot).await.unwrap();
    let restored = rt
        .network_endpoint(&c.id, &net.name)
        .await
        .unwrap()
        .expect("reattached");
    assert_eq!(restored.ipv4_address, snapshot.ipv4_address);
    assert_eq!(restored.static_ipv4, snapshot.static_ipv4);
    assert_eq!(
        sorted(restored.aliases.clone()),
        sorted(snapshot.aliases.clone())
    );
    assert_eq!(restored, snapshot);
    assert_eq!(
        cli_networks(&c).await.unwrap(),
        std::slice::from_ref(&net.name)
    );
    let cli_ip = docker(&[
        "inspect",
        "--format",
        &format!(
            "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
            net.name
        ),
        &c.id,
    ])
    .await
    .unwrap();
    assert_eq!(cli_ip, ip);
    rt.connect(&c.id, &net.name, &snapshot)
        .await
        .expect("connecting a connected container is not an error");
    assert_eq!(
        cli_networks(&c).await.unwrap(),
        std::slice::from_ref(&net.name)
    );
}

#[tokio::test]
async fn a_dynamic_address_is_pinned_on_reconnect() {
    let rt = runtime().await.unwrap();
    let net = TestNetwork::create().await.unwrap();
    let first = TestContainer::start("x-netd").await.unwrap();
    let second = TestContainer::start("x-netd").await.unwrap();
    attach(&first, &net.name, &[]).await.unwrap();
    let snapshot = rt
        .network_endpoint(&first.id, &net.name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(snapshot.static_ipv4, None);
    let ip = snapshot.ipv4_address.clone().unwrap();
    assert!(ip.starts_with(&net.prefix), "{ip}");

    rt.disconnect(&first.id, &net.name, false).await.unwrap();
    // Another container joins meanwhile; a dynamic allocation could hand it the freed address.
    attach(&second, &net.name, &[]).await.unwrap();
    rt.connect(&first.id, &net.name, &snapshot).await.unwrap();
    let restored = rt
        .network_endpoint(&first.id, &net.name)
        .await
        .unwrap()
        .unwrap();
    if rt
        .network_endpoint(&second.id, &net.name)
        .await
        .unwrap()
        .and_then(|e| e.ipv4_address)
        .as_deref()
        == Some(ip.as_str())
    {
        // The newcomer took the address: reconnected with another rather than not at all.
        assert_ne!(restored.ipv4_address.as_deref(), Some(ip.as_str()));
    } else {
        assert_eq!(restored.ipv4_address.as_deref(), Some(ip.as_str()));
        // Quirk: asking for an address makes it static in the container's config.
        assert_eq!(restored.static_ipv4.as_deref(), Some(ip.as_str()));
    }
}

#[tokio::test]
async fn reconnecting_to_the_default_bridge_takes_a_fresh_address_and_missing_networks_fail() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-netb").await.unwrap();
    attach(&c, "bridge", &[]).await.unwrap();
    let snapshot = rt.network_endpoint(&c.id, "bridge").await.unwrap().unwrap();
    assert!(snapshot.aliases.is_empty(), "{:?}", snapshot.aliases);
    assert!(snapshot.ipv4_address.is_some());

    rt.disconnect(&c.id, "bridge", false).await.unwrap();
    assert_eq!(rt.network_endpoint(&c.id, "bridge").await.unwrap(), None);
    // Docker takes no `--ip` on its default bridge: reconnected without one.
    rt.connect(&c.id, "bridge", &snapshot).await.unwrap();
    let restored = rt.network_endpoint(&c.id, "bridge").await.unwrap().unwrap();
    assert!(restored.ipv4_address.is_some());
    assert_eq!(restored.static_ipv4, None);
    assert_eq!(cli_networks(&c).await.unwrap(), ["bridge"]);

    let missing = unique_name("flt-test-net-missing");
    let err = rt.connect(&c.id, &missing, &snapshot).await.unwrap_err();
    assert!(
        matches!(&err, RuntimeError::NoSuchNetwork { network } if *network == missing),
        "{err}"
    );
    rt.disconnect(&c.id, &missing, false)
        .await
        .expect("not attached to a network that does not exist");

    let id = c.id.clone();
    drop(c);
    assert!(matches!(
        rt.network_endpoint(&id, "bridge").await,
        Err(RuntimeError::Gone { .. })
    ));
    assert!(matches!(
        rt.connect(&id, "bridge", &snapshot).await,
        Err(RuntimeError::Gone { .. })
    ));
}

// --- processes inside containers -----------------------------------------------------------

#[tokio::test]
async fn container_processes_by_name_stay_inside_its_pid_namespace() {
    let rt = runtime().await.unwrap();
    let c = TestContainer::start("x-proc").await.unwrap();
    let main_pid = rt.main_pid(&c.id).await.unwrap();

    let main = process::in_container(main_pid, None).unwrap();
    assert_eq!(main.len(), 1);
    assert_eq!(main[0].pid, main_pid);
    assert_eq!(main[0].comm, "sleep");

    docker(&[
        "exec",
        "--detach",
        &c.id,
        "/bin/sh",
        "-c",
        "while :; do /bin/sleep 1; done",
    ])
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let shells = loop {
        match process::in_container(main_pid, Some("sh")) {
            Ok(found) => break found,
            Err(err) => {
                assert!(std::time::Instant::now() < deadline, "{err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    // The host runs many `sh` processes; only the container's one is found.
    assert_eq!(shells.len(), 1, "{shells:?}");
    // The main sleep plus the loop's current one (the shell may not have forked it yet).
    let sleepers = loop {
        let found = process::in_container(main_pid, Some("sleep")).unwrap();
        if found.len() >= 2 {
            break found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "main sleep plus the loop's: {found:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(sleepers.iter().any(|p| p.pid == main_pid), "{sleepers:?}");
    let err = process::in_container(main_pid, Some("nginx")).unwrap_err();
    assert!(
        matches!(err, process::ProcessError::NotInContainer { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("sh") && text.contains("sleep"), "{text}");

    // SIGSTOP is not `docker pause`: Docker still calls the container running.
    let undo = process::ProcessUndo {
        tag: unique_name("x-proc-stop"),
        stopped: main.clone(),
    };
    process::stop(&main).unwrap();
    let verification = process::verify_stopped(&main);
    assert!(verification.effective, "{}", verification.detail);
    assert_eq!(c.state().await.unwrap(), "running");
    process::undo(&undo).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while main[0].state() == Some('T') {
        assert!(std::time::Instant::now() < deadline, "never resumed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(main[0].is_alive());
}

#[tokio::test]
async fn a_kill_storm_follows_a_container_restarted_by_its_restart_policy() {
    let rt = std::sync::Arc::new(runtime().await.unwrap());
    let c = TestContainer::start("x-storm").await.unwrap();
    docker(&["update", "--restart", "always", &c.id])
        .await
        .unwrap();
    let first_pid = rt.main_pid(&c.id).await.unwrap();

    let resolve = {
        let (rt, id) = (std::sync::Arc::clone(&rt), c.id.clone());
        move || {
            let (rt, id) = (std::sync::Arc::clone(&rt), id.clone());
            async move {
                let pid = rt
                    .main_pid(&id)
                    .await
                    .map_err(|err| process::ProcessError::Target(err.to_string()))?;
                process::in_container(pid, None)
            }
        }
    };
    let spec = process::StormSpec {
        tag: unique_name("x-storm"),
        signal: Signal::KILL,
        count: 2,
        interval: std::time::Duration::from_millis(1500),
    };
    let storm = process::spawn_kill_storm(spec, resolve, |_| {}).unwrap();
    let summary = storm.wait().await;
    assert_eq!(summary.rounds, 2);
    let pids: Vec<u32> = summary.hits.iter().map(|p| p.pid).collect();
    assert_eq!(pids.len(), 2, "{summary:?}");
    assert_eq!(pids[0], first_pid);
    assert_ne!(
        pids[0], pids[1],
        "the restarted container's new process was hit"
    );

    c.wait_for_state("running", std::time::Duration::from_secs(20))
        .await
        .unwrap();
    let restarts = docker(&["inspect", "--format", "{{.RestartCount}}", &c.id])
        .await
        .unwrap();
    assert!(restarts.parse::<u32>().unwrap() >= 1, "{restarts}");
}
