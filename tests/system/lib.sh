# tests/system/lib.sh: the machinery of the booted-system test (sourced by run.sh).
# A Debian 12 root file system made once by debootstrap (the cached "base",
# never booted itself), an overlay on it per run (so each run starts clean),
# booted with systemd-nspawn --boot --private-network; commands run inside with
# nsenter into the guest's PID 1 (this works where the host's PID 1 is not
# systemd: no machinectl, no machined, no host D-Bus needed).

ST=${SYSTEM_TEST_DIR:-$ROOT/target/system-test}
BASE=$ST/base                 # the pristine root file system (debootstrap + apt lists)
ARCHIVES=$ST/apt-archives     # .debs apt downloaded, kept across runs (bind-mounted)
RUN=$ST/run                   # this run: overlay upper/work, the merged root, logs
GUEST=$RUN/root               # the merged root the container boots from
MACHINE=${SYSTEM_TEST_MACHINE:-dps-systest}
SUITE=bookworm
BASE_PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,procps,iproute2,less
# Bump when the base's recipe changes: an older cached base is rebuilt.
BASE_STAMP="v1 $SUITE $BASE_PACKAGES"
GUEST_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
  LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER=cat PAGER=cat SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive)

note() { printf '# %s\n' "$*"; }
die() { printf 'system-test: %s\n' "$*" >&2; exit 2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# The Debian mirror this machine's apt uses (deb822 or one-line format).
mirror() {
  local m
  m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$m" ] || m=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

host_prereqs() {
  [ "$(id -u)" = 0 ] || die "must run as root (debootstrap, overlay mounts, systemd-nspawn)"
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v jq >/dev/null || missing+=(jq)
  if [ ${#missing[@]} -gt 0 ]; then
    note "installing on the host: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
      || die "cannot install ${missing[*]}"
  fi
}

# One-shot chroot command in a root file system (the base is never booted).
in_chroot() {
  local r=$1; shift
  mount --bind /proc "$r/proc"
  local rc=0
  chroot "$r" "${GUEST_ENV[@]}" "$@" || rc=$?
  umount "$r/proc"
  return $rc
}

# The cached base: debootstrap once per machine (or when BASE_STAMP changes).
ensure_base() {
  if [ -f "$BASE/.system-test-base" ] && [ "$(cat "$BASE/.system-test-base")" = "$BASE_STAMP" ]; then
    note "base root file system: cached ($BASE)"
    return
  fi
  local t0 m; t0=$(now); m=$(mirror)
  note "base root file system: debootstrap $SUITE from $m into $BASE (once per machine)"
  rm -rf "$BASE.tmp"
  mkdir -p "$ST"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$BASE.tmp" "$m" \
    >"$ST/debootstrap.log" 2>&1 || { tail -20 "$ST/debootstrap.log"; die "debootstrap failed (log: $ST/debootstrap.log)"; }
  local b=$BASE.tmp
  # The guest's apt: the host's sources (same mirror, suites and security), deb822.
  rm -f "$b/etc/apt/sources.list"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$b/etc/apt/sources.list.d/"
  else
    echo "deb $m $SUITE main" >"$b/etc/apt/sources.list"
  fi
  echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' >"$b/etc/apt/apt.conf.d/90system-test-keep-debs"
  echo "$MACHINE" >"$b/etc/hostname"
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n127.0.1.1 %s\n' "$MACHINE" >"$b/etc/hosts"
  # Nothing in the background may take the dpkg lock or wait for a network.
  for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
           systemd-networkd-wait-online.service; do
    ln -sf /dev/null "$b/etc/systemd/system/$u"
  done
  # A fixed machine id: the journal in /var/log/journal survives the guest's reboots.
  rm -f "$b/etc/machine-id"; in_chroot "$b" systemd-machine-id-setup >/dev/null
  mkdir -p "$b/var/log/journal"
  in_chroot "$b" apt-get update -q >>"$ST/debootstrap.log" 2>&1 || die "apt-get update in the base failed"
  rm -rf "$b/var/cache/apt/archives/"*.deb
  echo "$BASE_STAMP" >"$b/.system-test-base"
  rm -rf "$BASE"; mv "$b" "$BASE"
  note "base made in $(elapsed "$t0") s ($(du -sh "$BASE" | cut -f1))"
}

# --- The container ---------------------------------------------------------

NSPAWN_PID=
LEADER=

overlay_up() {
  overlay_down
  mkdir -p "$RUN/upper" "$RUN/work" "$GUEST" "$ARCHIVES/partial"
  mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$RUN/upper,workdir=$RUN/work" "$GUEST"
}

overlay_down() {
  if mountpoint -q "$GUEST" 2>/dev/null; then umount "$GUEST" || umount -l "$GUEST"; fi
  rm -rf "$RUN/upper" "$RUN/work" "$GUEST"
}

# The container's systemd (PID 1 inside), a child of systemd-nspawn.
find_leader() { pgrep -P "$NSPAWN_PID" -x systemd | head -1; }

# A command in all of the guest's namespaces (its private network: only lo).
g() { nsenter -t "$LEADER" -a -- "${GUEST_ENV[@]}" "$@"; }
gsh() { g bash -c "$1"; }
# The guest's mount/pid/uts/ipc/cgroup namespaces but the HOST's network: only
# for apt to reach the Debian mirror. Services are still forked by the
# guest's PID 1, so they live in the guest's private network.
g_hostnet() { nsenter -t "$LEADER" -m -u -i -p -C -- "${GUEST_ENV[@]}" "$@"; }

cg_dirs() { for h in systemd unified; do echo "/sys/fs/cgroup/$h/nspawn-$MACHINE"; done; }

# Boots the container in the background; waits until its manager is up.
boot() {
  local t0; t0=$(now)
  for d in $(cg_dirs); do mkdir -p "$d"; done
  # Its own cgroup (else nspawn writes /payload and /supervisor into the root of
  # the host's hierarchies); --register=no --keep-unit: no host machined/bus.
  SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 setsid bash -c '
      for h in systemd unified; do echo $$ > /sys/fs/cgroup/$h/nspawn-'"$MACHINE"'/cgroup.procs; done
      exec systemd-nspawn --boot --register=no --keep-unit --private-network \
        --link-journal=no --machine='"$MACHINE"' -D "$0" --console=pipe \
        --bind="$1":/var/cache/apt/archives' "$GUEST" "$ARCHIVES" \
    </dev/null >>"$RUN/nspawn.log" 2>&1 &
  NSPAWN_PID=$!
  local s=
  for _ in $(seq 1 300); do
    kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$RUN/nspawn.log"; die "systemd-nspawn exited while booting"; }
    LEADER=$(find_leader || true)
    if [ -n "$LEADER" ]; then
      s=$(g systemctl is-system-running 2>/dev/null || true)
      case "$s" in running|degraded) break ;; esac
    fi
    sleep 0.1
  done
  case "$s" in running|degraded) ;; *) die "the guest did not boot in 30 s (state '$s'); see $RUN/nspawn.log" ;; esac
  note "guest booted ($s) in $(elapsed "$t0") s"
}

# Waits (bounded) for systemd-nspawn to exit; returns its exit status.
wait_nspawn_exit() {
  local secs=$1
  for _ in $(seq 1 $((secs * 10))); do
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$NSPAWN_PID" 2>/dev/null; then return 124; fi
  local rc=0; wait "$NSPAWN_PID" 2>/dev/null || rc=$?
  return $rc
}

cleanup_nspawn_leftovers() {
  # nspawn cannot remove this itself because the host's /run is not a tmpfs.
  rm -rf "/run/systemd/nspawn/propagate/$MACHINE"
  for d in $(cg_dirs); do [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null; done
  return 0
}

shutdown_guest() {
  if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    [ -n "$LEADER" ] && g systemctl poweroff --no-block >/dev/null 2>&1 || kill "$NSPAWN_PID" 2>/dev/null || true
    if ! wait_nspawn_exit 30; then
      note "guest did not power off in 30 s: killing systemd-nspawn"
      kill -9 "$NSPAWN_PID" 2>/dev/null || true
      wait_nspawn_exit 10 || true
    fi
  fi
  NSPAWN_PID= LEADER=
  cleanup_nspawn_leftovers
}
