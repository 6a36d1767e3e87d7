#!/bin/sh
# Entry point of the faultline-agent image (installed as /usr/local/bin/faultline-agent-entrypoint).
#
# Run with the host's PID namespace, pid 1 is the host's init. If this container has a cgroup
# namespace of its own (the default on cgroup v2 hosts), enter the host's first, so that the
# agent reads targets' /proc/PID/cgroup paths as the host writes them; needs CAP_SYS_ADMIN and
# CAP_SYS_PTRACE, which the agent has anyway. If pid 1's namespace cannot be read (no host PID
# namespace, or an init that refuses it) the agent starts in its own, with a warning: on
# cgroup v1 hosts, or with `cgroup: host` / Docker's default-cgroupns-mode=host, that is
# already the host's.
agent=/usr/local/bin/faultline-agent
if [ "$(readlink /proc/1/ns/cgroup 2>/dev/null)" = "$(readlink /proc/self/ns/cgroup)" ]; then
  exec "$agent" "$@"
fi
if nsenter --cgroup=/proc/1/ns/cgroup -- cat /proc/self/cgroup >/dev/null 2>&1; then
  exec nsenter --cgroup=/proc/1/ns/cgroup -- "$agent" "$@"
fi
echo "faultline-agent-entrypoint: cannot enter pid 1's cgroup namespace; staying in this container's (fine on cgroup v1 hosts or with a host cgroup namespace)" >&2
exec "$agent" "$@"
