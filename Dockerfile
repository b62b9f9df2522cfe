# The meshlane image: meshlane-agent (the DaemonSet's process),
# meshlane-cni (which the agent copies into the host's CNI bin directory)
# and meshlanectl (kubectl exec into the agent pod to debug the node).
#   docker build -t ghcr.io/meshlane/meshlane:dev --build-arg VERSION=dev .
# The eBPF object is committed (bpf/) and embedded in the agent, so the build
# needs no clang.

FROM golang:1.26 AS build
WORKDIR /src
# Modules first: this layer is reused while only the code changes.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# Static binaries: the runtime image has no libc, and meshlane-cni runs on
# the host, whatever libc the node has.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.buildVersion=${VERSION}" \
    -o /out/ ./cmd/meshlane-agent ./cmd/meshlane-cni ./cmd/meshlanectl

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/meshlane-agent /out/meshlane-cni /out/meshlanectl /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/meshlane-agent"]
