# faultline-coordinator image, FROM scratch: the binary and the shared libraries it loads,
# assembled into rootfs/ by build-images.sh (nothing is pulled). Build it with that script.
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
LABEL org.opencontainers.image.title="faultline-coordinator" \
      org.opencontainers.image.description="Faultline coordinator (mTLS gRPC, SQLite store)"
EXPOSE 7443 9464
VOLUME ["/var/lib/faultline"]
WORKDIR /var/lib/faultline
ENTRYPOINT ["/usr/local/bin/faultline-coordinator"]
CMD ["--listen", "0.0.0.0:7443", "--certs", "/etc/faultline", "--db", "/var/lib/faultline/faultline.db"]
