//! Static facts about this host (name, kernel, OS, cpus, root), reported on registration.
//! What the host can *do* is probed in [`crate::preflight`].

use faultline_proto::v1 as pb;

/// Static facts about the host.
pub fn facts() -> pb::HostFacts {
    let uname = nix::sys::utsname::uname().ok();
    pb::HostFacts {
        hostname: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        kernel: uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        os: os_release_name(&std::fs::read_to_string("/etc/os-release").unwrap_or_default()),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u32),
        root: nix::unistd::geteuid().is_root(),
    }
}

/// `PRETTY_NAME` from an os-release file's text.
pub fn os_release_name(text: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|value| value.trim_matches('"').to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_pretty_name_is_read() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(os_release_name(text), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_release_name(""), "");
    }
}
