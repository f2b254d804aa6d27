#!/usr/bin/env bash
# The main job, end to end, on this machine: make a test PKI, start the DPS
# simulator on a free loopback port, provision with dps-agent, show the result.
# The operational key lives in a TPM (swtpm, the demo's embedded default).
# Everything lives under target/demo/; the simulator and swtpm are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug}
DEMO=$(pwd)/target/demo
rm -rf "$DEMO"
mkdir -p "$DEMO"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

say "1. A test PKI: bootstrap root -> intermediate -> device gw-0001, the simulator's TLS identity, and an ADR-like issuing CA"
"$BIN/dps-sim" pki --out "$DEMO/pki"
ls "$DEMO/pki"

say "2. The DPS simulator (MQTT over TLS on a free port) and the IoT Hub it assigns devices to"
"$BIN/dps-sim" serve --pki "$DEMO/pki" --ready-file "$DEMO/sim.ready" --events "$DEMO/sim-events.jsonl" \
  --retry-after 1 --cert-validity 30d --hub-port 0 --twin-file "$DEMO/twins.json" >"$DEMO/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$DEMO/sim.ready" ] && break; sleep 0.1; done
[ -s "$DEMO/sim.ready" ] || { echo "the simulator did not start:"; cat "$DEMO/sim.log"; exit 1; }
port=$(sed -n 's/.*"mqtt_port": *\([0-9]*\).*/\1/p' "$DEMO/sim.ready")
hub_port=$(sed -n 's/.*"hub_port": *\([0-9]*\).*/\1/p' "$DEMO/sim.ready")
echo "dps-sim listening on localhost:$port (DPS) and localhost:$hub_port (IoT Hub)"

say "2b. A TPM 2.0 for the operational key: swtpm on free loopback ports (control port = port + 1), state in $DEMO/tpm"
mkdir -p "$DEMO/tpm"
tpm_port=
for _ in $(seq 20); do
  p=$(( RANDOM % 20000 + 30000 ))
  # Skip ports something already listens on.
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$((p + 1))") 2>/dev/null; then continue; fi
  swtpm socket --tpm2 --server "type=tcp,port=$p,bindaddr=127.0.0.1" --ctrl "type=tcp,port=$((p + 1)),bindaddr=127.0.0.1" \
    --tpmstate "dir=$DEMO/tpm" --flags not-need-init,startup-clear --log "file=$DEMO/swtpm.log" &
  spid=$!
  for _ in $(seq 50); do
    kill -0 "$spid" 2>/dev/null || break
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && kill -0 "$spid" 2>/dev/null; then tpm_port=$p; break; fi
    sleep 0.1
  done
  if [ -n "$tpm_port" ]; then pids+=("$spid"); break; fi
  kill "$spid" 2>/dev/null || true; wait "$spid" 2>/dev/null || true
done
[ -n "$tpm_port" ] || { echo "swtpm did not start:"; cat "$DEMO/swtpm.log"; exit 1; }
TCTI="swtpm:host=127.0.0.1,port=$tpm_port"
# libtss2 logs expected probe failures on stderr; keep the demo output readable.
export TSS2_LOG=all+NONE TPM2TOOLS_TCTI="$TCTI"
echo "swtpm listening on 127.0.0.1:$tpm_port; [tpm] tcti = \"$TCTI\""

say "3. The agent's config"
cat >"$DEMO/config.toml" <<EOF
[dps]
global_endpoint = "localhost:$port"
id_scope = "0ne00000000"
registration_id = "gw-0001"
trust_bundle = "$DEMO/pki/server-ca.pem"

[dps.attestation]
method = "x509"
identity_cert = "$DEMO/pki/device-gw-0001-full-chain.pem"
identity_key = "file:$DEMO/pki/device-gw-0001.key"

[operational]
key_backend = "tpm"
key_algorithm = "ecdsa-p384"

[tpm]
tcti = "$TCTI"

[hub]
port = $hub_port

[state]
dir = "$DEMO/state"

[dbus]
bus = "unix:path=$DEMO/bus/socket"
EOF
cat "$DEMO/config.toml"
"$BIN/dps-agent" --config "$DEMO/config.toml" check-config

say "4. Provision: fresh P-384 key in the TPM, CSR, DPS registration over MQTT, chain checks, IoT Hub check and twin report, atomic commit"
"$BIN/dps-agent" --config "$DEMO/config.toml" run --once
echo "the operational key (a TPM-wrapped blob; the private key never left the TPM):"
ls -l "$DEMO"/state/keys/*.tss2.pem | sed 's/^/  /'
echo "transient objects left in the TPM: [$(tpm2_getcap handles-transient | tr -d '\n')]"

say "5. Status"
"$BIN/dps-agent" --config "$DEMO/config.toml" status

say "6. The issued chain"
csplit -s -z -f "$DEMO/cert-" "$DEMO/state/operational-chain.pem" '/-----BEGIN CERTIFICATE-----/' '{*}'
for c in "$DEMO"/cert-*; do
  openssl x509 -in "$c" -noout -subject -issuer -startdate -enddate | sed 's/^/  /'
  echo
done
openssl verify -CAfile "$DEMO/pki/issuing-root.pem" -untrusted "$DEMO/cert-01" "$DEMO/cert-00"

say "7. A second run uses the stored identity without contacting DPS"
"$BIN/dps-agent" --config "$DEMO/config.toml" run --once

say "8. The device twin's reported properties on the hub"
python3 -m json.tool "$DEMO/twins.json"

say "9. The identity as a local app sees it: the daemon on a private D-Bus, read with busctl"
mkdir -p "$DEMO/bus"
cat >"$DEMO/bus/bus.conf" <<CONF
<busconfig>
  <type>system</type>
  <listen>unix:path=$DEMO/bus/socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/> <allow own="*"/>
    <allow send_type="method_call"/> <allow send_type="signal"/>
    <allow send_type="method_return"/> <allow send_type="error"/>
    <allow receive_type="method_call"/> <allow receive_type="signal"/>
    <allow receive_type="method_return"/> <allow receive_type="error"/>
  </policy>
</busconfig>
CONF
dbus-daemon --config-file="$DEMO/bus/bus.conf" --nofork --nopidfile >"$DEMO/bus/log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -S "$DEMO/bus/socket" ] && break; sleep 0.1; done
"$BIN/dps-agent" --config "$DEMO/config.toml" run >"$DEMO/daemon.log" 2>&1 &
pids+=($!)
BUS="--address=unix:path=$DEMO/bus/socket"
for _ in $(seq 100); do busctl "$BUS" status org.dpsagent.Agent >/dev/null 2>&1 && break; sleep 0.1; done
busctl "$BUS" introspect org.dpsagent.Agent /org/dpsagent/Agent org.dpsagent.Agent1
for p in State DeviceId AssignedHub KeyUri NotAfter RenewAt; do
  printf '  %-12s %s\n' "$p" "$(busctl "$BUS" get-property org.dpsagent.Agent /org/dpsagent/Agent org.dpsagent.Agent1 "$p")"
done
echo "  dps-agent status, asked over D-Bus:"
"$BIN/dps-agent" --config "$DEMO/config.toml" status | sed 's/^/    /'
echo
echo "demo done; files in $DEMO"
