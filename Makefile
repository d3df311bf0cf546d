# tulle — see README.md. Everything that needs root (namespaces, TUN) is
# skipped with a reason when not run as root.

GO      ?= go
BIN     := bin
CMDS    := tulled tullectl tulle

.PHONY: all build demo test unit fuzz bench bench-kube clean

all: build

build:
	$(GO) build -o $(BIN)/ $(addprefix ./cmd/,$(CMDS))

## demo: three nodes in network namespaces, the local lease store, pings and a TCP transfer (root).
demo: build
	$(BIN)/tullectl demo --tulled $(BIN)/tulled

## test: vet, unit tests, the no-root datapath test, the decap fuzz corpus and the namespace e2e tests (root).
test:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) test -count=1 -timeout 20m ./...

unit:
	$(GO) test -count=1 -short ./...

## fuzz: run the decap fuzzer for FUZZTIME (default 60s).
FUZZTIME ?= 60s
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzDecap -fuzztime $(FUZZTIME) ./encap/udp/

## bench: raw veth, kernel VXLAN and every tulle path side by side (root, iperf3); reports in bench-out/.
BENCH_FLAGS ?=
bench: build
	$(BIN)/tullectl bench --tulled $(BIN)/tulled --out bench-out $(BENCH_FLAGS)

## bench-kube: a real tulled against KUBE_NODES (5000) realistic Nodes in a real kube-apiserver (root, etcd, kube-apiserver: see .ci/run).
KUBE_NODES ?= 5000
bench-kube: build
	TULLED=$(CURDIR)/$(BIN)/tulled KUBE_NODES=$(KUBE_NODES) $(GO) test -run '^$$' -bench KubePeers -benchtime 1x -timeout 30m -v ./bench/ | grep -v '^=== '

clean:
	rm -rf $(BIN)
