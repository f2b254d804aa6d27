#!/usr/bin/env bash
# Booted-system test of the .deb (issue 16): `make system-test`.
#
# A Debian 12 root file system (debootstrap, cached in target/system-test/base,
# made once per machine; each run boots a fresh overlay on it) is booted with
# systemd-nspawn --boot --private-network: real systemd as PID 1, the real
# system bus, journald, nothing leaves the machine. The .deb is installed with
# `apt-get install ./dps-agent_…deb` (apt uses the host's network namespace to
# reach the Debian mirror; every service runs in the guest's private network),
# dps-sim runs inside the guest on loopback as a unit of its own, and the steps
# below check what a gateway owner would check. Each check prints `ok - …` or
# `FAIL - …` with the evidence; the summary lists the failures; the exit status
# is non-zero when any check failed. The container is always stopped (trap).
#
# Usage: tests/system/run.sh [all|base|shell]   (as root)
#   all    (default) every step
#   base   only make the cached base root file system
#   shell  boot a fresh guest with the package installed and open a shell in it
# Environment:
#   DPS_AGENT_DEB   the .deb (default: newest target/debian/dps-agent_*_amd64.deb)
#   DPS_SIM_BIN     the simulator (default: newest of target/{release,debug}/dps-sim)
#   SYSTEM_TEST_DIR cache and run directory (default: target/system-test)
#   KEEP=1          leave the last run's overlay (target/system-test/run/upper) for a post-mortem
#   STEPS="1 2 3"   run only these steps (later steps need the earlier ones' state)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=tests/system/lib.sh
. "$ROOT/tests/system/lib.sh"

REG_ID=gw-0001
DPS_PORT=8883 HUB_PORT=8884 HTTPS_PORT=8443 # fixed: the guest has a network namespace of its own
SIM_DIR=/var/lib/dps-sim
SIM_CA=/usr/local/share/dps-sim/server-ca.pem
BUS_ARGS=(org.dpsagent.Agent /org/dpsagent/Agent org.dpsagent.Agent1)
DROPIN_DIR=/etc/systemd/system/dps-agent.service.d
# Fast restarts only (RestartSec); the unit's StartLimitBurst/IntervalSec stay as shipped.
TEST_DROPIN=$DROPIN_DIR/50-system-test-restart.conf
WATCHDOG_DROPIN=$DROPIN_DIR/60-system-test-watchdog.conf

# --- Reporting ---------------------------------------------------------------

CHECKS=0
FAILED=()
T_START=$(now)
declare -A STEP_TIME=()

ok() { CHECKS=$((CHECKS + 1)); printf 'ok - %s\n' "$1"; }
# fail DESCRIPTION EVIDENCE...
fail() {
  CHECKS=$((CHECKS + 1)); FAILED+=("$1")
  printf 'FAIL - %s\n' "$1"
  shift
  local e
  for e in "$@"; do printf '%s\n' "$e" | sed 's/^/    # /' | head -40; done
}
# check DESCRIPTION EVIDENCE COMMAND...: ok when COMMAND succeeds.
check() {
  local d=$1 ev=$2; shift 2
  if "$@"; then ok "$d"; else fail "$d" "$ev"; fi
}
step() { printf '\n# === %s\n' "$*"; }

# --- Guest helpers -----------------------------------------------------------

# gt SECS CMD...: a guest command with a time limit (a hung command fails, never blocks the run).
gt() { local s=$1; shift; g timeout --kill-after=5 "$s" "$@"; }
# poll SECS INTERVAL COMMAND...: until COMMAND succeeds; false after SECS.
poll() {
  local secs=$1 iv=$2; shift 2
  local end; end=$(awk -v n="$(now)" -v s="$secs" 'BEGIN{printf "%.3f", n+s}')
  while :; do
    "$@" && return 0
    awk -v n="$(now)" -v e="$end" 'BEGIN{exit !(n>e)}' && return 1
    sleep "$iv"
  done
}
unit_show() { gt 10 systemctl show -p "$2" --value "$1" 2>/dev/null; }
main_pid() { unit_show dps-agent.service MainPID; }
active_state() { unit_show "$1" ActiveState; }
status_json() { gt 20 dps-agent status --json 2>/dev/null; }
status_field() { status_json | jq -r "$1" 2>/dev/null; }
prop() { gt 10 busctl get-property "${BUS_ARGS[@]}" "$1" 2>/dev/null; }
prop_value() { prop "$1" | sed -E 's/^[a-z] //; s/^"(.*)"$/\1/'; }
daemon_state_is() { [ "$(status_json | jq -r '.source + " " + .state' 2>/dev/null)" = "daemon $1" ]; }
journal_json() { gt 20 journalctl --no-pager -o json "$@" 2>/dev/null; }

# DPS registrations the simulator saw, over all of its runs (each start of
# dps-sim.service writes a new events file).
registrations() {
  cat "$GUEST$SIM_DIR"/events-*.jsonl 2>/dev/null \
    | jq -s '[.[] | select(.service == "dps" and .event == "request" and .kind == "register")] | length'
}
registrations_are() { [ "$(registrations)" = "$1" ]; }
renewals_above() { local r; r=$(prop_value Renewals); [ -n "$r" ] && [ "$r" -gt "$1" ]; }
sim_ready() { g test -s /run/dps-sim/ready.json && [ "$(active_state dps-sim.service)" = active ]; }
as_user() { local u=$1; shift; g setpriv --reuid="$u" --regid="$u" --init-groups -- "$@"; }
identity_line() { status_json | jq -r '[.state, .device_id, .assigned_hub, .thumbprint] | join(" ")' 2>/dev/null; }

