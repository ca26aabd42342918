# attested: make demo (tell the story), make test (everything CI runs).
GO        ?= go
BIN       := $(CURDIR)/bin
ATTESTED  := $(BIN)/attested
LABELER   := $(BIN)/attested-labeler
EXECKP    := $(BIN)/attested-keyprovider
IMGCOPY   := $(BIN)/imgcopy
# containerd for the end-to-end tests (keep in step with test/e2e/containerd_test.go).
CONTAINERD_VERSION ?= v2.4.2
CONTAINERD := $(BIN)/containerd-$(CONTAINERD_VERSION)
GOBIN     := $(shell $(GO) env GOPATH)/bin
E2E_FLAGS ?= -count=1 -timeout 25m -artifacts -outputdir $(BIN)/e2e

.PHONY: all build imgcopy containerd deps test unit e2e fuzz bench load load-ci lint demo proto clean image kube-apiserver kube-test

all: build

build: $(ATTESTED) $(LABELER) $(EXECKP)

# Go tracks the sources; always ask it, it rebuilds only what changed.
# The Dockerfile builds with the same command (a test checks it).
$(ATTESTED): FORCE
	$(GO) build -o $@ ./cmd/attested

# The Kubernetes labeler is a binary of its own: client-go stays out of
# attested, which runs once per image layer in exec mode.
$(LABELER): FORCE
	$(GO) build -o $@ ./cmd/attested-labeler

# Exec mode alone, for ocicrypt's per-layer processes: starts faster.
$(EXECKP): FORCE
	$(GO) build -o $@ ./cmd/attested-keyprovider

# The container image (Dockerfile): attested and attested-labeler on a
# distroless base, with the few busybox tools the Kubernetes examples' init
# steps run. Push it and pin its digest in examples/kubernetes.
IMAGE  ?= registry.example.internal/attested/attested:dev
ENGINE ?= docker
image:
	$(ENGINE) build -t $(IMAGE) .

# A real kube-apiserver and etcd for the labeler's API server test
# (broker/labeler: KUBE_APISERVER_BIN, ETCD_BIN); built from the Go module
# proxy in its own module, a few minutes the first time.
kube-apiserver:
	cd test/kubeapiserver && $(GO) build -o $(BIN)/kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver && $(GO) build -o $(BIN)/etcd ./etcd

# The image-copy driver is its own module so containers/image stays out of
# the product's dependencies.
imgcopy: $(IMGCOPY)
$(IMGCOPY): FORCE
	cd test/imgcopy && CGO_ENABLED=0 $(GO) build -tags containers_image_openpgp -o $@ .

# containerd from the Go module proxy, built once per version (its name
# carries it); ctd-decoder (its ocicrypt stream processor, from the imgcrypt
# library) and cripull (the kubelet's CRI image calls) from test/containerd,
# its own module like test/imgcopy.
containerd: $(CONTAINERD) FORCE
	cd test/containerd && $(GO) build -o $(BIN)/ ./ctd-decoder ./cripull
$(CONTAINERD):
	GOBIN=$@.tmp GOFLAGS= $(GO) install github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD_VERSION)
	mv $@.tmp/containerd $@ && rmdir $@.tmp

deps:
	./scripts/deps.sh

test: deps unit kube-test e2e load-ci

unit:
	$(GO) test -count=1 ./...

# The labeler against a real API server (RBAC, admission policy, watch).
kube-test: kube-apiserver
	KUBE_APISERVER_BIN=$(BIN)/kube-apiserver ETCD_BIN=$(BIN)/etcd $(GO) test -count=1 -run APIServer ./broker/labeler/

# Test artifacts (the dashboard's screenshots) are kept in bin/e2e.
e2e: deps build imgcopy containerd
	mkdir -p $(BIN)/e2e
	ATTESTED_BIN=$(ATTESTED) KEYPROVIDER_BIN=$(EXECKP) IMGCOPY_BIN=$(IMGCOPY) CONTAINERD_BIN=$(CONTAINERD) CTD_DECODER_BIN=$(BIN)/ctd-decoder \
		CRIPULL_BIN=$(BIN)/cripull KUBE_APISERVER_BIN=$(wildcard $(BIN)/kube-apiserver) \
		ETCD_BIN=$(wildcard $(BIN)/etcd) $(GO) test -tags e2e $(E2E_FLAGS) ./test/e2e/

# Short fuzzing runs of every parser; the seed corpora also run in 'unit'.
FUZZTIME ?= 10s
fuzz:
	$(GO) test ./keyprovider/annotation -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME)
	$(GO) test ./keyprovider -run '^$$' -fuzz FuzzHandle -fuzztime $(FUZZTIME)
	$(GO) test ./broker/policy -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME)
	$(GO) test ./broker/evidence -run '^$$' -fuzz FuzzReplayFirmware -fuzztime $(FUZZTIME)
	$(GO) test ./broker/evidence -run '^$$' -fuzz FuzzReplayIMA -fuzztime $(FUZZTIME)
	$(GO) test ./broker/evidence -run '^$$' -fuzz FuzzParseCmdline -fuzztime $(FUZZTIME)
	$(GO) test ./broker/evidence -run '^$$' -fuzz FuzzVerifyTagCertification -fuzztime $(FUZZTIME)
	$(GO) test ./broker/ear -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME)
	$(GO) test ./broker/ear -run '^$$' -fuzz FuzzVerify -fuzztime $(FUZZTIME)

bench: deps build imgcopy
	$(GO) test -run '^$$' -bench . -benchtime 300x ./keyprovider/
	$(GO) test -run '^$$' -bench . -benchtime 3000x ./broker/
	ATTESTED_BIN=$(ATTESTED) KEYPROVIDER_BIN=$(EXECKP) IMGCOPY_BIN=$(IMGCOPY) $(GO) test -tags e2e -count=1 -run '^$$' -bench . -benchtime 20x -timeout 20m ./test/e2e/

# Many simulated nodes (each its own swtpm, enrolled with a join token)
# attesting and unwrapping against 'attested broker serve' for a bounded
# time; prints latency percentiles, throughput, memory and processor use,
# and fails on any error or any key released to a node that fails policy.
# LOAD_FLAGS overrides the defaults (200 nodes, 60 s, one broker): see
# 'bin/attested-load --help'; e.g. LOAD_FLAGS="--replicas 2" runs two
# replicas on a throwaway PostgreSQL behind one address.
LOAD_FLAGS ?=
load: deps build
	$(GO) build -o $(BIN)/attested-load ./cmd/attested-load
	$(BIN)/attested-load --attested $(ATTESTED) --json $(BIN)/load.json $(LOAD_FLAGS)

# The short runs CI makes (make test), about two minutes: one broker on its
# embedded store, then two replicas on PostgreSQL behind one address.
load-ci:
	$(MAKE) load LOAD_FLAGS="--nodes 60 --duration 20s $(LOAD_FLAGS)"
	$(MAKE) load LOAD_FLAGS="--nodes 40 --duration 20s --replicas 2 $(LOAD_FLAGS)"

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt: files above need formatting"; exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/...
	$(GOBIN)/staticcheck ./...
	$(GOBIN)/staticcheck -tags e2e ./test/...
	cd test/imgcopy && $(GO) vet -tags containers_image_openpgp ./...
	cd test/containerd && $(GO) vet ./...

demo: deps build imgcopy
	./scripts/demo.sh

proto:
	cd broker/api/v1 && protoc --go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative broker.proto

clean:
	rm -rf $(BIN)

FORCE:
