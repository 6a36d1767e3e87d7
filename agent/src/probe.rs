//! `command` steady-state probes: a program the coordinator asks this agent to run on its host
//! to tell whether the system is healthy (`rabbitmqctl status`, `test -e /run/app.pid`, ...).
//!
//! The request arrives inside a signed command, so it was checked like any fault command
//! (signature, addressee, expiry, replay) before it gets here; the link hands it to a
//! [`ProbeExecutor`] and sends the [`pb::ProbeResult`] back, without involving the fault engine.
//!
//! Probes are meant to be read-only and the agent runs them with as little as it can: `argv` is
//! executed directly (no shell), with stdin from /dev/null, a minimal environment and `/` as
//! working directory, its whole process group killed at the time-out, the first
//! [`STDOUT_LIMIT`] bytes of stdout and the last [`STDERR_TAIL`] bytes of stderr kept, and at
//! most [`MAX_IN_FLIGHT`] probes running at once. The program is an absolute path or a bare
//! name looked up in the fixed [`BOUNDED_PATH`] — never in the agent's own `PATH`, and never a
//! path relative to the agent's working directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use faultline_proto::v1 as pb;
use tokio::sync::Semaphore;

use crate::clock::now_ms;
pub use crate::sys::command::BOUNDED_PATH;
use crate::sys::command::{BoundedOutput, BoundedSpec, CommandError, run_bounded};

/// Bytes of stdout kept and sent (enough for `stdout_contains`).
pub const STDOUT_LIMIT: usize = 4096;
/// Bytes of the end of stderr kept and sent.
pub const STDERR_TAIL: usize = 1024;
/// Longest time-out a probe may ask for (the plan's limit too).
pub const MAX_TIMEOUT: Duration = faultline_domain::probe::MAX_TIMEOUT;
/// Probes running at once on this agent; more are answered with an error at once.
pub const MAX_IN_FLIGHT: usize = 8;

/// A verified request to run a probe program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

/// Why a probe program was not run (or could not be started).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("refused: empty argv, a command probe needs a program to run")]
    EmptyArgv,
    #[error("refused: argv[{index}] contains a NUL byte")]
    NulByte { index: usize },
    #[error(
        "refused: program {program:?} is a relative path; give an absolute path or a bare \
         name looked up in {BOUNDED_PATH}"
    )]
    RelativePath { program: String },
    #[error("refused: program {program:?} not found in {BOUNDED_PATH}")]
    NotFound { program: String },
    #[error("refused: program {path}: {why}")]
    NotExecutable { path: PathBuf, why: String },
    #[error("refused: timeout {timeout_ms} ms outside 1..={} ms", MAX_TIMEOUT.as_millis())]
    Timeout { timeout_ms: u128 },
    #[error("refused: {max} probes are already running on this agent")]
    Busy { max: usize },
    #[error(transparent)]
    Spawn(#[from] CommandError),
}

/// Resolves `program` to an executable file: an absolute path as is, a bare name in
/// [`BOUNDED_PATH`]. Relative paths (`./x`, `bin/x`) are refused: they would depend on the
/// agent's working directory.
pub fn resolve_program(program: &str) -> Result<PathBuf, ProbeError> {
    if program.starts_with('/') {
        let path = PathBuf::from(program);
        executable(&path)?;
        return Ok(path);
    }
    if program.is_empty() || program.contains('/') {
        return Err(ProbeError::RelativePath {
            program: program.to_string(),
        });
    }
    BOUNDED_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| executable(candidate).is_ok())
        .ok_or_else(|| ProbeError::NotFound {
            program: program.to_string(),
        })
}

/// Ok when `path` is a regular file (after symlinks) with an execute bit.
fn executable(path: &Path) -> Result<(), ProbeError> {
    let not = |why: String| ProbeError::NotExecutable {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|err| not(err.to_string()))?;
    if !meta.is_file() {
        return Err(not("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(not("not executable".into()));
    }
    Ok(())
}

/// Checks `request` and turns it into what [`run_bounded`] runs.
pub fn prepare(request: &ProbeRequest) -> Result<BoundedSpec, ProbeError> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err(ProbeError::EmptyArgv);
    };
    if let Some(index) = request.argv.iter().position(|arg| arg.contains('\0')) {
        return Err(ProbeError::NulByte { index });
    }
    if request.timeout.is_zero() || request.timeout > MAX_TIMEOUT {
        return Err(ProbeError::Timeout {
            timeout_ms: request.timeout.as_millis(),
        });
    }
    Ok(BoundedSpec {
        program: resolve_program(program)?,
        args: args.to_vec(),
        timeout: request.timeout,
        stdout_limit: STDOUT_LIMIT,
        stderr_tail: STDERR_TAIL,
    })
}

