# syntax=docker/dockerfile:1
# Build:  docker build -t zoom-integration .
# Run:    docker run --stop-timeout 45 -p 9980:9980 -p 127.0.0.1:9981:9981 -v zoom-data:/data -e WEBHOOK_ADDRESS=zoom.example.com zoom-integration
# (45 s to stop: in-flight requests, then token refreshes Zoom may have rotated; see README.)
# (gRPC is for the host engine only: publish it on loopback or a private network, never publicly.)

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# protoc comes from the protoc-bin-vendored crate, rusqlite builds SQLite with gcc:
# the slim image has everything needed.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p zoom-integration \
    && install -D -m 0755 target/release/zoom-integration /out/zoom-integration \
    && install -d -m 0700 /out/root/data

# Distroless: glibc, CA certificates, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/zoom-integration /usr/local/bin/zoom-integration
# COPY of a directory copies its contents into a new 0755 one: copying its parent keeps
# data/ itself, with its 0700.
COPY --from=build --chown=65532:65532 /out/root/ /
ENV HTTP_ADDR=0.0.0.0:9980 \
    GRPC_ADDR=0.0.0.0:9981 \
    DATA_DIR=/data \
    LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 9980 9981
USER 65532:65532
# No shell or curl here: the binary probes its own /healthz (HTTP_ADDR, 0.0.0.0 as loopback).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["/usr/local/bin/zoom-integration","healthcheck"]
ENTRYPOINT ["/usr/local/bin/zoom-integration"]
