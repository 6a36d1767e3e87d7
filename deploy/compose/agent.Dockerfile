# faultline-agent image, FROM scratch: the agent, the host tools it runs (ip, tc, nft,
# iptables-nft/-legacy, unshare, nsenter, sh, cat, readlink), their shared libraries and the
# iptables extensions, assembled into rootfs/ by build-images.sh. Build it with that script.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.opencontainers.image.title="faultline-agent" \
      org.opencontainers.image.description="Faultline host agent (needs host PID/network namespaces and capabilities)"
# The entry point enters the host's cgroup namespace first when the container has its own
# (cgroup v2 default), so /proc/PID/cgroup of targets reads as on the host: see
# agent-entrypoint.sh.
ENTRYPOINT ["/usr/local/bin/faultline-agent-entrypoint"]
CMD ["--certs", "/etc/faultline", "--state-dir", "/var/lib/faultline-agent"]
