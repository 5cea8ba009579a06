# syntax=docker/dockerfile:1
# The lfguard image: a static-ish Rust binary on distroless (glibc, CA certificates, no shell),
# running as the unprivileged user 65532.
#
#   docker build -t registry.example.com/lfguard:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#     -v "$PWD/my-lfguard.toml:/etc/lfguard/lfguard.toml:ro" registry.example.com/lfguard:0.1.0
#
# docs/docker-systemd.md shows how to run it: mounting a config and a partners directory, and
# reaching a backend outside the container.
#
# BuildKit (the default builder since Docker 23) keeps the cargo registry and target directory
# in cache mounts between builds, so only changed crates are recompiled.

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Everything .dockerignore lets through: Cargo.toml and Cargo.lock, src/, benches/ and tests/
# (cargo checks that every declared target exists even when it only builds the binary).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin lfguard \
    && install -D -m 0755 target/dist/lfguard /out/lfguard

# Same Debian release as the builder, so the binary finds the glibc it was linked against.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/lfguard /usr/local/bin/lfguard
# A default configuration so that the image starts as shipped. It is the repository's example:
# it configures partner P123456 with an inline development secret, so mount your own file over
# it in any real deployment (k8s/base mounts a ConfigMap at /etc/lfguard).
COPY config/lfguard.toml /etc/lfguard/lfguard.toml
ENV LFGUARD_CONFIG=/etc/lfguard/lfguard.toml
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
# 8080: callbacks (server.listen); 9090: /healthz, /readyz, /metrics (server.admin_listen).
EXPOSE 8080 9090
# There is no shell or curl for a HEALTHCHECK; orchestrators probe http://HOST:9090/healthz.
# SIGTERM (Docker's and Kubernetes' default stop signal) drains within server.shutdown_grace.
ENTRYPOINT ["/usr/local/bin/lfguard"]
CMD ["serve"]
