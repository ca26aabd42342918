#!/usr/bin/env bash
# A pipeline step: encrypt every layer of an image for broker key KEY and
# push it. The runner holds no secret: pipeline.yaml names the broker and
# its CA, and attested fetches the key's public part.
# Needs skopeo >= 1.3 built upstream (Debian's is built without keyprovider
# support) and attested on PATH.
set -euo pipefail
: "${KEY:?set KEY, e.g. payments-eu}" "${SRC:?set SRC, e.g. oci:build/app:latest}" "${DST:?set DST, e.g. docker://registry/app:1}"
conf="$(mktemp)"
trap 'rm -f "$conf"' EXIT
cat >"$conf" <<JSON
{"key-providers":{"attested":{"cmd":{"path":"$(command -v attested)","args":["keyprovider","--config","${ATTESTED_CONFIG:-/etc/attested/pipeline.yaml}"]}}}}
JSON
OCICRYPT_KEYPROVIDER_CONFIG="$conf" skopeo copy --encryption-key "provider:attested:key=$KEY" "$SRC" "$DST"
