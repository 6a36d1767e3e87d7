//! The stressor side: the agent binary re-executed with a hidden first argument.
//!
//! ```text
//! faultline-agent __faultline-stress --faultline-tag=<tag> [--join=<dir>/cgroup.procs]...
//!     [--file=<path>]... <cpu-hog|memory-hog|io-hog> [--workers=N] [--load=P] [--bytes=N]
//! ```
//! First thing, the child writes its own pid into every `--join` file (the target's v2
//! `cgroup.procs`, or each v1 controller's), so all it then uses counts against the target.
//! It then prints `ready` (or `error: <why>`) on stdout for the agent, and runs until killed.

use std::io::Write as _;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The hidden first argument.
pub const STRESS_ARG: &str = "__faultline-stress";
/// Every stressor's argv carries `--faultline-tag=<tag>`, so sweeps find it by its tag.
pub const TAG_PREFIX: &str = "--faultline-tag=";
pub(crate) const JOIN_PREFIX: &str = "--join=";
pub(crate) const FILE_PREFIX: &str = "--file=";

/// One io-hog worker cycles over this much of its file, so it loads the disk without filling it.
const IO_SPAN: u64 = 64 << 20;
const IO_BLOCK: usize = 1 << 20;

/// Whether this process was started as a stressor. `args` as from `std::env::args()` (the
/// program name first); the marker is accepted in either of the first two places.
pub fn is_stress_invocation(args: &[String]) -> bool {
    args.iter().take(2).any(|arg| arg == STRESS_ARG)
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Invocation {
    pub tag: String,
    pub joins: Vec<String>,
    pub files: Vec<String>,
    pub kind: String,
    pub workers: u32,
    pub load: u8,
    pub bytes: u64,
}

impl Invocation {
    /// Parses the arguments after [`STRESS_ARG`].
    pub(crate) fn parse(args: &[String]) -> Result<Self, String> {
        let mut invocation = Invocation {
            workers: 1,
            load: 100,
            ..Default::default()
        };
        for arg in args {
            let number = |value: &str| {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("bad number in {arg:?}"))
            };
            if let Some(tag) = arg.strip_prefix(TAG_PREFIX) {
                invocation.tag = tag.to_string();
            } else if let Some(path) = arg.strip_prefix(JOIN_PREFIX) {
                invocation.joins.push(path.to_string());
            } else if let Some(path) = arg.strip_prefix(FILE_PREFIX) {
                invocation.files.push(path.to_string());
            } else if let Some(value) = arg.strip_prefix("--workers=") {
                invocation.workers =
                    u32::try_from(number(value)?).map_err(|_| format!("{arg:?} too large"))?;
            } else if let Some(value) = arg.strip_prefix("--load=") {
                invocation.load = u8::try_from(number(value)?)
                    .ok()
                    .filter(|load| (1..=100).contains(load))
                    .ok_or_else(|| format!("{arg:?}: load must be 1..=100"))?;
            } else if let Some(value) = arg.strip_prefix("--bytes=") {
                invocation.bytes = number(value)?;
            } else if matches!(arg.as_str(), "cpu-hog" | "memory-hog" | "io-hog") {
                invocation.kind = arg.clone();
            } else {
                return Err(format!("unknown stressor argument {arg:?}"));
            }
        }
        if invocation.tag.is_empty() || invocation.kind.is_empty() {
            return Err("a stressor needs --faultline-tag= and a kind".into());
        }
        Ok(invocation)
    }
}

/// Runs a stressor until it is killed. Call first thing in `main` when
/// [`is_stress_invocation`] says so (before any runtime starts threads).
pub fn stress_main(args: &[String]) -> ExitCode {
    let rest: Vec<String> = args
        .iter()
        .skip_while(|arg| *arg != STRESS_ARG)
        .skip(1)
        .cloned()
        .collect();
    let invocation = match Invocation::parse(&rest) {
        Ok(invocation) => invocation,
        Err(why) => return fail(&why, 2),
    };
    let me = std::process::id().to_string();
    for join in &invocation.joins {
        // No create: a vanished cgroup must fail, not become a regular file.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(join)
            .and_then(|mut file| file.write_all(me.as_bytes()));
        if let Err(err) = written {
            return fail(&format!("joining {join}: {err}"), 3);
        }
    }
    match invocation.kind.as_str() {
        "cpu-hog" => cpu_hog(invocation.workers.max(1), invocation.load),
        "memory-hog" => memory_hog(invocation.bytes),
        "io-hog" => io_hog(&invocation.files),
        _ => fail("unknown stressor kind", 2),
    }
}

fn fail(why: &str, code: u8) -> ExitCode {
    // The agent reads this line from our stdout; stderr goes to its log.
    println!("error: {why}");
    eprintln!("faultline stressor: {why}");
    ExitCode::from(code)
}

fn ready() {
    println!("ready");
    let _ = std::io::stdout().flush();
}

