# syntax=docker/dockerfile:1
# The image every Trellis container of compose.yaml runs: the workspace's
# binaries (trellis, trellis-registry, mesh-proxy and the services), and
# the Python profile service with its generated stubs. Built by
# `docker compose up --build`; on its own: `docker build -t trellis-mesh:local .`

# The toolchain of rust-toolchain.toml (tests/compose.rs checks they agree).
ARG RUST_VERSION=1.95.0

# ---- Rust: the whole workspace, in release, as `trellis up` builds it.
FROM rust:${RUST_VERSION}-bookworm AS rust
ARG RUST_VERSION
# Use the image's toolchain as it is (rust-toolchain.toml would also ask
# for rustfmt and clippy, which a build does not need).
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --workspace --locked \
 && mkdir -p /out \
 && for bin in trellis trellis-registry mesh-proxy trellis-user trellis-usage \
               trellis-settlement trellis-archive trellis-echo; do \
      cp "target/dist/$bin" /out/; \
    done

# ---- Python: grpcio for examples/profile in a virtualenv at the path
# trellis.toml runs it from (target/pytools), and the stubs
# examples/profile/generate.sh makes from proto/ (target/python-gen).
FROM debian:bookworm-slim AS python
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY proto/ proto/
COPY examples/profile/generate.sh examples/profile/generate.sh
RUN python3 -m venv target/pytools \
 && target/pytools/bin/pip install --no-cache-dir --disable-pip-version-check \
      grpcio grpcio-tools grpcio-reflection grpcio-health-checking \
 && examples/profile/generate.sh \
 && target/pytools/bin/pip uninstall -y --disable-pip-version-check grpcio-tools

# ---- What runs.
FROM debian:bookworm-slim
# python3 for the profile service (the same Python the virtualenv was made
# with); curl for the sidecars' and edges' health checks (admin /ready).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Not root. /certs and the archive are volumes in compose.yaml: a new
# volume takes the owner of the directory it is mounted on.
RUN useradd --system --uid 10001 --home-dir /app --no-create-home trellis \
 && mkdir -p /app /certs /var/lib/trellis/archive \
 && chown trellis:trellis /certs /var/lib/trellis /var/lib/trellis/archive
COPY --from=rust /out/ /usr/local/bin/
WORKDIR /app
COPY --from=python /app/target/ target/
COPY config/ config/
COPY proto/ proto/
COPY examples/ examples/
USER trellis
CMD ["trellis", "--help"]
