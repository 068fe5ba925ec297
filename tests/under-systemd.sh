#!/usr/bin/env bash
# The packaged unit under a real systemd as PID 1: a minimal Debian tree (debootstrap,
# from Debian's packages) booted with systemd-nspawn, the package installed inside it with
# apt-get, and the agent driven with systemctl as an operator would:
#   start    reaches active (running) only after the agent's READY notification;
#   push     a push from this host to the agent inside the container commits;
#   reload   `systemctl reload` applies a changed allow list;
#   stop     drains: a running job that does not finish in drain_secs stays staged,
#            and the same push after the next start resumes it (blocks already there);
#   watchdog an agent made to hang (SIGSTOP: it runs no code, so it sends no pings)
#            is killed by the watchdog and restarted.
# Root; needs debootstrap and systemd-container (.ci/run installs them). The tree is
# kept in $BARGE_NSPAWN_DIR (default /var/tmp/barge-nspawn) for the next run.
#   sudo tests/under-systemd.sh target/debian/barge_*.deb
set -euo pipefail
deb="$(realpath "${1:?usage: tests/under-systemd.sh PATH/TO/barge_VERSION_ARCH.deb}")"
dir="${BARGE_NSPAWN_DIR:-/var/tmp/barge-nspawn}"
root="$dir/root"
port=17878
work="$(mktemp -d)"
fail() {
  echo "under-systemd: FAILED: $*" >&2
  [ -z "${init:-}" ] || inside journalctl -b -u barge --no-pager -n 40 -o short-monotonic >&2 || true
  exit 1
}
ok() { echo "under-systemd: ok: $*"; }

if [ ! -x "$root/lib/systemd/systemd" ]; then
  rm -rf "$root" && mkdir -p "$dir"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,man-db \
    bookworm "$root" http://deb.debian.org/debian >"$dir/debootstrap.log" 2>&1 ||
    fail "debootstrap (log: $dir/debootstrap.log)"
fi
: >"$root/etc/machine-id"
# A fresh state each run: no package, data or drop-in from the last one.
rm -rf "$root/var/lib/barge" "$root/etc/barge" "$root/srv/storage" "$root/etc/systemd/system/barge.service.d"
cp "$deb" "$root/root/barge.deb"

systemd-nspawn -q -D "$root" --register=no --keep-unit -b >"$work/console.log" 2>&1 &
nspawn=$!
cleanup() {
  kill "$nspawn" 2>/dev/null && wait "$nspawn" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
inside() { nsenter -t "$init" -a "$@"; }
init=""
for _ in $(seq 100); do
  init="$(pgrep -P "$nspawn" -x systemd || true)"
  if [ -n "$init" ]; then
    state="$(inside systemctl is-system-running 2>/dev/null || true)"
    case "$state" in running | degraded) break ;; esac
  fi
  sleep 0.2
done
[ -n "$init" ] || fail "the container did not boot (console: $(tail -5 "$work/console.log"))"
ok "systemd $(inside systemctl --version | head -1 | cut -d' ' -f2) booted as PID 1 of the container ($state)"

inside sh -c 'dpkg --purge barge && cd /root && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ./barge.deb' >"$work/apt.log" 2>&1 ||
  fail "apt-get install in the container: $(tail -5 "$work/apt.log")"
[ "$(inside systemctl is-enabled barge.service 2>/dev/null || true)" = "disabled" ] || fail "the package enabled barge.service"
[ "$(inside systemctl is-active barge.service 2>/dev/null || true)" = "inactive" ] || fail "the package started barge.service"
ok "package installed with apt-get; barge.service disabled and inactive"

# Certificates made with the packaged binary's own `certs` command, on this host.
dpkg-deb -x "$deb" "$work/pkg"
barge="$work/pkg/usr/bin/barge"
"$barge" certs init --dir "$work/pki" >/dev/null
for who in store-b ops other; do "$barge" certs issue "$who" --dir "$work/pki" >/dev/null; done
mkdir -p "$root/etc/barge/certs"
cp "$work/pki/ca.pem" "$work/pki/store-b.pem" "$work/pki/store-b.key" "$root/etc/barge/certs/"
inside chown -R barge:barge /etc/barge/certs
inside install -d -o barge -g barge /srv/storage/in
config() {
  cat >"$root/etc/barge/barge.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "/var/lib/barge"
drain_secs = 2
[tls]
ca = "certs/ca.pem"
cert = "certs/store-b.pem"
key = "certs/store-b.key"
[limits]
rate_mbit = 40
[[import]]
name = "in"
path = "/srv/storage/in"
allow = [$1]
CONF
}
config '"ops"'
push() { # IDENTITY FILE...: a push to the agent inside the container
  local who="$1"; shift
  "$barge" push "$@" --to "store-b@127.0.0.1:$port" --import in --certs "$work/pki" --identity "$who"
}

inside systemctl start barge || fail "systemctl start"
show="$(inside systemctl show -p ActiveState -p SubState -p StatusText barge)"
echo "$show" | grep -qx "ActiveState=active" && echo "$show" | grep -qx "SubState=running" ||
  fail "after start: $show"
