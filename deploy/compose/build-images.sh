#!/usr/bin/env bash
# Builds the faultline-coordinator and faultline-agent images from local content only: no
# base image is pulled (air-gapped hosts, and machines without a registry). Each image is
# `FROM scratch` plus a root file system assembled here from
#   - the workspace binaries (target/release, else target/debug; or $FAULTLINE_BIN_DIR),
#   - for the agent, the host tools it runs (ip, tc, nft, iptables-nft, iptables-legacy and
#     the ip6tables variants, unshare, nsenter, sh, cat, readlink) and the iptables
#     extensions they dlopen,
#   - every shared library and the dynamic loader `ldd` lists for each of those programs,
# each copied to the same path it has on this machine (symlinks followed).
#
# Usage: deploy/compose/build-images.sh [--tag TAG] [--bin-dir DIR]
#   TAG      image tag (default $FAULTLINE_IMAGE_TAG, else "local"):
#            faultline-coordinator:TAG and faultline-agent:TAG
#   DIR      where faultline-coordinator and faultline-agent are (default: target/release if
#            both are there, else target/debug)
# Needs: docker, ldd (libc-bin), and the tools above installed on this machine (Debian:
# iproute2 iptables nftables util-linux). Prints the two image names.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
tag="${FAULTLINE_IMAGE_TAG:-local}"
bin_dir="${FAULTLINE_BIN_DIR:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --bin-dir) bin_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build-images.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin_dir" ]; then
  if [ -x "$workspace/target/release/faultline-coordinator" ] && [ -x "$workspace/target/release/faultline-agent" ]; then
    bin_dir="$workspace/target/release"
  else
    bin_dir="$workspace/target/debug"
  fi
fi
for b in faultline-coordinator faultline-agent; do
  [ -x "$bin_dir/$b" ] || { echo "build-images.sh: $bin_dir/$b not found: cargo build --release --workspace --bins" >&2; exit 1; }
done

context="$(mktemp -d "${TMPDIR:-/tmp}/faultline-images.XXXXXX")"
trap 'rm -rf "$context"' EXIT

# copy ROOTFS SOURCE [DEST]: SOURCE (symlinks followed) to DEST (default: the same path).
copy() {
  local rootfs="$1" src="$2" dest="${3:-$2}"
  mkdir -p "$rootfs$(dirname "$dest")"
  cp -L --preserve=mode "$src" "$rootfs$dest"
}

# add_program ROOTFS SOURCE [DEST]: the program and every library/loader ldd lists for it.
add_program() {
  local rootfs="$1" src="$2" dest="${3:-$2}" lib out
  copy "$rootfs" "$src" "$dest"
  if out="$(ldd "$src" 2>&1)"; then
    # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"
    for lib in $(printf '%s\n' "$out" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) .*/\1/p'); do
      [ -e "$rootfs$lib" ] || copy "$rootfs" "$lib"
    done
  elif ! printf '%s' "$out" | grep -q "not a dynamic executable"; then
    echo "build-images.sh: ldd $src: $out" >&2; exit 1
  fi
}

# tool ROOTFS NAME DIR: a host tool found on PATH, installed as DIR/NAME in the image.
tool() {
  local path
  path="$(PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" command -v "$2")" ||
    { echo "build-images.sh: $2 not found on this machine (install it: iproute2, iptables, nftables, util-linux)" >&2; exit 1; }
  add_program "$1" "$path" "$3/$2"
}

# --- coordinator ------------------------------------------------------------------------------
c="$context/coordinator"
add_program "$c/rootfs" "$bin_dir/faultline-coordinator" /usr/local/bin/faultline-coordinator
mkdir -p "$c/rootfs/etc/faultline" "$c/rootfs/var/lib/faultline" "$c/rootfs/tmp"
chmod 1777 "$c/rootfs/tmp"
cp "$here/coordinator.Dockerfile" "$c/Dockerfile"

# --- agent ------------------------------------------------------------------------------------
a="$context/agent"
add_program "$a/rootfs" "$bin_dir/faultline-agent" /usr/local/bin/faultline-agent
for t in ip tc nft iptables iptables-nft iptables-legacy iptables-legacy-save \
         ip6tables ip6tables-nft ip6tables-legacy ip6tables-legacy-save; do
  tool "$a/rootfs" "$t" /usr/sbin
done
for t in unshare nsenter sh cat readlink; do
  tool "$a/rootfs" "$t" /usr/bin
done
install -m 0755 "$here/agent-entrypoint.sh" "$a/rootfs/usr/local/bin/faultline-agent-entrypoint"
ln -s usr/bin "$a/rootfs/bin"
ln -s usr/sbin "$a/rootfs/sbin"
# iptables loads its matches and targets (statistic, REJECT, NFQUEUE, ...) with dlopen.
for d in /usr/lib/x86_64-linux-gnu/xtables /usr/lib/aarch64-linux-gnu/xtables /usr/lib/xtables /usr/libexec/xtables; do
  if [ -d "$d" ]; then
    mkdir -p "$a/rootfs$d"
    cp -L --preserve=mode "$d"/*.so "$a/rootfs$d/"
    for so in "$d"/*.so; do add_program "$a/rootfs" "$so" >/dev/null; done
  fi
done
# Name databases the tools consult (protocol and service names, tc distributions).
for f in /etc/protocols /etc/services /etc/ethertypes; do
  [ -e "$f" ] && copy "$a/rootfs" "$f"
done
[ -d /usr/lib/tc ] && { mkdir -p "$a/rootfs/usr/lib"; cp -rL /usr/lib/tc "$a/rootfs/usr/lib/"; }
mkdir -p "$a/rootfs/etc/faultline" "$a/rootfs/var/lib/faultline-agent" "$a/rootfs/run/netns" "$a/rootfs/tmp" \
         "$a/rootfs/proc" "$a/rootfs/sys"
chmod 1777 "$a/rootfs/tmp"
cp "$here/agent.Dockerfile" "$a/Dockerfile"

docker build --quiet --tag "faultline-coordinator:$tag" "$c" >/dev/null
docker build --quiet --tag "faultline-agent:$tag" "$a" >/dev/null
echo "faultline-coordinator:$tag"
echo "faultline-agent:$tag"
