# meshlane: eBPF redirection for service-mesh sidecars.
GO      ?= go
BIN     ?= bin
PKGS    := ./...
# Privileged tests need root; `make test` runs everything, with the race
# detector off for the datapath packages' real-socket tests to keep CI fast.
TESTFLAGS ?= -count=1 -timeout 25m

.PHONY: all build generate check-generate test lint fuzz clean deps demo

all: build

## build: the binaries into ./bin
build:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/...

## generate: rebuild the eBPF objects and their Go bindings (needs clang, libbpf-dev)
generate:
	$(GO) generate ./bpf/...

## check-generate: fail if the committed eBPF objects differ from a fresh build
check-generate: generate
	@git diff --exit-code -- bpf/ || { echo "bpf/: generated files differ from a fresh 'make generate'; run it and commit"; exit 1; }

## deps: install what building and testing need (Debian)
deps:
	hack/deps.sh

## demo: a simulated node on this machine (root): pods wired by the real CNI chain, agent and datapath live; DEMOFLAGS="--pods 5 --profile linkerd --sockmap --wait"
DEMOFLAGS ?=
demo: deps
	$(GO) run ./hack/demo $(DEMOFLAGS)

## test: every test; the privileged ones need root (they create namespaces, cgroups, bpffs)
test: deps
	$(GO) test $(TESTFLAGS) $(PKGS)

## lint: gofmt and go vet
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

## fuzz: run every fuzz target for FUZZTIME each (default 10s)
FUZZTIME ?= 10s
fuzz:
	hack/fuzz.sh $(FUZZTIME)

clean:
	rm -rf $(BIN)

help:
	@grep -E '^## ' Makefile | sed 's/## //'

.PHONY: bench bench-quick

## bench: data path (iptables vs meshlane) and control path (CNI ADD/DEL, agent RSS), as root; about 20 minutes; results in results/bench-<time>/
BENCHFLAGS ?=
bench:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/meshlane-bench ./hack/bench
	$(BIN)/meshlane-bench $(BENCHFLAGS)

## bench-quick: a smoke run of the benchmark (under 3 minutes) that checks it works, not the numbers
bench-quick:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/meshlane-bench ./hack/bench
	$(BIN)/meshlane-bench --quick $(BENCHFLAGS)
