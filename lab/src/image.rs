//! Container images built from host content, since nothing can be pulled on test machines and
//! a demo should not need a registry.
//!
//! [`ensure_image`] copies host binaries (following symlinks, e.g. `/bin/sh` -> `dash`) and
//! every shared library and dynamic loader `ldd` lists for them to the same paths of a root
//! file system, and builds it `FROM scratch` with the docker CLI. An existing tag is reused as
//! is, so bump the tag whenever the binaries, command or labels change.
//!
//! [`ImageSpec`] describes a richer image (data trees, generated configuration, users,
//! directories owned by a non-root user, `ENV`/`USER`) whose tag is a fingerprint of that
//! content, so it is rebuilt exactly when something in it changed.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
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
    ensure_image_rooted(tag, binaries, Path::new("/"), cmd, labels).await
}

/// As [`ensure_image`], but a binary under `staging` goes to its path relative to `staging`
/// (so `STAGING/usr/local/bin/x` becomes `/usr/local/bin/x` in the image); the others, and
/// every shared library, go to their host paths.
pub async fn ensure_image_rooted(
    tag: &str,
    binaries: &[&str],
    staging: &Path,
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
        let host_path = Path::new(binary);
        let in_image = match host_path.strip_prefix(staging) {
            Ok(relative) if staging != Path::new("/") => Path::new("/").join(relative),
            _ => host_path.to_path_buf(),
        };
        copy_into_rootfs_as(&rootfs, host_path, &in_image)?;
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
    dockerfile_with(&[], &[], cmd, labels)
}

/// [`dockerfile`] with extra `COPY` lines after the root file system and instructions after
/// them (`ENV`, `USER`...).
fn dockerfile_with(
    copies: &[String],
    instructions: &[String],
    cmd: &[&str],
    labels: &[&str],
) -> String {
    // JSON strings are valid Dockerfile strings for the exec form and for LABEL.
    let quote = |text: &str| serde_json::Value::from(text).to_string();
    let mut out = String::from("FROM scratch\nCOPY rootfs/ /\n");
    for line in copies.iter().chain(instructions) {
        out.push_str(line);
        out.push('\n');
    }
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
    copy_into_rootfs_as(rootfs, host_path, host_path)
}

/// Copies a host file (following symlinks) to `in_image` under `rootfs`.
fn copy_into_rootfs_as(rootfs: &Path, host_path: &Path, in_image: &Path) -> Result<(), LabError> {
    let target = in_rootfs(rootfs, in_image);
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

/// An image `FROM scratch` described by what goes into it, so that its tag can carry a
/// fingerprint of that content ([`ImageSpec::fingerprint`]) and a build happens only when the
/// content changed ([`ImageSpec::ensure`]). Used for the images that need more than a binary and
/// its libraries: data trees, generated configuration, users, directories owned by a non-root
/// user.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Host executables or shared objects (symlinks followed) and the path each gets in the
    /// image; the libraries `ldd` lists for them go to their host paths.
    pub binaries: Vec<(PathBuf, String)>,
    /// Host files copied as they are to their host paths (no `ldd`), e.g. a CA bundle.
    pub files: Vec<PathBuf>,
    /// Host directories copied recursively to their host paths, minus the entries whose file
    /// name starts with one of the prefixes (e.g. PostgreSQL's man pages).
    pub trees: Vec<(PathBuf, Vec<String>)>,
    /// Files written into the image: path, content, mode.
    pub generated: Vec<(String, String, u32)>,
    /// Empty directories: path and mode (e.g. `/tmp`, 0o1777).
    pub dirs: Vec<(String, u32)>,
    /// Empty directories owned by `uid:gid` (e.g. a database's data directory for a server
    /// that runs as its own user): path, uid, gid.
    pub owned_dirs: Vec<(String, u32, u32)>,
    /// Dockerfile instructions after the files, e.g. `ENV PATH=...` or `USER postgres`.
    pub instructions: Vec<String>,
    /// The command, exec form.
    pub cmd: Vec<String>,
    /// `key=value` labels.
    pub labels: Vec<String>,
}