/// Runs probe programs, at most [`MAX_IN_FLIGHT`] at once. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ProbeExecutor {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
}

impl Default for ProbeExecutor {
    fn default() -> Self {
        Self::new(MAX_IN_FLIGHT)
    }
}

impl ProbeExecutor {
    /// An executor running at most `max_in_flight` probes at once.
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    /// Runs `request` and answers `request_id` (the id of the command that carried it). Never
    /// fails: every problem is a result with `error` set.
    pub async fn run(&self, request_id: String, request: &ProbeRequest) -> pb::ProbeResult {
        let started = now_ms();
        let outcome = match Arc::clone(&self.permits).try_acquire_owned() {
            Err(_) => Err(ProbeError::Busy {
                max: self.max_in_flight,
            }),
            Ok(_permit) => match prepare(request) {
                Ok(spec) => run_bounded(&spec).await.map_err(ProbeError::from),
                Err(error) => Err(error),
            },
        };
        match outcome {
            Ok(output) => result_to_wire(request_id, output),
            Err(error) => {
                tracing::info!(request = %request_id, argv = ?request.argv, %error,
                    "probe not run");
                pb::ProbeResult {
                    request_id,
                    error: error.to_string(),
                    duration_ms: u64::try_from(now_ms().saturating_sub(started)).unwrap_or(0),
                    ..Default::default()
                }
            }
        }
    }
}

