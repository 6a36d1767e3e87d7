//! Container images built from host content, since nothing can be pulled on test machines and
//! a demo should not need a registry.
//!
//! [`ensure_image`] copies host binaries (following symlinks, e.g. `/bin/sh` -> `dash`) and
//! every shared library and dynamic loader `ldd` lists for them to the same paths of a root
//! file system, and builds it `FROM scratch` with the docker CLI. An existing tag is reused as
//! is, so bump the tag whenever the binaries, command or labels change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::{LabError, docker};

/// Upper bound for building an image.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

/// Returns `tag`, first building it if the engine does not have it: an image `FROM scratch`
/// holding `binaries` (absolute host paths, copied to the same paths) and their shared
/// libraries, with `cmd` as its command and `labels` (`key=value`) as its labels.
///
/// Safe to call concurrently: a duplicate build is harmless (same content, same tag).
pub async fn ensure_image(
    tag: &str,
    binaries: &[&str],
    cmd: &[&str],
    labels: &[&str],
) -> Result<String, LabError> {
    if docker::image_exists(tag).await? {
        return Ok(tag.to_string());
    }

    let context = tempfile::tempdir().map_err(|e| {
        LabError::io(
            "creating a build context directory in",
            std::env::temp_dir(),
            e,
        )
    })?;
    let rootfs = context.path().join("rootfs");
    for binary in binaries {
        copy_into_rootfs(&rootfs, Path::new(binary))?;
        for library in shared_libraries(binary).await? {
            copy_into_rootfs(&rootfs, &library)?;
        }
    }
    let dockerfile_path = context.path().join("Dockerfile");
    std::fs::write(&dockerfile_path, dockerfile(cmd, labels))
        .map_err(|e| LabError::io("writing", &dockerfile_path, e))?;

    let context_path = context.path().to_string_lossy().into_owned();
    docker::run_with_timeout(
        &["build", "--quiet", "--tag", tag, &context_path],
        BUILD_TIMEOUT,
    )
    .await?;
    Ok(tag.to_string())
}

/// The Dockerfile: the root file system on `scratch`, quoted labels, exec-form command.
fn dockerfile(cmd: &[&str], labels: &[&str]) -> String {
    // JSON strings are valid Dockerfile strings for the exec form and for LABEL.
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let mut out = String::from("FROM scratch\nCOPY rootfs/ /\n");
    for label in labels {
        let (key, value) = label.split_once('=').unwrap_or((label, ""));
        out.push_str(&format!("LABEL {}={}\n", quote(key), quote(value)));
    }
    let cmd: Vec<String> = cmd.iter().map(|arg| quote(arg)).collect();
    out.push_str(&format!("CMD [{}]\n", cmd.join(", ")));
    out
}

/// Copies a host file (following symlinks) to the same path under `rootfs`, keeping its
/// permissions.
fn copy_into_rootfs(rootfs: &Path, host_path: &Path) -> Result<(), LabError> {
    let relative = host_path.strip_prefix("/").unwrap_or(host_path);
    let target: PathBuf = rootfs.join(relative);
    if target.exists() {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| LabError::io("creating in the build context", parent, e))?;
    }
    std::fs::copy(host_path, &target)
        .map_err(|e| LabError::io("copying into the image", host_path, e))?;
    Ok(())
}

/// The shared libraries and dynamic loader `ldd` lists for a binary (none if it is static).
async fn shared_libraries(binary: &str) -> Result<Vec<PathBuf>, LabError> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .await
        .map_err(|source| LabError::Spawn {
            command: format!("ldd {binary}"),
            hint: " (ldd, from libc-bin, is needed to build the image)".to_string(),
            source,
        })?;
    if !output.status.success() {
        // ldd exits non-zero for static executables ("not a dynamic executable").
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(LabError::Ldd {
            binary: binary.to_string(),
            reason: stderr.trim().to_string(),
        });
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

/// Extracts file paths from `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file and is skipped.
fn parse_ldd(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .filter_map(|line| {
            let candidate = match line.split_once("=>") {
                Some((_, resolved)) => resolved,
                None => line,
            };
            candidate.split_whitespace().next()
        })
        .filter(|path| path.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_yields_library_and_loader_paths() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                      \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                      \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(output),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn dockerfile_quotes_labels_and_uses_the_exec_form() {
        let text = dockerfile(&["/bin/sleep", "infinity"], &["faultline.demo=1", "bare"]);
        assert_eq!(
            text,
            "FROM scratch\n\
             COPY rootfs/ /\n\
             LABEL \"faultline.demo\"=\"1\"\n\
             LABEL \"bare\"=\"\"\n\
             CMD [\"/bin/sleep\", \"infinity\"]\n"
        );
    }
}
