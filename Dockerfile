# The attested image: attested (broker, agent, keyprovider, admin CLI),
# attested-keyprovider (exec mode's lighter entry point) and
# attested-labeler, static, on distroless, as the Kubernetes examples run
# them (examples/kubernetes). Build: make image (IMAGE=..., ENGINE=docker or
# podman). Push it, then pin its digest in examples/kubernetes.
#
# Every base image is pinned by digest (a tag can be moved to other bytes, a
# digest cannot); the tag each digest was published under is in the comment.
# These digests were taken from the official repositories' published
# references, not resolved on the machine that wrote this file: before the
# first build, and on every update, check each against its tag, e.g.
# 'crane digest docker.io/library/golang:1.26.8', and commit the change.

# golang:1.26.8 (the go.mod toolchain)
FROM docker.io/library/golang@sha256:9d2f36f06329b2a141b9db99ffa32765cf695ee57b813ca29e245e8670bcbfff AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The Makefile's build commands (a test holds them equal); static, as the
# distroless base has no C library.
RUN CGO_ENABLED=0 go build -o /out/attested ./cmd/attested
RUN CGO_ENABLED=0 go build -o /out/attested-keyprovider ./cmd/attested-keyprovider
RUN CGO_ENABLED=0 go build -o /out/attested-labeler ./cmd/attested-labeler

# busybox:1.37.0-musl (statically linked): the few tools the Kubernetes
# examples' init steps run (the broker's import, the agent's directories
# and enrollment), and nothing else of busybox.
FROM docker.io/library/busybox@sha256:222ad6d973c0d198014546a65cd02c5fdedcc172123c5b4c2bf0af636550bd94 AS tools
RUN mkdir -p /out/bin && cp /bin/busybox /out/bin/busybox && \
    for tool in sh cp chmod mkdir mv rm; do ln -s busybox "/out/bin/$tool"; done

# gcr.io/distroless/static-debian12:nonroot: CA certificates, /etc/passwd
# with user nonroot (65532), no shell or package manager of its own.
FROM gcr.io/distroless/static-debian12@sha256:d093aa3e30dbadd3efe1310db061a14da60299baff8450a17fe0ccc514a16639
COPY --from=tools /out/bin/ /bin/
COPY --from=build /out/attested /out/attested-keyprovider /out/attested-labeler /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/attested"]