fn result_to_wire(request_id: String, output: BoundedOutput) -> pb::ProbeResult {
    pb::ProbeResult {
        request_id,
        exit_code: output.exit_code,
        signal: output.signal,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stdout_truncated: output.stdout_truncated,
        stderr_tail: String::from_utf8_lossy(&output.stderr_tail).into_owned(),
        duration_ms: u64::try_from(output.elapsed.as_millis()).unwrap_or(u64::MAX),
        timed_out: output.timed_out,
        error: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn request(argv: &[&str], timeout_ms: u64) -> ProbeRequest {
        ProbeRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    async fn run(argv: &[&str], timeout_ms: u64) -> pb::ProbeResult {
        ProbeExecutor::default()
            .run("req-1".into(), &request(argv, timeout_ms))
            .await
    }

    #[tokio::test]
    async fn exit_codes_and_output_come_back() {
        let ok = run(&["/bin/true"], 5_000).await;
        assert_eq!(ok.request_id, "req-1");
        assert_eq!((ok.exit_code, ok.signal), (Some(0), None), "{ok:?}");
        assert!(ok.error.is_empty() && !ok.timed_out, "{ok:?}");

        let three = run(&["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], 5_000).await;
        assert_eq!(three.exit_code, Some(3), "{three:?}");
        assert_eq!(three.stdout, "out\n");
        assert_eq!(three.stderr_tail, "err\n");
        assert!(!three.stdout_truncated);

        // A bare name is looked up in the fixed PATH; arguments are passed verbatim, unexpanded.
        let echo = run(&["echo", "$HOME", "*"], 5_000).await;
        assert_eq!(echo.stdout, "$HOME *\n", "{echo:?}");
    }

    #[tokio::test]
    async fn the_program_sees_a_minimal_environment_no_stdin_and_root_as_cwd() {
        // Nothing of the test's own environment (HOME, PATH, cargo's CARGO_*) reaches it.
        let env = run(&["/usr/bin/env"], 5_000).await;
        let mut lines: Vec<&str> = env.stdout.lines().collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            ["LC_ALL=C", &format!("PATH={BOUNDED_PATH}")],
            "{env:?}"
        );

        let stdin = run(&["/bin/sh", "-c", "cat; pwd"], 5_000).await;
        assert_eq!((stdin.exit_code, stdin.stdout.as_str()), (Some(0), "/\n"));
    }

    #[tokio::test]
    async fn a_program_past_its_timeout_is_killed_with_what_it_started() {
        let started = Instant::now();
        // The shell forks `sleep`, which holds stdout open: both must go at the deadline.
        let slow = run(
            &["/bin/sh", "-c", "sleep 30 & echo $!; wait; echo never"],
            300,
        )
        .await;
        let took = started.elapsed();
        assert!(slow.timed_out, "{slow:?}");
        assert_eq!(
            (slow.exit_code, slow.signal),
            (None, Some(libc::SIGKILL)),
            "{slow:?}"
        );
        assert!(!slow.stdout.contains("never"), "{slow:?}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!((300..5_000).contains(&slow.duration_ms), "{slow:?}");
        // Output before the kill is kept: here, the pid of the `sleep`, which died too.
        assert_gone(&slow.stdout).await;

        // An exited program whose background child keeps stdout open keeps its exit code, and
        // the child is killed at the deadline rather than waited for.
        let started = Instant::now();
        let bg = run(&["/bin/sh", "-c", "sleep 30 & echo $!; exit 4"], 300).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!((bg.exit_code, bg.timed_out), (Some(4), false), "{bg:?}");
        assert_gone(&bg.stdout).await;
    }

    /// The process whose pid `stdout` holds is gone (or a zombie) within 2 s.
    async fn assert_gone(stdout: &str) {
        let pid: u32 = stdout.trim().parse().unwrap();
        let stat = format!("/proc/{pid}/stat");
        for _ in 0..40 {
            match std::fs::read_to_string(&stat) {
                Err(_) => return,
                // The state follows the parenthesised command name.
                Ok(text) if text.rsplit(") ").next().unwrap_or("").starts_with('Z') => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("pid {pid} still runs: {:?}", std::fs::read_to_string(&stat));
    }

    #[tokio::test]
    async fn output_is_capped() {
        let script = "head -c 100000 /dev/zero | tr '\\0' a; echo x >&2; \
                      head -c 5000 /dev/zero | tr '\\0' e >&2; echo end >&2";
        let big = run(&["/bin/sh", "-c", script], 10_000).await;
        assert_eq!(big.exit_code, Some(0), "{big:?}");
        assert_eq!(big.stdout.len(), STDOUT_LIMIT);
        assert!(big.stdout.bytes().all(|b| b == b'a'));
        assert!(big.stdout_truncated);
        assert_eq!(big.stderr_tail.len(), STDERR_TAIL);
        // The tail: the end of the 5000 e's and the last line, not the first line.
        assert!(
            big.stderr_tail.starts_with("eee") && big.stderr_tail.ends_with("eeeend\n"),
            "{:?}",
            big.stderr_tail
        );
    }

    #[tokio::test]
    async fn bad_requests_are_refused_with_a_reason_and_nothing_runs() {
        let cases: &[(&[&str], u64, &str)] = &[
            (&[], 1_000, "refused: empty argv"),
            (&[""], 1_000, "refused: program \"\" is a relative path"),
            (
                &["./true"],
                1_000,
                "refused: program \"./true\" is a relative path",
            ),
            (
                &["bin/true"],
                1_000,
                "refused: program \"bin/true\" is a relative path",
            ),
            (
                &["no-such-probe-program"],
                1_000,
                "refused: program \"no-such-probe-program\" not found in /usr/local/sbin:",
            ),
            (
                &["/nonexistent/probe"],
                1_000,
                "refused: program /nonexistent/probe: No such file or directory",
            ),
            (
                &["/etc"],
                1_000,
                "refused: program /etc: not a regular file",
            ),
            (
                &["/bin/true", "a\0b"],
                1_000,
                "refused: argv[1] contains a NUL byte",
            ),
            (
                &["/bin/true"],
                0,
                "refused: timeout 0 ms outside 1..=60000 ms",
            ),
            (&["/bin/true"], 60_001, "refused: timeout 60001 ms outside"),
        ];
        for (argv, timeout_ms, expected) in cases {
            let result = run(argv, *timeout_ms).await;
            assert!(result.error.starts_with(expected), "{argv:?}: {result:?}");
            assert_eq!((result.exit_code, result.signal), (None, None), "{argv:?}");
        }
        assert_eq!(resolve_program("sh").unwrap().file_name().unwrap(), "sh");

        // Files that are not programs: without an execute bit, or not a format the kernel runs.
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, [0u8; 64]).unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = plain.to_str().unwrap();
        let result = run(&[plain], 1_000).await;
        assert_eq!(
            result.error,
            format!("refused: program {plain}: not executable")
        );
        let junk = junk.to_str().unwrap();
        let result = run(&[junk], 1_000).await;
        assert!(
            result
                .error
                .starts_with(&format!("`{junk}` could not be started: ")),
            "{result:?}"
        );
        assert_eq!((result.exit_code, result.signal), (None, None));
    }

    #[tokio::test]
    async fn at_most_max_in_flight_probes_run_at_once() {
        let executor = ProbeExecutor::new(1);
        let slow = request(&["/bin/sleep", "1"], 5_000);
        let first = tokio::spawn({
            let executor = executor.clone();
            async move { executor.run("a".into(), &slow).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let busy = executor
            .run("b".into(), &request(&["/bin/true"], 1_000))
            .await;
        assert_eq!(
            busy.error, "refused: 1 probes are already running on this agent",
            "{busy:?}"
        );
        assert_eq!(first.await.unwrap().exit_code, Some(0));
        let free = executor
            .run("c".into(), &request(&["/bin/true"], 1_000))
            .await;
        assert_eq!(free.exit_code, Some(0), "{free:?}");
    }
}
