#!/usr/bin/env bash
# The attested story in one run, on this machine: a broker, a node whose TPM
# is swtpm, a local registry, and the containers/image copy engine (what
# skopeo, podman and cri-o run) encrypting and decrypting through attested.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
A="$ROOT/bin/attested"
IMGCOPY="$ROOT/bin/imgcopy"
WORK="$(mktemp -d -t attested-demo.XXXXXX)"
BROKER_PORT=${BROKER_PORT:-18443}
REG_PORT=${REG_PORT:-15000}
TPM_PORT=${TPM_PORT:-12321}
METRICS_PORT=${METRICS_PORT:-19464}
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT

# Bold headings on a terminal only: a log or a pipe gets plain text.
if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
# show prints a command as the operator would type it; run shows and runs it.
show() { printf '$ %s\n' "$*"; }
run() { show "$@"; "$@"; }
# write shows a file being written, then writes stdin to it.
write() { show "cat > $1 <<EOF"; tee "$1" | sed 's/^/  /'; show "EOF"; }
wait_port() {
	for _ in $(seq 1 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "demo: nothing listening on 127.0.0.1:$1" >&2
	exit 1
}
for p in "$BROKER_PORT" "$REG_PORT" "$TPM_PORT" "$((TPM_PORT + 1))" "$METRICS_PORT"; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
		echo "demo: port $p is in use; set BROKER_PORT, REG_PORT, TPM_PORT (uses it and the next) or METRICS_PORT" >&2
		exit 1
	fi
done

say "A node with a TPM. Here the TPM is swtpm, with an EK certificate from its maker's CA, like a real one."
# swtpm's own CA plays the TPM manufacturer: swtpm_localca creates it in
# $WORK/ekca and signs the EK certificate swtpm_setup stores in the TPM.
run mkdir -p "$WORK/tpm" "$WORK/ekca/ca"
write "$WORK/ekca/swtpm-localca.conf" <<CONF
statedir = $WORK/ekca/ca
signingkey = $WORK/ekca/ca/signkey.pem
issuercert = $WORK/ekca/ca/issuercert.pem
certserial = $WORK/ekca/ca/certserial
CONF
printf '%s\n' --platform-manufacturer attested-demo --platform-version 2.1 --platform-model swtpm | write "$WORK/ekca/swtpm-localca.options"
write "$WORK/ekca/swtpm_setup.conf" <<CONF
create_certs_tool = $(command -v swtpm_localca)
create_certs_tool_config = $WORK/ekca/swtpm-localca.conf
create_certs_tool_options = $WORK/ekca/swtpm-localca.options
active_pcr_banks = sha256
CONF
show swtpm_setup --tpm2 --tpmstate "$WORK/tpm" --create-ek-cert --overwrite --config "$WORK/ekca/swtpm_setup.conf"
swtpm_setup --tpm2 --tpmstate "$WORK/tpm" --create-ek-cert --overwrite --config "$WORK/ekca/swtpm_setup.conf" >"$WORK/swtpm_setup.log" 2>&1 ||
	{ cat "$WORK/swtpm_setup.log" >&2; exit 1; }
EK_ROOTS="$WORK/ekca/ca/swtpm-localca-rootca-cert.pem,$WORK/ekca/ca/issuercert.pem"
show swtpm socket --tpm2 --tpmstate dir="$WORK/tpm" --flags not-need-init,startup-clear \
	--server type=tcp,port="$TPM_PORT",bindaddr=127.0.0.1 --ctrl type=tcp,port=$((TPM_PORT + 1)),bindaddr=127.0.0.1 "&"
swtpm socket --tpm2 --tpmstate dir="$WORK/tpm" --flags not-need-init,startup-clear \
	--server type=tcp,port="$TPM_PORT",bindaddr=127.0.0.1 --ctrl type=tcp,port=$((TPM_PORT + 1)),bindaddr=127.0.0.1 &
pids+=($!)
wait_port "$TPM_PORT"

say "The security admin creates the key broker: master key, TLS CA, admin credential."
run "$A" broker init --data-dir "$WORK/broker" --id demo-broker --listen "127.0.0.1:$BROKER_PORT"
echo "The broker admits only TPMs whose EK certificate chains to a trusted TPM maker (here swtpm's CA):"
show "$A" broker serve --data-dir "$WORK/broker" --ek-roots "$EK_ROOTS" --require-ek-certificate --metrics-listen "127.0.0.1:$METRICS_PORT" "2>$WORK/broker.log &"
"$A" broker serve --data-dir "$WORK/broker" --ek-roots "$EK_ROOTS" --require-ek-certificate --metrics-listen "127.0.0.1:$METRICS_PORT" 2>"$WORK/broker.log" &
pids+=($!)
wait_port "$BROKER_PORT"

write "$WORK/attested.yaml" <<YAML
broker: 127.0.0.1:$BROKER_PORT
brokerCA: $WORK/broker/ca.pem
adminTokenFile: $WORK/broker/admin.token
name: worker-1
tpm: swtpm://127.0.0.1:$TPM_PORT
stateDir: $WORK/node
runDir: $WORK/run
cacheDir: $WORK/cache
timeout: 20s
YAML
show export ATTESTED_CONFIG="$WORK/attested.yaml"
export ATTESTED_CONFIG="$WORK/attested.yaml"
echo "(node, pipeline and admin settings: $ATTESTED_CONFIG)"

say "The admin issues a single-use join token; the node enrolls its TPM (EK certificate checked, attestation key, credential activation)."
echo "(The token travels in a file no other user can read, never on a command line, where every local user sees it.)"
run "$A" node token create --ttl 10m --output "$WORK/join.token"
run "$A" node enroll --join-token-file "$WORK/join.token"
run "$A" node list

say "The admin writes a policy: the node must have booted exactly what it booted now (PCRs 0-7 and 16)."
TCTI="swtpm:host=127.0.0.1,port=$TPM_PORT"
show tpm2_pcrread -T "$TCTI" sha256:0,1,2,3,4,5,6,7,16 "| (made into a policy:)"
{
	echo "name: prod-eu"
	echo "pcrs:"
	tpm2_pcrread -T "$TCTI" sha256:0,1,2,3,4,5,6,7,16 |
		sed -nE 's/^ *([0-9]+) *: *0x([0-9A-Fa-f]+).*/  \1: ["\2"]/p' | tr 'A-F' 'a-f'
} | write "$WORK/prod-eu.yaml"
run "$A" policy apply -f "$WORK/prod-eu.yaml"
run "$A" key create payments-eu --policy prod-eu

say "A pipeline encrypts an image for key payments-eu and pushes it (it holds no secret, only the broker's public key)."
run mkdir -p "$WORK/registry"
write "$WORK/registry.yml" <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $WORK/registry}, redirect: {disable: true}}
http: {addr: 127.0.0.1:$REG_PORT}
YAML
show docker-registry serve "$WORK/registry.yml" "&"
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
pids+=($!)
wait_port "$REG_PORT"
write "$WORK/ocicrypt.json" <<JSON
{"key-providers": {"attested": {"cmd": {"path": "$A", "args": ["keyprovider", "--config", "$WORK/attested.yaml"]}}}}
JSON
show export OCICRYPT_KEYPROVIDER_CONFIG="$WORK/ocicrypt.json"
export OCICRYPT_KEYPROVIDER_CONFIG="$WORK/ocicrypt.json"
show "$IMGCOPY" mkimage --layers 3 --out "$WORK/app"
"$IMGCOPY" mkimage --layers 3 --out "$WORK/app" >"$WORK/app.json"
run "$IMGCOPY" copy --quiet --encryption-key provider:attested:key=payments-eu --dest-tls-verify=false \
	"oci:$WORK/app:latest" "docker://127.0.0.1:$REG_PORT/payments/app:1"