# --- Set-up ----------------------------------------------------------------

newest() { local f best=; for f in "$@"; do [ -e "$f" ] && { [ -z "$best" ] || [ "$f" -nt "$best" ]; } && best=$f; done; echo "$best"; }

pick_inputs() {
  DEB=${DPS_AGENT_DEB:-$(newest "$ROOT"/target/debian/dps-agent_*_amd64.deb)}
  [ -n "$DEB" ] && [ -f "$DEB" ] || die "no .deb: run \`make deb\` first (or set DPS_AGENT_DEB)"
  SIM_BIN=${DPS_SIM_BIN:-$(newest "$ROOT"/target/release/dps-sim "$ROOT"/target/debug/dps-sim)}
  [ -n "$SIM_BIN" ] && [ -x "$SIM_BIN" ] || die "no dps-sim: run \`cargo build --workspace --bins\` first (or set DPS_SIM_BIN)"
  DEB_VERSION=$(dpkg-deb -f "$DEB" Version)
  note "package $DEB (version $DEB_VERSION); simulator $SIM_BIN"
}

stop_stale_run() {
  # A previous run killed before its trap: stop only the nspawn it recorded.
  local p
  p=$(cat "$RUN/nspawn.pid" 2>/dev/null || true)
  if [ -n "$p" ] && tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q "systemd-nspawn.*--machine=$MACHINE"; then
    note "stopping the container of an earlier run (pid $p)"
    NSPAWN_PID=$p; kill "$p" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    NSPAWN_PID=
  fi
  cleanup_nspawn_leftovers
}