/// Forever: the caller is killed, never returns normally.
fn hold() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(
        now.tv_sec.max(0) as u64,
        now.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// `workers` threads, each using `load`% of a CPU. Each keeps its own CPU time (not wall time)
/// at `load`% of the wall time of the current one-second window: spinning while below, sleeping
/// while above. When other load delays it, it catches up within the window rather than
/// silently running light; a new window starts every second, so it never bursts for long.
fn cpu_hog(workers: u32, load: u8) -> ExitCode {
    ready();
    let share = f64::from(load) / 100.0;
    for index in 0..workers {
        let spawned = std::thread::Builder::new()
            .name(format!("cpu-hog-{index}"))
            .spawn(move || {
                let mut counter = 0u64;
                loop {
                    let window = Instant::now();
                    let cpu_start = thread_cpu_time();
                    while window.elapsed() < Duration::from_secs(1) {
                        let wanted = window.elapsed().mul_f64(share);
                        let used = thread_cpu_time().saturating_sub(cpu_start);
                        if used <= wanted || load >= 100 {
                            // Spin ~1 ms, then look again.
                            let spin = Instant::now();
                            while spin.elapsed() < Duration::from_millis(1) {
                                counter = std::hint::black_box(
                                    counter.wrapping_mul(6364136223846793005).wrapping_add(1),
                                );
                            }
                        } else {
                            // Sleep until the share is back at `load`%.
                            let ahead = (used - wanted).div_f64(share.max(0.01));
                            std::thread::sleep(
                                ahead.clamp(Duration::from_millis(1), Duration::from_millis(100)),
                            );
                        }
                    }
                }
            });
        if let Err(err) = spawned {
            eprintln!("faultline stressor: starting cpu worker {index}: {err}");
        }
    }
    hold()
}

/// Allocates `bytes`, writes every page (distinct contents, so neither the zero page, KSM nor
/// zswap's same-filled pages can make it free), locks it in RAM when allowed, and holds it.
/// Pages are charged to the memory cgroup the process is in when they are first touched:
/// the cgroups were joined before this runs.
fn memory_hog(bytes: u64) -> ExitCode {
    ready();
    const CHUNK: u64 = 64 << 20;
    let page = 4096usize;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut left = bytes;
    let mut counter = 0u64;
    while left > 0 {
        let size = left.min(CHUNK) as usize;
        let mut chunk = vec![0u8; size];
        for block in chunk.chunks_mut(page) {
            counter += 1;
            let stamp = counter.to_ne_bytes();
            let n = stamp.len().min(block.len());
            block[..n].copy_from_slice(&stamp[..n]);
            block[n..].fill(0xA5);
        }
        chunks.push(chunk);
        left -= size as u64;
    }
    std::hint::black_box(&chunks);
    // SAFETY: mlockall has no memory-safety preconditions; failure (no CAP_IPC_LOCK, limits)
    // only means the pages may be swapped, which is acceptable.
    unsafe { libc::mlockall(libc::MCL_CURRENT) };
    hold()
}

/// One worker per file: writes 1 MiB blocks and fsyncs each, cycling over 64 MiB. The file is
/// unlinked right after opening, so the space goes back however the process ends (SIGKILL,
/// the agent's death): the kernel frees an unlinked file when its last descriptor closes.
fn io_hog(files: &[String]) -> ExitCode {
    let mut opened = Vec::new();
    for path in files {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path);
        match file {
            Ok(file) => {
                let _ = std::fs::remove_file(path);
                opened.push(file);
            }
            Err(err) => {
                for path in files {
                    let _ = std::fs::remove_file(path);
                }
                return fail(&format!("creating {path}: {err}"), 4);
            }
        }
    }
    ready();
    for (index, file) in opened.into_iter().enumerate() {
        let spawned = std::thread::Builder::new()
            .name(format!("io-hog-{index}"))
            .spawn(move || {
                let block: Vec<u8> = (0..IO_BLOCK).map(|i| (i % 251) as u8).collect();
                let mut offset = 0u64;
                loop {
                    let written = file
                        .write_all_at(&block, offset)
                        .and_then(|()| file.sync_data());
                    if written.is_err() {
                        // Disk full or an IO error: back off and start over.
                        std::thread::sleep(Duration::from_millis(100));
                        offset = 0;
                        continue;
                    }
                    offset = (offset + IO_BLOCK as u64) % IO_SPAN;
                }
            });
        if let Err(err) = spawned {
            eprintln!("faultline stressor: starting io worker {index}: {err}");
        }
    }
    hold()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn the_marker_is_recognised_in_first_or_second_place() {
        assert!(is_stress_invocation(&strings(&[
            "/usr/bin/faultline-agent",
            STRESS_ARG,
            "x"
        ])));
        assert!(is_stress_invocation(&strings(&[STRESS_ARG])));
        assert!(!is_stress_invocation(&strings(&[
            "faultline-agent",
            "--coordinator",
            STRESS_ARG
        ])));
        assert!(!is_stress_invocation(&[]));
    }

    #[test]
    fn arguments_parse_and_bad_ones_are_refused() {
        let parsed = Invocation::parse(&strings(&[
            "--faultline-tag=f-1",
            "--join=/sys/fs/cgroup/cpu/x/cgroup.procs",
            "--join=/sys/fs/cgroup/memory/x/cgroup.procs",
            "cpu-hog",
            "--workers=2",
            "--load=40",
        ]))
        .unwrap();
        assert_eq!(parsed.tag, "f-1");
        assert_eq!(parsed.joins.len(), 2);
        assert_eq!(
            (parsed.kind.as_str(), parsed.workers, parsed.load),
            ("cpu-hog", 2, 40)
        );
        assert!(
            Invocation::parse(&strings(&["--faultline-tag=x", "cpu-hog", "--load=0"])).is_err()
        );
        assert!(Invocation::parse(&strings(&["--faultline-tag=x", "fork-bomb"])).is_err());
        assert!(Invocation::parse(&strings(&["cpu-hog"])).is_err());
    }
}
