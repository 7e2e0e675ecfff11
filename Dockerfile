# One image for every part of the federation: security servers, authority, mock registries.
# Protobuf files are compiled by a pure-Rust compiler (protox): no protoc needed.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kopir

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/kopir kopir && mkdir -p /var/lib/kopir/globalconf && chown -R kopir /var/lib/kopir
COPY --from=build /src/target/release/kopir /usr/local/bin/kopir
COPY deploy /kopir/deploy
COPY certs-dev /kopir/certs-dev
WORKDIR /kopir
USER kopir
ENTRYPOINT ["kopir"]