save_logs() {
  local out=$ST/logs
  rm -rf "$out"; mkdir -p "$out"
  if [ -n "$LEADER" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    gt 30 journalctl --no-pager -o short-monotonic >"$out/journal.txt" 2>&1 || true
    gt 30 journalctl --no-pager -o json -u dps-agent >"$out/dps-agent-journal.json" 2>&1 || true
  fi
  cp "$GUEST$SIM_DIR"/events-*.jsonl "$out/" 2>/dev/null || true
  cp "$RUN/nspawn.log" "$out/" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$NSPAWN_PID" ]; then save_logs; fi
  shutdown_guest
  if [ "${KEEP:-0}" = 1 ]; then
    mountpoint -q "$GUEST" && umount "$GUEST"
    note "kept the overlay in $RUN/upper"
  else
    overlay_down
  fi
  rm -f "$RUN/nspawn.pid"
  exit $rc
}

start_guest() {
  overlay_up
  boot
  echo "$NSPAWN_PID" >"$RUN/nspawn.pid"
}

# The simulator inside the guest: its PKI (made on the host with dps-sim pki),
# its binary and a unit. Every start writes a new events file.
install_sim() {
  rm -rf "$RUN/pki"
  "$SIM_BIN" pki --out "$RUN/pki" >/dev/null
  install -D -m 0755 "$SIM_BIN" "$GUEST/usr/local/bin/dps-sim"
  mkdir -p "$GUEST$SIM_DIR"
  cp -r "$RUN/pki" "$GUEST$SIM_DIR/pki"
  install -D -m 0644 "$RUN/pki/server-ca.pem" "$GUEST$SIM_CA"
  cat >"$GUEST/etc/systemd/system/dps-sim.service" <<EOF
[Unit]
Description=dps-sim: DPS and IoT Hub simulator (system test only)
Before=dps-agent.service
[Service]
RuntimeDirectory=dps-sim
ExecStart=/bin/sh -c 'exec /usr/local/bin/dps-sim serve --pki $SIM_DIR/pki --ready-file /run/dps-sim/ready.json \\
  --events $SIM_DIR/events-\$\$(date +%%s%%N).jsonl --listen 127.0.0.1 --mqtt-port $DPS_PORT \\
  --https-port $HTTPS_PORT --hub-port $HUB_PORT --twin-file $SIM_DIR/twins.json --retry-after 1 --cert-validity 30d'
[Install]
WantedBy=multi-user.target
EOF
  g systemctl daemon-reload
  gt 30 systemctl enable --now dps-sim.service >/dev/null 2>&1 || true
  poll 20 0.1 sim_ready || die "dps-sim did not start in the guest: $(gt 10 journalctl -u dps-sim --no-pager | tail -20)"
  note "dps-sim listening in the guest on 127.0.0.1:$DPS_PORT (DPS) and :$HUB_PORT (IoT Hub)"
}

apt_install() { # apt_install ARGS...: apt-get install in the guest, the mirror through the host's network
  local log=$RUN/apt.log
  if ! g_hostnet timeout 300 apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1; then
    # Stale lists in the cached base (the mirror moved on): refresh once.
    g_hostnet timeout 120 apt-get update -q >>"$log" 2>&1 || true
    g_hostnet timeout 300 apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1 || return 1
  fi
}

# --- The steps ---------------------------------------------------------------

step1_install() {
  step "1. install: apt-get install ./$(basename "$DEB")"
  cp "$DEB" "$GUEST/root/"
  local t0; t0=$(now)
  if apt_install "/root/$(basename "$DEB")"; then
    ok "1 apt-get install ./$(basename "$DEB") (dependencies from the Debian mirror, $(elapsed "$t0") s)"
  else
    fail "1 apt-get install ./$(basename "$DEB")" "$(tail -20 "$RUN/apt.log")"
    return 1
  fi
  local v; v=$(g dpkg-query -W -f='${Status} ${Version}' dps-agent 2>&1 || true)
  check "1 dpkg: dps-agent $DEB_VERSION installed" "$v" test "$v" = "install ok installed $DEB_VERSION"
  local en ac
  en=$(gt 10 systemctl is-enabled dps-agent 2>&1 || true); ac=$(gt 10 systemctl is-active dps-agent 2>&1 || true)
  check "1 the unit is disabled and inactive after install" "is-enabled: $en; is-active: $ac" \
    test "$en/$ac" = "disabled/inactive"
  local pw groups
  pw=$(g getent passwd dps-agent || true); groups=$(g id -nG dps-agent 2>&1 || true)
  check "1 user dps-agent (shell nologin) in groups dps-agent and tss" "passwd: $pw; groups: $groups" \
    bash -c '[[ "$0" == *:/usr/sbin/nologin ]] && [[ " $1 " == *" tss "* ]] && [[ " $1 " == *" dps-agent "* ]]' "$pw" "$groups"
  local adm; adm=$(g getent group dps-agent-admin || true)
  check "1 group dps-agent-admin exists" "getent: '$adm'" test -n "$adm"
  local st bs cd
  st=$(g stat -c '%a %U:%G' /var/lib/dps-agent 2>&1 || true)
  bs=$(g stat -c '%a %U:%G' /etc/dps-agent/bootstrap 2>&1 || true)
  cd=$(g stat -c '%a %U:%G' /etc/dps-agent/config.d 2>&1 || true)
  check "1 /var/lib/dps-agent is 755 dps-agent:dps-agent" "$st" test "$st" = "755 dps-agent:dps-agent"
  check "1 /etc/dps-agent/bootstrap is 750 root:dps-agent" "$bs" test "$bs" = "750 root:dps-agent"
  check "1 /etc/dps-agent/config.d is a directory (755 root:root)" "$cd" test "$cd" = "755 root:root"
  local missing=() f
  for f in /usr/bin/dps-agent /etc/dps-agent/config.toml /usr/share/doc/dps-agent/config.toml \
           /usr/lib/systemd/system/dps-agent.service /usr/lib/sysusers.d/dps-agent.conf \
           /usr/lib/tmpfiles.d/dps-agent.conf /usr/lib/systemd/catalog/dps-agent.catalog \
           /usr/share/dbus-1/system.d/org.dpsagent.Agent.conf /usr/share/dbus-1/interfaces/org.dpsagent.Agent1.xml \
           /usr/share/man/man8/dps-agent.8.gz; do
    [ -e "$GUEST$f" ] || missing+=("$f")
  done
  check "1 the package's files are installed" "missing: ${missing[*]}" test ${#missing[@]} -eq 0
}

step2_shipped_config() {
  step "2. the shipped config: the start fails, the journal says why, the start limit ends the loop"
  # Test-only: restart after 1 s instead of 30 s; StartLimit* stay as shipped.
  mkdir -p "$GUEST$DROPIN_DIR"
  printf '[Service]\nRestartSec=1s\n' >"$GUEST$TEST_DROPIN"
  g systemctl daemon-reload
  local limits; limits=$(gt 10 systemctl show -p StartLimitBurst,StartLimitIntervalUSec,Restart,RestartUSec dps-agent | tr '\n' ' ')
  check "2 the unit's start limit is as shipped (5 in 10 min), RestartSec=1s from the test drop-in" "$limits" \
    bash -c '[[ "$0" == *StartLimitBurst=5* && "$0" == *StartLimitIntervalUSec=10min* && "$0" == *RestartUSec=1s* ]]' "$limits"
  local t0 out rc=0; t0=$(now)
  out=$(gt 60 systemctl start dps-agent 2>&1) || rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then
    ok "2 systemctl start dps-agent fails with the shipped config (rc $rc, $(elapsed "$t0") s)"
  else
    fail "2 systemctl start dps-agent fails with the shipped config" "rc $rc: $out" \
      "$(gt 10 systemctl status --no-pager -n 5 dps-agent 2>&1)"
  fi
  # Bounded: 5 starts at RestartSec=1s take seconds; 90 s is the limit. systemd 252
  # keeps Result=exit-code when the limit stops an automatic restart, so the
  # evidence is its "Start request repeated too quickly" (or start-limit-hit).
  show() { gt 10 systemctl show -p NRestarts,ActiveState,SubState,Result dps-agent | tr '\n' ' '; }
  limit_hit() { gt 10 journalctl -u dps-agent --no-pager -o cat | grep -q "Start request repeated too quickly"; }
  ended() {
    local s; s=$(show)
    [[ "$s" == *ActiveState=failed* ]] && { [[ "$s" == *Result=start-limit-hit* ]] || limit_hit; }
  }
  if poll 90 0.5 ended; then
    local a b runs
    a=$(show)
    # And it stays there: no further attempt over three RestartSec periods.
    sleep 3
    b=$(show)
    runs=$(journal_json -u dps-agent | jq -r 'select(.SYSLOG_IDENTIFIER == "dps-agent") | ._PID' | sort -u | wc -l)
    check "2 the start limit ends the loop after $runs runs (StartLimitBurst=5): the unit stays failed ($(elapsed "$t0") s)" \
      "then: $a; 3 s later: $b; runs of the agent: $runs" bash -c '[ "$0" = "$1" ] && [ "$2" = 5 ]' "$a" "$b" "$runs"
  else
    fail "2 the start limit ends the loop within 90 s (unit failed, \"Start request repeated too quickly\")" "after 90 s: $(show)" \
      "$(gt 10 journalctl -u dps-agent --no-pager -n 12 -o short-monotonic 2>&1)"
  fi
  # The cause, from the agent itself, at priority err or worse.
  local errs
  errs=$(journal_json -u dps-agent -p err | jq -r 'select(.SYSLOG_IDENTIFIER == "dps-agent") | "<\(.PRIORITY)> \(.MESSAGE)"' | sort -u)
  if [ -n "$errs" ]; then
    ok "2 journalctl -p err -u dps-agent has the agent's own line: $(head -1 <<<"$errs" | cut -c1-160)"
  else
    fail "2 journalctl -p err -u dps-agent has the agent's own line (not only systemd's)" \
      "journalctl -p err -u dps-agent:" "$(gt 10 journalctl -u dps-agent -p err --no-pager -o cat 2>&1 | sort -u | head -8)" \
      "the agent's lines at any priority:" \
      "$(journal_json -u dps-agent | jq -r 'select(.SYSLOG_IDENTIFIER == "dps-agent") | "<\(.PRIORITY)> \(.MESSAGE)"' | sort -u | head -5)"
  fi
}

install_bootstrap() {
  # The owner's bootstrap credential (README: the key 0600 owned by dps-agent).
  install -m 0644 "$RUN/pki/device-$REG_ID-full-chain.pem" "$GUEST/etc/dps-agent/bootstrap/device-full-chain.pem"
  install -m 0600 "$RUN/pki/device-$REG_ID.key" "$GUEST/etc/dps-agent/bootstrap/device.key"
  g chown dps-agent /etc/dps-agent/bootstrap/device.key
}

# Edits of the conffile itself (so the upgrade step can show they survive).
edit_config() { sed -i "$@" "$GUEST/etc/dps-agent/config.toml"; }

restart_or_recover() { # restart_or_recover WHAT: systemctl restart, a check; on failure reset-failed + start
  local out rc=0
  out=$(gt 60 systemctl restart dps-agent 2>&1) || rc=$?
  check "3 systemctl restart dps-agent $1" "rc $rc: $out
$(gt 10 journalctl -u dps-agent --no-pager -n 3 -o cat 2>&1)" test $rc -eq 0
  if [ $rc -ne 0 ]; then
    note "carrying on: systemctl reset-failed dps-agent; systemctl start dps-agent"
    gt 10 systemctl reset-failed dps-agent || true
    gt 60 systemctl start dps-agent || true
  fi
}

step3_fixed_config() {
  step "3. the config fixed in two edits: first the credential and key backend (DPS still unreachable), then the endpoint"
  install_bootstrap
  local k; k=$(g stat -c '%a %U' /etc/dps-agent/bootstrap/device.key)
  check "3 bootstrap key /etc/dps-agent/bootstrap/device.key is 600 dps-agent" "$k" test "$k" = "600 dps-agent"
  # First edit: the credential is there and keys are files (no TPM in the guest), but
  # the endpoint is still the shipped global one (no network in the guest: name
  # resolution fails, the attempt retries inside its attempt_timeout of 5 min).
  edit_config -e 's|^key_backend = .*|key_backend = "file"|'
  restart_or_recover "after a fix, with the start limit of step 2 tripped (README: \"or systemctl restart\")"
  local t1; t1=$(now)
  sj() { status_json | jq -c '{source,state,failures,next_attempt,last_error}' 2>&1 | cut -c1-260; }
  error_shown() { jq -e '.source == "daemon" and (.last_error // "") != ""' <<<"$(status_json)" >/dev/null; }
  if poll 10 0.5 error_shown; then
    ok "3 DPS unreachable: status/D-Bus show the error while the attempt retries ($(elapsed "$t1") s): $(sj)"
  else
    fail "3 DPS unreachable: status/D-Bus show the error while the attempt retries (within 10 s of the start)" \
      "status --json: $(sj); D-Bus Failures $(prop_value Failures) LastError '$(prop_value LastError)'" \
      "$(gt 10 journalctl -u dps-agent --no-pager -n 3 -o cat 2>&1)"
  fi
  # Test-only: attempts end after 10 s, so failed attempts and their backoff are
  # recorded; wait until the next attempt is at least 10 s away.
  edit_config -e 's|^attempt_timeout = .*|attempt_timeout = "10s"|'
  gt 60 systemctl restart dps-agent || true
  t1=$(now)
  backing_off() {
    local j; j=$(status_json)
    jq -e --argjson now "$(date +%s)" '.source == "daemon" and .failures >= 1 and (.last_error // "") != ""
      and (.next_attempt // 0) >= $now + 10' <<<"$j" >/dev/null
  }
  if poll 60 0.5 backing_off; then
    ok "3 failed attempts back off: the next attempt is $(( $(status_field .next_attempt) - $(date +%s) )) s away after $(elapsed "$t1") s: $(sj)"
  else
    fail "3 failed attempts back off: failures >= 1, last error, next attempt >= 10 s away within 60 s" \
      "is-active $(active_state dps-agent.service); $(sj); now $(date +%s)" "$(gt 10 journalctl -u dps-agent --no-pager -n 4 -o cat 2>&1)"
  fi
  # Second edit: the endpoint is the simulator in the guest, with its trust bundle.
  edit_config -e "s|^global_endpoint = .*|global_endpoint = \"localhost:$DPS_PORT\"|" \
    -e "s|^trust_bundle = .*|trust_bundle = \"$SIM_CA\"|" \
    -e "s|^port = 8883$|port = $HUB_PORT|" -e 's|^attempt_timeout = .*|attempt_timeout = "60s"|'
  note "before the restart: $(sj); now $(date +%s)"
  local cc; cc=$(gt 30 dps-agent check-config 2>&1 || true)
  note "dps-agent check-config: $(tr '\n' ';' <<<"$cc" | cut -c1-300)"
  local t0; t0=$(now)
  restart_or_recover "after the endpoint fix"
  if poll 10 0.25 daemon_state_is provisioned; then
    ok "3 provisioned at once, not after the old backoff: dps-agent status --json says \"provisioned\" $(elapsed "$t0") s after the restart"
  else
    fail "3 provisioned at once (within 10 s of the restart after the fix), not after the backoff of the failures before" \
      "status --json: $(status_json | jq -c '{state,source,failures,last_error,next_attempt}' 2>&1); now $(date +%s)" \
      "$(gt 10 journalctl -u dps-agent --no-pager -n 8 -o cat 2>&1)"
    # Carry on: a backoff kept from before the fix may only delay it.
    poll 150 0.5 daemon_state_is provisioned && note "provisioned $(elapsed "$t0") s after the restart" \
      || { note "not provisioned after 150 s: the later steps need an identity"; return 1; }
  fi
  gt 10 systemctl enable dps-agent >/dev/null 2>&1 || true
  local st; st=$(gt 10 systemctl status --no-pager dps-agent 2>&1 || true)
  check "3 systemctl status shows the STATUS= line \"provisioned: device $REG_ID on …\"" "$st" \
    grep -q "Status: \"provisioned: device $REG_ID on " <<<"$st"
  local ev fields missing=()
  ev=$(journal_json -u dps-agent DPS_AGENT_EVENT=provisioned | tail -1)
  if [ -z "$ev" ]; then
    fail "3 journalctl -u dps-agent DPS_AGENT_EVENT=provisioned -o json has an entry" "none"
    return 0
  fi
  for f in MESSAGE_ID PRIORITY DPS_REGISTRATION_ID DPS_DEVICE_ID DPS_ASSIGNED_HUB CERT_NOT_AFTER CERT_THUMBPRINT \
           NEXT_RENEWAL SYSLOG_IDENTIFIER CODE_FILE CODE_LINE; do
    [ -n "$(jq -r --arg f "$f" '.[$f] // empty' <<<"$ev")" ] || missing+=("$f")
  done
  fields=$(jq -c '{MESSAGE_ID,PRIORITY,DPS_AGENT_EVENT,DPS_REGISTRATION_ID,DPS_DEVICE_ID,DPS_ASSIGNED_HUB,CERT_NOT_AFTER,CERT_THUMBPRINT,NEXT_RENEWAL,SYSLOG_IDENTIFIER}' <<<"$ev")
  check "3 the provisioned event has the README's fields" "missing: ${missing[*]}; $fields" test ${#missing[@]} -eq 0
  local tp; tp=$(status_field .thumbprint)
  check "3 the event: MESSAGE_ID 271c25c8…, priority 5, registration id $REG_ID, RFC 3339 dates, thumbprint = status'" "$fields; status thumbprint $tp" \
    jq -e --arg tp "$tp" --arg rid "$REG_ID" '.MESSAGE_ID == "271c25c84ac2426fa7d313b7b844e0cc" and .PRIORITY == "5"
      and .DPS_REGISTRATION_ID == $rid and (.CERT_NOT_AFTER | test("^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z$"))
      and (.NEXT_RENEWAL | test("^[0-9]{4}-[0-9]{2}-[0-9]{2}T")) and (.CERT_THUMBPRINT | test("^[0-9A-F]{64}$"))
      and .CERT_THUMBPRINT == $tp' <<<"$ev" >/dev/null
  check "3 the event carries no key material or key URI" "$(jq -c . <<<"$ev" | cut -c1-400)" \
    bash -c '! grep -Eq "PRIVATE KEY|file:/|pkcs11:|tpm:" <<<"$0"' "$ev"
  local n; n=$(registrations)
  check "3 the simulator saw exactly one DPS registration" "registrations: $n" test "$n" = 1
}

step4_dbus() {
  step "4. D-Bus on the system bus with the shipped policy"
  g useradd --no-create-home --shell /bin/bash alice 2>/dev/null || true  # an ordinary user
  g useradd --no-create-home --shell /bin/bash bob 2>/dev/null || true    # an admin
  gt 30 adduser --quiet bob dps-agent-admin || true
  local xml_props bus_props missing=() bad=() p v
  xml_props=$(sed -n 's/.*<property name="\([A-Za-z]*\)".*/\1/p' "$GUEST/usr/share/dbus-1/interfaces/org.dpsagent.Agent1.xml" | sort)
  bus_props=$(as_user alice timeout 10 busctl introspect --no-pager "${BUS_ARGS[@]}" 2>&1 | awk '$2=="property"{print substr($1,2)}' | sort)
  for p in $xml_props; do grep -qx "$p" <<<"$bus_props" || missing+=("$p"); done
  check "4 an ordinary user introspects: every documented property is there ($(wc -w <<<"$xml_props"))" \
    "missing: ${missing[*]}; introspected: $(tr '\n' ' ' <<<"$bus_props")" test ${#missing[@]} -eq 0 -a -n "$xml_props"
  local vals=()
  for p in $xml_props; do
    if v=$(as_user alice timeout 10 busctl get-property "${BUS_ARGS[@]}" "$p" 2>&1); then vals+=("$p=$v"); else bad+=("$p: $v"); fi
  done
  check "4 an ordinary user reads every property" "${bad[*]}" test ${#bad[@]} -eq 0
  note "properties: $(printf '%s; ' "${vals[@]}" | cut -c1-600)"
  local before out rc=0
  before=$(registrations)
  out=$(as_user alice timeout 20 dbus-send --system --print-reply --dest=org.dpsagent.Agent /org/dpsagent/Agent org.dpsagent.Agent1.Renew 2>&1) || rc=$?
  check "4 alice (not in dps-agent-admin) gets AccessDenied from Renew" "rc $rc: $out" \
    grep -q org.freedesktop.DBus.Error.AccessDenied <<<"$out"
  local r0; r0=$(prop_value Renewals)
  rc=0; out=$(as_user bob timeout 60 dbus-send --system --print-reply --dest=org.dpsagent.Agent /org/dpsagent/Agent org.dpsagent.Agent1.Renew 2>&1) || rc=$?
  check "4 bob (in dps-agent-admin) may call Renew" "rc $rc: $out" test $rc -eq 0
  if poll 30 0.25 registrations_are $((before + 1)) && poll 30 0.25 renewals_above "${r0:-0}" && poll 10 0.25 daemon_state_is provisioned; then
    ok "4 bob's Renew made one DPS registration and a new identity (Renewals $r0 -> $(prop_value Renewals))"
  else
    fail "4 bob's Renew made one DPS registration and a new identity" \
      "registrations $before -> $(registrations); Renewals $r0 -> $(prop_value Renewals); state $(status_field .state)"
  fi
  before=$(registrations); r0=$(prop_value Renewals)
  rc=0; out=$(gt 30 systemctl reload dps-agent 2>&1) || rc=$?
  if [ $rc -eq 0 ] && poll 30 0.25 registrations_are $((before + 1)) && poll 30 0.25 renewals_above "${r0:-0}" && poll 10 0.25 daemon_state_is provisioned; then
    ok "4 systemctl reload renews: one DPS registration (registrations $before -> $(registrations))"
  else
    fail "4 systemctl reload renews: one DPS registration" \
      "reload rc $rc $out; registrations $before -> $(registrations); Renewals $r0 -> $(prop_value Renewals)"
  fi
}

step5_restart_reboot() {
  step "5. restart and reboot keep the identity, without a DPS registration"
  local id0 n0 pid0 out rc=0
  id0=$(identity_line); n0=$(registrations); pid0=$(main_pid)
  out=$(gt 60 systemctl restart dps-agent 2>&1) || rc=$?
  poll 20 0.25 daemon_state_is provisioned || true
  # A negative check needs a window: 2 s in which no registration may appear.
  sleep 2
  check "5 systemctl restart: a new process, same identity, no DPS registration" \
    "rc $rc $out; pid $pid0 -> $(main_pid); identity '$id0' -> '$(identity_line)'; registrations $n0 -> $(registrations)" \
    bash -c '[ "$0" = 0 ] && [ "$1" != "$2" ] && [ "$3" = "$4" ] && [ "$5" = "$6" ]' \
    "$rc" "$pid0" "$(main_pid)" "$id0" "$(identity_line)" "$n0" "$(registrations)"
  # Reboot the container: systemd-nspawn exits (133) and is started again on the same root.
  local t0; t0=$(now)
  g systemctl reboot --no-block >/dev/null 2>&1 || true
  rc=0; wait_nspawn_exit 60 || rc=$?
  cleanup_nspawn_leftovers
  if [ $rc = 124 ]; then fail "5 the guest reboots" "systemd-nspawn still running after 60 s"; return 1; fi
  boot
  echo "$NSPAWN_PID" >"$RUN/nspawn.pid"
  note "rebooted in $(elapsed "$t0") s (nspawn exit status $rc)"
  poll 30 0.25 sim_ready || true
  if poll 30 0.25 daemon_state_is provisioned; then
    sleep 2
    check "5 after a reboot the enabled service is up with the same identity and no DPS registration" \
      "identity '$id0' -> '$(identity_line)'; registrations $n0 -> $(registrations)" \
      bash -c '[ "$0" = "$1" ] && [ "$2" = "$3" ]' "$id0" "$(identity_line)" "$n0" "$(registrations)"
  else
    fail "5 after a reboot the enabled service comes up provisioned" \
      "is-active $(active_state dps-agent.service); $(status_json | jq -c '{state,source,last_error}' 2>&1)" \
      "$(gt 10 journalctl -b -u dps-agent --no-pager -n 10 -o cat 2>&1)"
  fi
}

step6_watchdog() {
  step "6. watchdog: a stopped (SIGSTOP) daemon is killed and restarted by systemd"
  printf '[Service]\nWatchdogSec=4s\n' >"$GUEST$WATCHDOG_DROPIN"
  g systemctl daemon-reload
  # The daemon reads WATCHDOG_USEC when it starts: restart it under the new setting.
  gt 60 systemctl restart dps-agent || true
  poll 20 0.25 daemon_state_is provisioned || true
  local id0 n0 pid0 nr0 t0
  id0=$(identity_line); n0=$(registrations); pid0=$(main_pid); nr0=$(unit_show dps-agent NRestarts)
  check "6 WatchdogSec=4s in effect" "$(unit_show dps-agent WatchdogUSec)" test "$(unit_show dps-agent WatchdogUSec)" = 4s
  t0=$(now)
  g kill -STOP "$pid0"
  new_pid() { local p; p=$(main_pid); [ -n "$p" ] && [ "$p" != 0 ] && [ "$p" != "$pid0" ] && daemon_state_is provisioned; }
  if poll 60 0.5 new_pid; then
    ok "6 systemd killed the stopped daemon (pid $pid0) and restarted it (pid $(main_pid), NRestarts $nr0 -> $(unit_show dps-agent NRestarts), $(elapsed "$t0") s)"
    local wd
    wd=$(gt 10 journalctl -u dps-agent --no-pager -o cat --since "-2min" 2>&1 | grep -i watchdog | head -2)
    check "6 the journal says the watchdog fired" "${wd:-no watchdog line}" test -n "$wd"
    check "6 the identity is intact, no DPS registration" "identity '$id0' -> '$(identity_line)'; registrations $n0 -> $(registrations)" \
      bash -c '[ "$0" = "$1" ] && [ "$2" = "$3" ]' "$id0" "$(identity_line)" "$n0" "$(registrations)"
  else
    fail "6 systemd killed the stopped daemon and restarted it within 60 s" \
      "pid $pid0 -> $(main_pid); $(gt 10 systemctl show -p ActiveState,SubState,Result,NRestarts dps-agent | tr '\n' ' ')"
    g kill -CONT "$pid0" 2>/dev/null || true
  fi
  rm -f "$GUEST$WATCHDOG_DROPIN"; g systemctl daemon-reload
}

step7_upgrade() {
  step "7. upgrade to a newer build keeps the edited config and the identity, restarts the service"
  local d=$RUN/upgrade new_version new_deb
  rm -rf "$d"; mkdir -p "$d"
  new_version="${DEB_VERSION}+systemtest1"
  dpkg-deb -R "$DEB" "$d/pkg"
  sed -i "s/^Version: .*/Version: $new_version/" "$d/pkg/DEBIAN/control"
  new_deb=$d/dps-agent_${new_version}_amd64.deb
  dpkg-deb --root-owner-group -b "$d/pkg" "$new_deb" >/dev/null
  cp "$new_deb" "$GUEST/root/"
  echo "# edited by the gateway owner" >>"$GUEST/etc/dps-agent/config.toml"
  local conf0 id0 n0 pid0
  conf0=$(md5sum <"$GUEST/etc/dps-agent/config.toml"); id0=$(identity_line); n0=$(registrations); pid0=$(main_pid)
  if apt_install "/root/$(basename "$new_deb")"; then ok "7 apt-get install ./$(basename "$new_deb") (upgrade)"
  else fail "7 apt-get install ./$(basename "$new_deb") (upgrade)" "$(tail -20 "$RUN/apt.log")"; return 1; fi
  local v; v=$(g dpkg-query -W -f='${Version}' dps-agent)
  check "7 version $new_version installed" "$v" test "$v" = "$new_version"
  check "7 the edited conffile /etc/dps-agent/config.toml is kept" "$(grep -c 'edited by the gateway owner' "$GUEST/etc/dps-agent/config.toml") marker line(s); dpkg: $(grep -i conffile "$RUN/apt.log" | head -3)" \
    test "$(md5sum <"$GUEST/etc/dps-agent/config.toml")" = "$conf0"
  poll 20 0.25 daemon_state_is provisioned || true
  local pid1; pid1=$(main_pid)
  check "7 the running service was restarted (pid $pid0 -> $pid1) and is active" "$(gt 10 systemctl show -p ActiveState,SubState,MainPID dps-agent | tr '\n' ' ')" \
    bash -c '[ "$0" != "$1" ] && [ "$1" != 0 ] && [ "$2" = active ]' "$pid0" "$pid1" "$(active_state dps-agent.service)"
  local en; en=$(gt 10 systemctl is-enabled dps-agent 2>&1 || true)
  check "7 still enabled after the upgrade" "$en" test "$en" = enabled
  sleep 1
  check "7 the identity is kept, no DPS registration" "identity '$id0' -> '$(identity_line)'; registrations $n0 -> $(registrations)" \
    bash -c '[ "$0" = "$1" ] && [ "$2" = "$3" ]' "$id0" "$(identity_line)" "$n0" "$(registrations)"
}

step8_dps_down() {
  step "8. DPS unreachable (the simulator stopped): D-Bus and status say so while the agent retries"
  gt 30 systemctl stop dps-sim.service || true
  local f0; f0=$(prop_value Failures)
  gt 30 systemctl reload dps-agent || true
  failing() {
    local f e; f=$(prop_value Failures); e=$(prop_value LastError)
    [ -n "$f" ] && [ "$f" -gt "${f0:-0}" ] && [ -n "$e" ]
  }
  if poll 30 0.5 failing; then
    ok "8 D-Bus Failures ${f0} -> $(prop_value Failures), LastError: $(prop_value LastError | cut -c1-160)"
  else
    fail "8 D-Bus Failures and LastError show the failed attempt (within 30 s of the reload)" \
      "Failures ${f0} -> '$(prop_value Failures)'; LastError '$(prop_value LastError)'; State '$(prop_value State)'; NextAttempt '$(prop_value NextAttempt)'" \
      "journal: $(gt 10 journalctl -u dps-agent --no-pager -n 6 -o cat 2>&1)"
  fi
  # A second trigger: an admin's Renew over D-Bus, while DPS is still down.
  local f1; f1=$(prop_value Failures)
  gt 60 busctl call "${BUS_ARGS[@]}" Renew >/dev/null 2>&1 || true
  f0=$f1
  if poll 30 0.5 failing; then ok "8 a Renew while DPS is down counts another failure (Failures $f1 -> $(prop_value Failures))"
  else fail "8 a Renew while DPS is down counts another failure" "Failures $f1 -> '$(prop_value Failures)'; LastError '$(prop_value LastError)'"; fi
  local txt; txt=$(gt 20 dps-agent status 2>&1 || true)
  check "8 dps-agent status shows the failures and the last error" "$txt" \
    bash -c 'grep -Eiq "fail" <<<"$0" && grep -Eiq "error" <<<"$0"' "$txt"
  local sj; sj=$(status_json | jq -c '{state,failures,last_error,next_attempt}' 2>&1)
  check "8 dps-agent status --json: failures > 0 and last_error set" "$sj" \
    jq -e '.failures > 0 and (.last_error // "") != ""' <<<"$sj" >/dev/null
  check "8 the identity stays in use (still provisioned with the current certificate)" "$(identity_line)" \
    bash -c '[[ "$0" == provisioned* || "$0" == renewing* || "$0" == failed* ]] && [ -n "$(awk "{print \$4}" <<<"$0")" ]' "$(identity_line)"
}

step9_purge() {
  step "9. purge: nothing left but the owner's bootstrap credential, owned by root"
  # The test's own drop-ins are the owner's files, not the package's: the owner removes them.
  rm -rf "$GUEST$DROPIN_DIR"
  local out rc=0
  out=$(g timeout 120 apt-get purge -y -q dps-agent 2>&1) || rc=$?
  check "9 apt-get purge dps-agent" "rc $rc: $(tail -5 <<<"$out")" test $rc -eq 0
  local s; s=$(g dpkg-query -W -f='${db:Status-Abbrev}' dps-agent 2>/dev/null || true)
  check "9 dpkg knows nothing of dps-agent any more" "status '$s'" bash -c '[ -z "$0" ] || [[ "$0" == un* ]]' "$s"
  local left expected
  left=$(cd "$GUEST" && find etc/dps-agent var/lib/dps-agent 2>/dev/null | sort | tr '\n' ' ')
  expected="etc/dps-agent etc/dps-agent/bootstrap etc/dps-agent/bootstrap/device-full-chain.pem etc/dps-agent/bootstrap/device.key "
  check "9 only the bootstrap credential is left in /etc/dps-agent; /var/lib/dps-agent is gone" "left: $left" test "$left" = "$expected"
  local owners
  owners=$(g find /etc/dps-agent -printf '%p %u:%g %m\n' 2>&1)
  check "9 what is left is owned by root (no file of a deleted user)" "$owners" \
    bash -c '! grep -vq " root:root " <<<"$0"' "$owners"
  local users; users=$(g sh -c 'getent passwd dps-agent; getent group dps-agent; getent group dps-agent-admin' || true)
  check "9 users dps-agent and groups dps-agent, dps-agent-admin are gone" "$users" test -z "$users"
  local files=() f
  for f in /usr/bin/dps-agent /usr/lib/systemd/system/dps-agent.service /etc/systemd/system/multi-user.target.wants/dps-agent.service \
           /usr/share/dbus-1/system.d/org.dpsagent.Agent.conf /usr/lib/sysusers.d/dps-agent.conf; do
    [ -e "$GUEST$f" ] || [ -L "$GUEST$f" ] && files+=("$f")
  done
  check "9 the unit, its enablement link, the binary and the D-Bus policy are gone" "left: ${files[*]}" test ${#files[@]} -eq 0
  local procs; procs=$(g pgrep -a -x dps-agent || true)
  check "9 no dps-agent process is running" "$procs" test -z "$procs"
}

# --- Main --------------------------------------------------------------------

timed() { local n=$1 t0; t0=$(now); shift; "$@" || note "step $n stopped early"; STEP_TIME[$n]=$(elapsed "$t0"); }
want() { [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $1 "* ]]; }

main() {
  local mode=${1:-all}
  host_prereqs
  case "$mode" in
    base) ensure_base; exit 0 ;;
    all|shell) ;;
    *) sed -n '2,26p' "$0"; exit 2 ;;
  esac
  pick_inputs
  mkdir -p "$ST"
  exec 9>"$ST/.lock"
  flock -n 9 || die "another system test runs on this machine ($ST/.lock)"
  local tb; tb=$(now)
  ensure_base
  local base_s; base_s=$(elapsed "$tb")
  stop_stale_run
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  local tg; tg=$(now)
  start_guest
  install_sim
  local setup_s; setup_s=$(elapsed "$tg")
  if [ "$mode" = shell ]; then
    apt_install "/root/$(cp "$DEB" "$GUEST/root/" && basename "$DEB")" || cat "$RUN/apt.log"
    note "guest shell (exit to stop the container)"
    g bash -l || true
    exit 0
  fi
  want 1 && timed 1 step1_install
  want 2 && timed 2 step2_shipped_config
  want 3 && timed 3 step3_fixed_config
  want 4 && timed 4 step4_dbus
  want 5 && timed 5 step5_restart_reboot
  want 6 && timed 6 step6_watchdog
  want 7 && timed 7 step7_upgrade
  want 8 && timed 8 step8_dps_down
  want 9 && timed 9 step9_purge
  printf '\n# times: base %s s, boot + simulator %s s' "$base_s" "$setup_s"
  local k; for k in $(printf '%s\n' "${!STEP_TIME[@]}" | sort -n); do printf ', step %s %s s' "$k" "${STEP_TIME[$k]}"; done
  printf ', total %s s\n' "$(elapsed "$T_START")"
  printf '# logs of this run: %s/logs (journal, simulator events)\n' "$ST"
  if [ ${#FAILED[@]} -eq 0 ]; then
    printf '# system test: all %d checks passed\n' "$CHECKS"
  else
    printf '# system test: %d of %d checks FAILED:\n' "${#FAILED[@]}" "$CHECKS"
    printf '#   - %s\n' "${FAILED[@]}"
    exit 1
  fi
}

main "$@"