show "$IMGCOPY" inspect --tls-verify=false "docker://127.0.0.1:$REG_PORT/payments/app:1"
"$IMGCOPY" inspect --tls-verify=false "docker://127.0.0.1:$REG_PORT/payments/app:1" |
	python3 -c 'import json,sys; d=json.load(sys.stdin); [print("  layer", l["digest"][:19], l["mediaType"].rsplit(".",1)[-1], "keys:", [k.rsplit(".",1)[-1] for k in l.get("annotations",{}) if "keys" in k]) for l in d["layers"]]'

say "The trusted node pulls it: one TPM quote, the broker appraises it, and releases the layer keys."
run "$IMGCOPY" copy --quiet --decryption-key provider:attested --src-tls-verify=false \
	"docker://127.0.0.1:$REG_PORT/payments/app:1" "oci:$WORK/pulled:latest"
show "$IMGCOPY" inspect "oci:$WORK/pulled:latest"
"$IMGCOPY" inspect "oci:$WORK/pulled:latest" >"$WORK/pulled.json"
python3 -c 'import json,sys; a=json.load(open(sys.argv[1]))["diffIDs"]; b=json.load(open(sys.argv[2]))["diffIDs"]; print("  decrypted layers identical to the original:", a==b); sys.exit(a!=b)' "$WORK/app.json" "$WORK/pulled.json"

say "Something changes in the boot chain (we extend PCR 16 in the TPM), and the node pulls again."
run tpm2_pcrevent -T "$TCTI" 16 <<<"unexpected bootloader" >/dev/null
set +e
show "$IMGCOPY" copy --quiet --decryption-key provider:attested --src-tls-verify=false \
	"docker://127.0.0.1:$REG_PORT/payments/app:1" "oci:$WORK/pulled2:latest"
"$IMGCOPY" copy --quiet --decryption-key provider:attested --src-tls-verify=false \
	"docker://127.0.0.1:$REG_PORT/payments/app:1" "oci:$WORK/pulled2:latest" 2>"$WORK/refusal.txt"
rc=$?
set -e
if [[ $rc -eq 0 ]]; then
	echo "demo: the pull should have been refused" >&2
	exit 1
fi
echo "  refused, as it must be. What the client says:"
grep -o 'attested: .*' "$WORK/refusal.txt" | head -1 | sed 's/^/    /'

say "On the node, the operator asks why: the whole appraisal, clause by clause."
if ! run "$A" node attest --explain; then
	echo "  (exit status 1: the node would be refused a key, as the clauses above say)"
fi

say "The admin sees the node's status change, and the audit trail shows every release and refusal."
run "$A" node show worker-1
run "$A" audit list

say "What operators watch: the broker's metrics and its dashboard."
show curl -s "http://127.0.0.1:$METRICS_PORT/metrics" "| grep -E '^attested_broker_(releases_total|refusals_total\{class=\"policy\"\})'"
python3 - "http://127.0.0.1:$METRICS_PORT/metrics" <<'PY'
import re, sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
for line in body.splitlines():
    if re.match(r'attested_broker_(releases_total|refusals_total\{class="policy"\})', line):
        print("  " + line)
PY
echo "  dashboard: https://127.0.0.1:$BROKER_PORT/ (log in with the token in $WORK/broker/admin.token;"
echo "  your browser must trust $WORK/broker/ca.pem). It stays up while this demo waits for Enter."
if [[ -t 0 && -t 1 ]]; then
	read -r -p "  Press Enter to stop the demo. " _
fi
say "Done."