impl ImageSpec {
    /// A short hash of everything that makes up the image: the host files' paths, sizes and
    /// modification times (a package upgrade or a rebuilt binary changes them), the generated
    /// files, the directories, instructions, command and labels.
    pub fn fingerprint(&self) -> Result<String, LabError> {
        let mut hasher = DefaultHasher::new();
        let mut host_file = |path: &Path| -> Result<(), LabError> {
            let meta = std::fs::metadata(path).map_err(|e| LabError::io("reading", path, e))?;
            path.hash(&mut hasher);
            meta.len().hash(&mut hasher);
            meta.modified().ok().hash(&mut hasher);
            Ok(())
        };
        for (binary, _) in &self.binaries {
            host_file(binary)?;
        }
        for file in &self.files {
            host_file(file)?;
        }
        for (dir, excluded) in &self.trees {
            for file in tree_files(dir, excluded)? {
                host_file(&file)?;
            }
        }
        for (binary, in_image) in &self.binaries {
            (binary, in_image).hash(&mut hasher);
        }
        self.generated.hash(&mut hasher);
        self.dirs.hash(&mut hasher);
        self.owned_dirs.hash(&mut hasher);
        self.instructions.hash(&mut hasher);
        self.cmd.hash(&mut hasher);
        self.labels.hash(&mut hasher);
        Ok(format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff))
    }

    /// Returns `REPOSITORY:FINGERPRINT`, first building it if the engine does not have it.
    pub async fn ensure(&self, repository: &str) -> Result<String, LabError> {
        let tag = format!("{repository}:{}", self.fingerprint()?);
        if docker::image_exists(&tag).await? {
            return Ok(tag);
        }
        let context = tempfile::tempdir().map_err(|e| {
            LabError::io(
                "creating a build context directory in",
                std::env::temp_dir(),
                e,
            )
        })?;
        let rootfs = context.path().join("rootfs");
        std::fs::create_dir_all(&rootfs)
            .map_err(|e| LabError::io("creating in the build context", &rootfs, e))?;
        for (binary, in_image) in &self.binaries {
            copy_into_rootfs_as(&rootfs, binary, Path::new(in_image))?;
            let binary_text = binary.to_string_lossy();
            for library in shared_libraries(&binary_text).await? {
                copy_into_rootfs(&rootfs, &library)?;
            }
        }
        for file in &self.files {
            copy_into_rootfs(&rootfs, file)?;
        }
        for (dir, excluded) in &self.trees {
            for file in tree_files(dir, excluded)? {
                copy_into_rootfs(&rootfs, &file)?;
            }
        }
        for (in_image, contents, mode) in &self.generated {
            let target = in_rootfs(&rootfs, Path::new(in_image));
            create_parent(&target)?;
            std::fs::write(&target, contents).map_err(|e| LabError::io("writing", &target, e))?;
            set_mode(&target, *mode)?;
        }
        for (in_image, mode) in &self.dirs {
            let target = in_rootfs(&rootfs, Path::new(in_image));
            std::fs::create_dir_all(&target).map_err(|e| LabError::io("creating", &target, e))?;
            set_mode(&target, *mode)?;
        }
        // COPY --chown takes a source directory per destination: one per owned directory.
        let mut copies = Vec::new();
        for (index, (in_image, uid, gid)) in self.owned_dirs.iter().enumerate() {
            let source = context.path().join(format!("owned-{index}"));
            std::fs::create_dir_all(&source).map_err(|e| LabError::io("creating", &source, e))?;
            copies.push(format!(
                "COPY --chown={uid}:{gid} owned-{index}/ {}/",
                in_image.trim_end_matches('/')
            ));
        }
        let cmd: Vec<&str> = self.cmd.iter().map(String::as_str).collect();
        let labels: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        let text = dockerfile_with(&copies, &self.instructions, &cmd, &labels);
        let dockerfile_path = context.path().join("Dockerfile");
        std::fs::write(&dockerfile_path, text)
            .map_err(|e| LabError::io("writing", &dockerfile_path, e))?;
        let context_path = context.path().to_string_lossy().into_owned();
        docker::run_with_timeout(
            &["build", "--quiet", "--tag", &tag, &context_path],
            BUILD_TIMEOUT,
        )
        .await?;
        Ok(tag)
    }
}

/// The regular files under `dir` (recursively, following symlinks), skipping entries whose file
/// name starts with one of `excluded`; sorted, so that a fingerprint does not depend on the
/// order the file system lists them in.
fn tree_files(dir: &Path, excluded: &[String]) -> Result<Vec<PathBuf>, LabError> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries =
            std::fs::read_dir(&current).map_err(|e| LabError::io("listing", &current, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LabError::io("listing", &current, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if excluded
                .iter()
                .any(|prefix| name.starts_with(prefix.as_str()))
            {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::metadata(&path).map_err(|e| LabError::io("reading", &path, e))?;
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Where `in_image` lies under `rootfs`.
fn in_rootfs(rootfs: &Path, in_image: &Path) -> PathBuf {
    rootfs.join(in_image.strip_prefix("/").unwrap_or(in_image))
}

fn create_parent(target: &Path) -> Result<(), LabError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| LabError::io("creating in the build context", parent, e))?;
    }
    Ok(())
}

/// Sets a file's mode; COPY keeps it in the image.
fn set_mode(path: &Path, mode: u32) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| LabError::io("setting the mode of", path, e))
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

    #[test]
    fn owned_directories_and_instructions_come_after_the_root_file_system() {
        let text = dockerfile_with(
            &["COPY --chown=999:999 owned-0/ /var/lib/postgresql/".to_string()],
            &["USER postgres".to_string()],
            &["/bin/sh", "/entrypoint"],
            &["faultline.lab=1"],
        );
        assert_eq!(
            text,
            "FROM scratch\n\
             COPY rootfs/ /\n\
             COPY --chown=999:999 owned-0/ /var/lib/postgresql/\n\
             USER postgres\n\
             LABEL \"faultline.lab\"=\"1\"\n\
             CMD [\"/bin/sh\", \"/entrypoint\"]\n"
        );
    }

    #[test]
    fn tree_files_skip_excluded_names_and_come_sorted() {
        let dir = tempfile::tempdir().expect("temp dir");
        for path in ["b/x", "a/y", "man/z", "top"] {
            let file = dir.path().join(path);
            std::fs::create_dir_all(file.parent().expect("has a parent")).expect("mkdir");
            std::fs::write(&file, path).expect("write");
        }
        let found = tree_files(dir.path(), &["man".to_string()]).expect("listed");
        let relative: Vec<_> = found
            .iter()
            .map(|f| f.strip_prefix(dir.path()).expect("inside").to_path_buf())
            .collect();
        assert_eq!(relative, ["a/y", "b/x", "top"].map(PathBuf::from).to_vec());
    }
}
