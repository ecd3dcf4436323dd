# syntax=docker/dockerfile:1
#
# costwatch's container image. Build from the repository root:
#
#   docker build --build-arg COSTWATCH_BUILD_REVISION="$(git rev-parse --short=12 HEAD)" -t costwatch .
#
# The contract (README, "Deploying"): the configuration is read from /etc/costwatch/costwatch.toml
# (COSTWATCH_CONFIG; the image ships config/costwatch.toml there, mount your own over it), every
# key can be overridden as COSTWATCH__SECTION__KEY, HTTP (/metrics, /healthz, /readyz, the API)
# listens on 0.0.0.0:9464, the process runs as uid/gid 10001, writes nothing to disk (a read-only
# root filesystem works) and needs no volume.

ARG RUST_VERSION=1.95
# Builder and runtime share a Debian release, so the shared libraries the binary was linked
# against (OpenSSL, libsasl2, libcurl) are the ones it finds at run time.
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# librdkafka is built from source by rdkafka-sys: a C toolchain, make, and the -dev packages of
# the libraries Cargo.toml's rdkafka features link (TLS, SASL, OIDC over libcurl, zstd, zlib).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      g++ make pkg-config libssl-dev libsasl2-dev libcurl4-openssl-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# There is no .git in the build context (.dockerignore): build.rs takes the revision from here.
ARG COSTWATCH_BUILD_REVISION=unknown
ENV COSTWATCH_BUILD_REVISION=${COSTWATCH_BUILD_REVISION}
# The dist profile: release without debug info, stripped (see Cargo.toml).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --bin costwatch \
 && install -D -m 0755 target/dist/costwatch /out/costwatch

FROM debian:${DEBIAN_RELEASE}-slim
# The runtime halves of the build's -dev packages (zlib and libzstd are in the base already);
# CA certificates for TLS to Kafka, PostgreSQL and alert receivers.
# scripts/check_deploy.py checks that every shared library the binary needs comes from here.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 libcurl4 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/costwatch /usr/local/bin/costwatch
COPY config/costwatch.toml /etc/costwatch/costwatch.toml
# All interfaces inside the container (the binary's own default is 127.0.0.1), and JSON logs for
# log collectors.
ENV COSTWATCH_CONFIG=/etc/costwatch/costwatch.toml \
    COSTWATCH__HTTP__LISTEN=0.0.0.0:9464 \
    COSTWATCH__LOG__FORMAT=json
# A numeric user, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
EXPOSE 9464
# SIGTERM drains (flush, store offsets, leave the group): allow it 45 s (docker stop -t 45,
# compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["costwatch"]
CMD ["run"]
