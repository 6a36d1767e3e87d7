//! Compiles the CO-RE programs in `src/bpf/*.bpf.c` and generates their libbpf-rs skeletons.
//!
//! `vmlinux.h` (the kernel's types, which CO-RE programs are written against) is generated
//! here, into `OUT_DIR`, from the build machine's kernel BTF with `bpftool` — not committed
//! (it is ~3 MB). Overrides: `FAULTLINE_BPF_VMLINUX_H=/path/vmlinux.h` uses a given header;
//! `FAULTLINE_BPF_BTF=/path/btf` dumps another BTF file; `FAULTLINE_BPFTOOL` names bpftool.
//! The objects still run on other kernels with BTF: libbpf relocates every field access
//! against the running kernel's BTF at load time.

use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;

const PROGRAMS: &[&str] = &["tcp", "sched", "oom", "proc", "block", "floor"];
const DEFAULT_BTF: &str = "/sys/kernel/btf/vmlinux";

fn main() -> Result<(), Box<dyn Error>> {
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let include = out.join("include");
    fs::create_dir_all(&include)?;
    write_vmlinux_h(&include.join("vmlinux.h"))?;

    println!("cargo:rerun-if-changed=src/bpf/common.h");
    for name in PROGRAMS {
        let source = format!("src/bpf/{name}.bpf.c");
        println!("cargo:rerun-if-changed={source}");
        SkeletonBuilder::new()
            .source(&source)
            .clang_args([
                "-I".as_ref(),
                include.as_os_str(),
                "-Wall".as_ref(),
                "-Wno-unused-function".as_ref(),
                "-Werror".as_ref(),
            ])
            .reference_obj(true)
            .build_and_generate(out.join(format!("{name}.skel.rs")))
            .map_err(|e| format!("building {source}: {e:#}"))?;
    }
    Ok(())
}

fn write_vmlinux_h(dest: &Path) -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-env-changed=FAULTLINE_BPF_VMLINUX_H");
    println!("cargo:rerun-if-env-changed=FAULTLINE_BPF_BTF");
    println!("cargo:rerun-if-env-changed=FAULTLINE_BPFTOOL");
    if let Some(header) = env::var_os("FAULTLINE_BPF_VMLINUX_H") {
        println!("cargo:rerun-if-changed={}", Path::new(&header).display());
        fs::copy(&header, dest)
            .map_err(|e| format!("copying FAULTLINE_BPF_VMLINUX_H {header:?}: {e}"))?;
        return Ok(());
    }
    let btf = env::var_os("FAULTLINE_BPF_BTF").unwrap_or_else(|| DEFAULT_BTF.into());
    println!("cargo:rerun-if-changed={}", Path::new(&btf).display());
    if !Path::new(&btf).exists() {
        return Err(format!(
            "{} does not exist: this kernel has no BTF. Build on a kernel with \
             CONFIG_DEBUG_INFO_BTF, or set FAULTLINE_BPF_VMLINUX_H to a vmlinux.h",
            Path::new(&btf).display()
        )
        .into());
    }
    let bpftool = find_bpftool()?;
    let output = Command::new(&bpftool)
        .args(["btf", "dump", "file"])
        .arg(&btf)
        .args(["format", "c"])
        .output()
        .map_err(|e| format!("running {}: {e}", bpftool.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} btf dump failed ({}): {}",
            bpftool.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    // Rewrite only on change, so dependants are not rebuilt for nothing.
    if fs::read(dest).ok().as_deref() != Some(&output.stdout[..]) {
        fs::write(dest, &output.stdout)?;
    }
    Ok(())
}

fn find_bpftool() -> Result<PathBuf, Box<dyn Error>> {
    if let Some(path) = env::var_os("FAULTLINE_BPFTOOL") {
        return Ok(path.into());
    }
    let path = env::var_os("PATH").unwrap_or_default();
    // Debian installs it in /usr/sbin, which is not on every user's PATH.
    let extra = ["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from);
    env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join("bpftool"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            "bpftool not found (apt-get install bpftool; or set FAULTLINE_BPFTOOL, or \
             FAULTLINE_BPF_VMLINUX_H to a prepared vmlinux.h)"
                .into()
        })
}
