# tulle — see README.md. `make demo` and `make test` set themselves up on a
# fresh Debian 12 machine (tools/setup: apt packages, the kube-apiserver
# build for the Kubernetes store's tests); as root they need nothing else.

SHELL   := /bin/bash
GO      ?= go
BIN     := bin
CMDS    := tulled tullectl tulle
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/tulle-net/tulle/internal/version.Version=$(VERSION)
IMAGE   ?= tulle:$(VERSION)

.PHONY: all build demo demo-kube test unit fuzz bench bench-kube bench-policy image conformance clean

all: build

## build: the three binaries, static, stamped with the version (git describe).
build:
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

## demo: three nodes in network namespaces, the local lease store, pings and a TCP transfer (root).
demo:
	@tools/setup demo
	@$(MAKE) --no-print-directory build
	$(BIN)/tullectl demo --tulled $(BIN)/tulled

## demo-kube: a real Kubernetes cluster on this machine (control plane + 3 kubelet/containerd nodes in namespaces), tulle installed with kubectl apply -k deploy/, test pods and a connectivity matrix (root).
demo-kube:
	@tools/setup demo-kube
	@$(MAKE) --no-print-directory build
	$(BIN)/tullectl demo --kube --root $(CURDIR)

## test: vet, gofmt, every test (unit, fuzz corpora, namespace e2e, CNI via libcni, the Kubernetes store on a real API server, a bench smoke run), one summary line.
test:
	@tools/setup test
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	@# The real cluster (internal/tstest/kubecluster) runs after the rest, alone: it
	@# keeps both cores busy, and the timing-bound e2e tests beside it suffered.
	@# The upstream [sig-network] [Conformance] suite (internal/tstest/conformance,
	@# udp backend) runs last, after the real-cluster tests, one at a time.
	@set -o pipefail; { $(GO) test -json -count=1 -timeout 25m $$($(GO) list ./... | grep -v -e /internal/tstest/kubecluster -e /internal/tstest/conformance); \
		$(GO) test -json -count=1 -p 1 -timeout 60m ./internal/tstest/kubecluster/... ./internal/tstest/conformance/...; } | $(GO) run ./tools/testsum

## conformance: the Kubernetes project's own networking tests ([sig-network] [Conformance], then [sig-network] Netpol) against a real cluster (control plane + 2 nodes, all running tulle, cluster DNS) with BACKEND (udp, wireguard, host-gw, vxlan); JUnit and logs in conformance-out/<backend>/<suite>/, one line per suite; fails when a suite in REQUIRE fails (root).
BACKEND ?= udp
SUITES  ?= conformance,netpol
REQUIRE ?= conformance,netpol
conformance:
	@tools/setup conformance
	$(GO) run ./tools/conformance --backend $(BACKEND) --suites $(SUITES) --require $(REQUIRE) --out conformance-out

unit:
	$(GO) test -count=1 -short ./...

## fuzz: run the fuzzers for FUZZTIME each (default 60s).
FUZZTIME ?= 60s
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecap -fuzztime $(FUZZTIME) ./encap/udp/
	$(GO) test -run '^$$' -fuzz FuzzReceive -fuzztime $(FUZZTIME) ./encap/wireguard/

## bench: raw veth, kernel VXLAN, every tulle path and the stock wireguard-go side by side (root, iperf3); reports in bench-out/.
BENCH_FLAGS ?=
bench: build
	$(BIN)/tullectl bench --tulled $(BIN)/tulled --out bench-out $(BENCH_FLAGS)

## bench-kube: a real tulled against KUBE_NODES (5000) realistic Nodes in a real kube-apiserver (root, etcd, kube-apiserver: see tools/setup).
KUBE_NODES ?= 5000
bench-kube: build
	TULLED=$(CURDIR)/$(BIN)/tulled KUBE_NODES=$(KUBE_NODES) $(GO) test -run '^$$' -bench KubePeers -benchtime 1x -timeout 30m -v ./bench/ | grep -v '^=== '

## bench-policy: NetworkPolicy's cost on the forward path (50 policies vs none, interleaved) and a real tulled's change-to-enforcement time and memory with POLICY_PODS (1000) pods and POLICY_COUNT (200) policies (root, iperf3, nft, kube-apiserver).
bench-policy: build
	TULLED=$(CURDIR)/$(BIN)/tulled $(GO) test -run '^$$' -bench 'Policy(Path|SameNode|Change)' -benchtime 1x -timeout 20m -v ./bench/ | grep -v '^=== '

## image: the OCI image (Containerfile) with buildah or podman, whichever is installed.
## BIN=bin/<dir> (inside the tree) keeps a build apart from others running at once.
image: build
	@b=$$(command -v buildah || command -v podman) || { echo "make image: needs buildah or podman (apt-get install buildah)"; exit 1; }; \
	$(GO) run ./tools/imagelayer -o $(BIN)/nft-layer.tar && \
	$$b build --layers=false -f Containerfile -t $(IMAGE) --build-arg VERSION=$(VERSION) --build-arg BIN=$(BIN) .

clean:
	rm -rf $(BIN)