echo "$show" | grep -qx "StatusText=listening on 127.0.0.1:$port" || fail "no READY status: $show"
journal="$(inside journalctl -b -u barge --no-pager -o cat)"
ready_line="$(echo "$journal" | grep -n "agent listening" | head -1 | cut -d: -f1)"
started_line="$(echo "$journal" | grep -n "^Started barge.service" | head -1 | cut -d: -f1)"
[ -n "$ready_line" ] && [ -n "$started_line" ] && [ "$ready_line" -lt "$started_line" ] ||
  fail "systemd called the unit started before the agent was listening: $journal"
! echo "$journal" | grep -q $'\e\[' || fail "colour escape codes in the journal"
ok "systemctl start: active (running) after READY ($(echo "$show" | grep StatusText))"

head -c 300000 /dev/urandom >"$work/first.sst"
push ops "$work/first.sst" >"$work/push.log" 2>&1 || fail "push: $(cat "$work/push.log")"
cmp -s "$work/first.sst" "$root/srv/storage/in/first.sst" || fail "the pushed file is not in the target"
ok "push committed: $(head -1 "$work/push.log")"

echo small >"$work/small"
code=0; push other "$work/small" >"$work/other.log" 2>&1 || code=$?
[ "$code" = 5 ] || fail "a push by an identity not allowed: exit $code: $(cat "$work/other.log")"
config '"ops", "other"'
inside systemctl reload barge || fail "systemctl reload"
for _ in $(seq 50); do
  push other "$work/small" >"$work/other.log" 2>&1 && break
  sleep 0.1
done
[ -f "$root/srv/storage/in/small" ] || fail "the reloaded allow list was not applied: $(cat "$work/other.log")"
[ "$(inside systemctl show -p ActiveState --value barge)" = active ] || fail "not active after reload"
ok "systemctl reload: a push by 'other' refused (exit 5) before, committed after"

# 40 Mbit/s: 32 MiB take ~7 s, more than the 2 s the drain allows.
head -c $((32 << 20)) /dev/urandom >"$work/big.sst"
push ops "$work/big.sst" >"$work/big.log" 2>&1 &
pusher=$!
# The unit makes /var/lib/barge and /srv/storage separate mounts, so the job is staged
# inside the target (a commit must be a rename within one mount).
staging="$root/srv/storage/in/.barge-staging"
for _ in $(seq 200); do
  [ -n "$(find "$staging" -type f -size +1M 2>/dev/null | head -1)" ] && break
  sleep 0.05
done
inside systemctl stop barge
code=0; wait "$pusher" || code=$?
[ "$code" != 0 ] || fail "the push finished within the drain; nothing to resume: $(cat "$work/big.log")"
[ ! -e "$root/srv/storage/in/big.sst" ] || fail "a job cut by stop is visible in the target"
staged="$(du -sk "$staging" | cut -f1)"
[ "$staged" -gt 1024 ] || fail "stop left nothing staged (${staged} KiB)"
journal="$(inside journalctl -b -u barge --no-pager -o cat)"
echo "$journal" | grep -q "stopping: draining running jobs" || fail "no drain in the journal"
echo "$journal" | grep -q "drain deadline passed; cut-off jobs stay staged" || fail "the drain did not cut the job"
inside systemctl start barge
push ops "$work/big.sst" >"$work/big.log" 2>&1 || fail "the push after restart: $(cat "$work/big.log")"
cmp -s "$work/big.sst" "$root/srv/storage/in/big.sst" || fail "the resumed file differs"
already="$(sed -n 's/.* \([0-9][0-9]*\) already there.*/\1/p' "$work/big.log")"
[ -n "$already" ] && [ "$already" -gt 0 ] || fail "the push after restart resumed nothing: $(cat "$work/big.log")"
ok "systemctl stop drained (push cut, ${staged} KiB staged, nothing visible); after start it resumed ($already blocks already there)"

mkdir -p "$root/etc/systemd/system/barge.service.d"
printf '[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\n' >"$root/etc/systemd/system/barge.service.d/watchdog.conf"
inside systemctl daemon-reload
inside systemctl restart barge
before="$(inside systemctl show -p NRestarts --value barge)"
pid="$(inside systemctl show -p MainPID --value barge)"
sleep 3
[ "$(inside systemctl show -p MainPID --value barge)" = "$pid" ] || fail "restarted while healthy: the agent's pings do not reach systemd"
inside kill -STOP "$pid"
for _ in $(seq 150); do
  now="$(inside systemctl show -p NRestarts --value barge)"
  [ "$now" -gt "$before" ] && [ "$(inside systemctl show -p ActiveState --value barge)" = active ] && break
  sleep 0.2
done
[ "$now" -gt "$before" ] || fail "the watchdog did not restart the hung agent"
[ "$(inside systemctl show -p MainPID --value barge)" != "$pid" ] || fail "same PID after the watchdog"
journal="$(inside journalctl -b -u barge --no-pager -o cat)"
echo "$journal" | grep -qi "watchdog timeout" || fail "no watchdog timeout in the journal"
push ops "$work/small" >/dev/null 2>&1 || fail "push after the watchdog restart"
ok "watchdog: healthy for 3 s at WatchdogSec=2, then a hung (SIGSTOPped) agent was killed and restarted"
echo "under-systemd: all checks passed"
