#!/usr/bin/env bash
# Installs what building and testing attested needs on Debian: swtpm (the
# node TPM in end-to-end tests), docker-registry (a local registry),
# tpm2-tools with its swtpm TCTI (the demo reads and extends PCRs like an
# operator would), libssl-dev (the go-tpm-tools simulator is cgo),
# chromium (the dashboard's end-to-end test drives it headless),
# postgresql (the PostgreSQL store's tests run its server binaries as a
# throwaway cluster; its own service is not used), and staticcheck.
# Upstream skopeo cannot be used from Debian (its ocicrypt predates
# keyprovider support); the tests build test/imgcopy, which runs the same
# containers/image copy engine, from the Go module proxy instead.
# containerd (2.x) and its ctd-decoder are not Debian's either: `make
# containerd` builds them from the Go module proxy into bin/ (see Makefile).
set -euo pipefail

packages=(swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 docker-registry libssl-dev gcc make python3 chromium postgresql)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	sudo=""
	[[ $(id -u) -eq 0 ]] || sudo="sudo"
	echo "deps: installing ${missing[*]}"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian registry package tries to start a service; we run our own
# instances on 127.0.0.1, so nothing else is needed from it.

gobin="$(go env GOPATH)/bin"
if ! [[ -x "$gobin/staticcheck" ]]; then
	echo "deps: installing staticcheck"
	GOFLAGS= go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi
echo "deps: ok"
