#!/usr/bin/env bash
# Fan-out benchmark (root): one source sends the same data to three replicas, each host
# on its own 500 Mbit/s link, by plain pushes (one after another, and all at once), by
# barge's relay chain (source -> r1 -> r2 -> r3, each byte sent by the source once) and,
# for reference, by rsync over ssh to all three at once. In one run, interleaved.
#
#   sudo benches/fanout.sh                        # 1 GiB in 8 files, medians of 3 (~12 min)
#   FANOUT_MIB=64 FANOUT_RUNS=1 benches/fanout.sh # a quick check
#   FANOUT_SKIP_RELAY=1 benches/fanout.sh         # without row 4 (a barge without relays)
#
# Network: five namespaces. fo-src (10.77.0.1) and the replicas fo-r1..fo-r3 (10.77.0.2-4)
# each have one veth into a bridge in fo-sw (the bridge lives in its own namespace so the
# host's firewall and br_netfilter never see the traffic). Every host's link is shaped by
# tbf to FANOUT_RATE_MBIT in each direction: the host-side veth's egress is its uplink,
# the bridge-side peer's egress its downlink. No delay is added (the kernel has no netem;
# shared/tools/linkem only joins two namespaces).
#
# Rows (each replica's import target is empty before every row, so every replica gets the
# whole payload; the source files stay in the page cache, which is fine here since the
# links, not the disks, set the pace):
#   1 one barge push to r1                     (its median is T1, the reference)
#   2 three barge pushes, one after another
#   3 three barge pushes at once
#   4 barge push with three --to: the relay chain
#   5 rsync -a --whole-file over ssh to the three at once, then `sync` (barge syncs before
#     it commits, so the copy is timed until durable too)
# After every barge row each replica's files must be blake3-identical to the source
# (`barge hash`), and so after rsync; a failed transfer or a differing replica exits 1.
# Counted per row: the bytes the source put on its link (its veth's tx counter, so
# packet overhead and acknowledgements included), and for barge rows the payload bytes
# its pushes report sent (`sent_bytes` in --json).
#
# Targets (the issue): the relay chain delivers all three replicas, committed and
# verified, in at most 1.2 x T1 (that is at least 2.5 x faster than row 3), and the
# source sends each byte once.
#
# Environment: BARGE_BIN (default target/release/barge; this script does not build),
# BARGE_BENCH_DIR (default /var/tmp/barge-fanout; the data is kept there between runs),
# FANOUT_MIB (payload, default 1024), FANOUT_FILES (default 8), FANOUT_RUNS (default 3),
# FANOUT_RATE_MBIT (default 500), FANOUT_RELAY (default 1: `relay_from` in the agents'
# configs), FANOUT_SKIP_RELAY (default 0, or 1 when FANOUT_RELAY=0), FANOUT_PORT (7878),
# FANOUT_SSH_PORT (2222), FANOUT_STORE (tmpfs: each replica's target and staging on a
# tmpfs of its own, as if each host had its own disk; disk: all on this machine's one
# disk, which then writes three copies at once in row 4), FANOUT_ROWS (default all),
# FANOUT_KEEP_LOGS (a folder to copy the agents' logs to).
# Needs: jq, rsync, openssh-server (sshd), openssh-client, iproute2 (ip, tc, ss), bc, ping.
set -euo pipefail
shopt -s inherit_errexit  # the rows run in $(...): a failing step there must end them
cd "$(dirname "$0")/.."
ROOT=$PWD
BARGE=${BARGE_BIN:-$ROOT/target/release/barge}
BENCH_DIR=${BARGE_BENCH_DIR:-/var/tmp/barge-fanout}
MIB=${FANOUT_MIB:-1024}
NFILES=${FANOUT_FILES:-8}
RUNS=${FANOUT_RUNS:-3}
RATE=${FANOUT_RATE_MBIT:-500}
RELAY=${FANOUT_RELAY:-1}
STORE=${FANOUT_STORE:-tmpfs}
case $STORE in tmpfs | disk) ;; *) echo "FANOUT_STORE must be tmpfs or disk" >&2; exit 2 ;; esac
SKIP_RELAY=${FANOUT_SKIP_RELAY:-$([ "$RELAY" = 1 ] && echo 0 || echo 1)}
PORT=${FANOUT_PORT:-7878}
SSH_PORT=${FANOUT_SSH_PORT:-2222}
NS=(fo-src fo-r1 fo-r2 fo-r3)  # index 0 is the source, 1-3 the replicas
SW=fo-sw
addr() { echo "10.77.0.$(($1 + 1))"; }

die() { echo "fanout.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
[ -x "$BARGE" ] || die "no barge binary at $BARGE (cargo build --release, or set BARGE_BIN)"
BARGE=$(realpath "$BARGE")
for t in jq rsync sshd ssh ssh-keygen ip tc ss bc ping; do
  command -v $t >/dev/null || die "$t missing (apt-get install -y jq rsync openssh-server openssh-client iproute2 bc iputils-ping)"
done
SSHD=$(command -v sshd)  # sshd wants an absolute path to re-exec itself
PAYLOAD_BYTES=$(((MIB << 20) / NFILES * NFILES))
[ "$PAYLOAD_BYTES" -gt 0 ] || die "FANOUT_MIB=$MIB over $NFILES files is empty"
[ "$RUNS" -ge 1 ] || die "FANOUT_RUNS must be at least 1"
ROWS=${FANOUT_ROWS:-"1 2 3 4 5"}
[ "$SKIP_RELAY" = 1 ] && ROWS="1 2 3 5"

# Leftovers of a run that was killed go; a live run's namespaces (a source namespace is
# empty between pushes, so look at all of them first) stop us before our trap is set.
for n in "${NS[@]}" $SW; do
  ip netns pids "$n" 2>/dev/null | grep -q . && die "namespace $n has processes: another fanout.sh running?"
done
for n in "${NS[@]}" $SW; do ip netns del "$n" 2>/dev/null || true; done

# --- data, kept between runs -------------------------------------------------------------
DATA=$BENCH_DIR/data-${MIB}m-${NFILES}
PAYLOAD=$DATA/payload  # pushed as a folder: lands as fanout/payload/ on every replica
if [ ! -e "$DATA/complete" ]; then
  rm -rf "$DATA"; mkdir -p "$PAYLOAD"
  for i in $(seq "$NFILES"); do
    head -c $((PAYLOAD_BYTES / NFILES)) /dev/urandom >"$PAYLOAD/part-$i.bin"
  done
  sync; touch "$DATA/complete"
fi
WORK=$(mktemp -d "$BENCH_DIR/run.XXXXXX")

# --- teardown: processes we started (by pid), namespaces, the run folder ------------------
PIDS=()
MOUNTS=()
teardown() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  for n in "${NS[@]}" $SW; do ip netns del "$n" 2>/dev/null || true; done
  for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  if [ -n "${FANOUT_KEEP_LOGS:-}" ]; then
    mkdir -p "$FANOUT_KEEP_LOGS" && cp "$WORK"/*.log "$WORK"/*.err "$FANOUT_KEEP_LOGS"/ 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# --- network -----------------------------------------------------------------------------
# tbf: a burst of 128 KB is about 2 ms at 500 Mbit/s, and up to 10 ms may queue (about
# 625 KB at 500 Mbit/s); tbf splits GSO packets larger than the burst.
TBF="rate ${RATE}mbit burst 128kb latency 10ms"
ip netns add $SW
ip -n $SW link add fo-br type bridge
ip -n $SW link set fo-br up
for i in 0 1 2 3; do
  n=${NS[$i]}; port=p-${n#fo-}
  ip netns add "$n"
  ip link add eth0 netns "$n" type veth peer name "$port" netns $SW
  ip -n $SW link set "$port" master fo-br up
  ip -n "$n" addr add "$(addr $i)/24" dev eth0
  ip -n "$n" link set lo up
  ip -n "$n" link set eth0 up
  tc -n "$n" qdisc add dev eth0 root tbf $TBF   # uplink
  tc -n $SW qdisc add dev "$port" root tbf $TBF # downlink
done
for i in 1 2 3; do
  ip netns exec fo-src ping -c1 -W2 "$(addr $i)" >/dev/null || die "no route from fo-src to $(addr $i)"
done

# --- certificates and agents -------------------------------------------------------------
C=$WORK/certs
"$BARGE" certs init --dir "$C" >/dev/null
for i in 0 1 2 3; do "$BARGE" certs issue "${NS[$i]#fo-}" --dir "$C" --san "$(addr $i)" >/dev/null; done
wait_listen() {  # $1 namespace, $2 ss filter (e.g. "-u sport = :7878"), $3 what, $4 log, $5 pid
  for _ in $(seq 100); do
    kill -0 "$5" 2>/dev/null || break
    # shellcheck disable=SC2086
    ip netns exec "$1" ss -Hln $2 | grep -q . && return 0
    sleep 0.1
  done
  tail -20 "$4" >&2 || true
  die "$3 in $1 is not listening (log above)"
}
for i in 1 2 3; do
  r=r$i
  mkdir -p "$WORK/$r"
  # Each replica's store on a tmpfs of its own: on this machine the four hosts share one
  # disk, and the relay chain writes three copies at once (three times row 1's disk rate),
  # which real hosts, each with its own disk, do not. FANOUT_STORE=disk keeps them on it.
  if [ "$STORE" = tmpfs ]; then
    mount -t tmpfs -o size=$((MIB * 3 + 512))m "fo-$r" "$WORK/$r"
    MOUNTS+=("$WORK/$r")
  fi
  mkdir -p "$WORK/$r/fanout"
  cat >"$WORK/$r.toml" <<TOML
listen = "$(addr $i):$PORT"
data_dir = "$WORK/$r/agent-data"
drain_secs = 2
[tls]
ca = "$C/ca.pem"
cert = "$C/$r.pem"
key = "$C/$r.key"
[transport]
bandwidth_mbit = $RATE
[[import]]
name = "fanout"
path = "$WORK/$r/fanout"
allow = ["src", "r1", "r2", "r3"]
hook = "move"
$([ "$RELAY" = 1 ] && echo 'relay_from = ["src", "r1", "r2"]')
TOML
  RUST_LOG=${FANOUT_AGENT_LOG:-info} ip netns exec "fo-$r" "$BARGE" agent --config "$WORK/$r.toml" >"$WORK/$r.log" 2>&1 &
  PIDS+=($!)
done
for i in 1 2 3; do wait_listen "fo-r$i" "-u sport = :$PORT" "barge agent" "$WORK/r$i.log" "${PIDS[$((i - 1))]}"; done

# --- private sshd per replica, for rsync ---------------------------------------------------
S=$WORK/ssh
mkdir -p "$S" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$S/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$S/client_key"
cp "$S/client_key.pub" "$S/authorized_keys"
for i in 1 2 3; do
  cat >"$S/sshd-r$i.conf" <<CONF
Port $SSH_PORT
ListenAddress $(addr $i)
HostKey $S/host_key
AuthorizedKeysFile $S/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $S/sshd-r$i.pid
CONF
  ip netns exec "fo-r$i" "$SSHD" -D -e -f "$S/sshd-r$i.conf" 2>"$S/sshd-r$i.log" &
  PIDS+=($!)
done
for i in 1 2 3; do wait_listen "fo-r$i" "-t sport = :$SSH_PORT" sshd "$S/sshd-r$i.log" "${PIDS[$((i + 2))]}"; done
SSH="ssh -F /dev/null -p $SSH_PORT -i $S/client_key -o StrictHostKeyChecking=no"
SSH+=" -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -c aes128-gcm@openssh.com"

# --- helpers -----------------------------------------------------------------------------
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
wire() { ip -n fo-src -s -j link show eth0 | jq '.[0].stats64.tx.bytes'; }
listing() { (cd "$1" && find payload -type f | sort | xargs -r "$BARGE" hash); }
listing "$DATA" >"$WORK/source.b3"

reset() {  # every replica's target empty, the source warm
  for i in 1 2 3; do find "$WORK/r$i/fanout" -mindepth 1 -delete; done
  sync
  cat "$PAYLOAD"/* >/dev/null
}
verify() {  # $1 row, $2.. replicas: each must hold exactly the source's files
  local i
  for i in "${@:2}"; do
    listing "$WORK/r$i/fanout" >"$WORK/r$i.b3"
    if ! cmp -s "$WORK/source.b3" "$WORK/r$i.b3"; then
      diff "$WORK/source.b3" "$WORK/r$i.b3" | head -20 >&2 || true
      die "row $1: replica r$i is not identical to the source"
    fi
  done
}
push() {  # $1 replica, $2 output prefix; one plain push from the source
  local r=r$1
  if ! ip netns exec fo-src "$BARGE" push "$PAYLOAD" --to "$r@$(addr "$1"):$PORT" --import fanout \
    --certs "$C" --identity src --hash-cache "$WORK/hashes" --json >"$2.json" 2>"$2.err"; then
    tail -20 "$2.err" >&2
    die "push to $r failed (exit above; agent log $WORK/$r.log)"
  fi
}
sent() { jq -r '.sent_bytes // empty' "$1"; }

# Each row prints "seconds source-wire-bytes payload-bytes-sent" (the last "-" for rsync).
row1() {
  local t0 t; t0=$(now)
  push 1 "$WORK/o1"
  t=$(echo "$(now) - $t0" | bc)
  verify 1 1
  echo "$t $(sent "$WORK/o1.json")"
}
row2() {
  local t0 t i s=0; t0=$(now)
  for i in 1 2 3; do push $i "$WORK/o2-$i"; done
  t=$(echo "$(now) - $t0" | bc)
  verify 2 1 2 3
  for i in 1 2 3; do s=$((s + $(sent "$WORK/o2-$i.json"))); done
  echo "$t $s"
}
row3() {
  local t0 t i s=0 pids=(); t0=$(now)
  for i in 1 2 3; do push $i "$WORK/o3-$i" & pids+=($!); done
  for i in 0 1 2; do wait "${pids[$i]}" || die "row 3: push to r$((i + 1)) failed"; done
  t=$(echo "$(now) - $t0" | bc)
  verify 3 1 2 3
  for i in 1 2 3; do s=$((s + $(sent "$WORK/o3-$i.json"))); done
  echo "$t $s"
}
row4() {
  local t0 t o=$WORK/o4; t0=$(now)
  if ! RUST_LOG=${FANOUT_CLIENT_LOG:-warn} ip netns exec fo-src "$BARGE" push "$PAYLOAD" \
    --to "r1@$(addr 1):$PORT" --to "r2@$(addr 2):$PORT" --to "r3@$(addr 3):$PORT" \
    --import fanout --json --certs "$C" --identity src --hash-cache "$WORK/hashes" \
    >"$o.json" 2>"$o.err"; then
    tail -20 "$o.err" >&2; cat "$o.json" >&2
    die "row 4: relay push failed (agent logs $WORK/r1.log ...)"
  fi
  t=$(echo "$(now) - $t0" | bc)
  if ! jq -e '(.replicas | length) == 3 and all(.replicas[]; .outcome == "committed")' "$o.json" >/dev/null; then
    jq -c '.replicas' "$o.json" >&2 || cat "$o.json" >&2
    die "row 4: not every replica committed"
  fi
  verify 4 1 2 3
  echo "  relay replicas: $(jq -c '[.replicas[] | {peer, outcome, received_bytes}]' "$o.json")" >&2
  local s; s=$(sent "$o.json")
  [ "$s" = "$PAYLOAD_BYTES" ] || echo "row 4: the source sent $s payload bytes, not $PAYLOAD_BYTES" >&2
  echo "$t $s"
}
row5() {
  local t0 t i pids=(); t0=$(now)
  for i in 1 2 3; do
    ip netns exec fo-src rsync -a --whole-file -e "$SSH" "$PAYLOAD" "root@$(addr $i):$WORK/r$i/fanout/" \
      2>"$WORK/o5-$i.err" &
    pids+=($!)
  done
  for i in 0 1 2; do
    wait "${pids[$i]}" || { cat "$WORK/o5-$((i + 1)).err" >&2; die "row 5: rsync to r$((i + 1)) failed"; }
  done
  sync
  t=$(echo "$(now) - $t0" | bc)
  verify 5 1 2 3
  echo "$t -"
}

# --- runs, interleaved ---------------------------------------------------------------------
echo "fanout: $(${BARGE} --version), $MIB MiB in $NFILES files, $RATE Mbit/s per host each way," \
  "$RUNS run(s), rows $ROWS, replicas' stores on $STORE;" \
  "relay_from in configs: $([ "$RELAY" = 1 ] && echo yes || echo no)" >&2
declare -A T=() W=() P=()
for run in $(seq "$RUNS"); do
  for r in $ROWS; do
    reset
    w0=$(wire)
    out=$(row$r)
    w=$(($(wire) - w0))
    T[$r]+="${out% *} "; W[$r]+="$w "; P[$r]+="${out#* } "
    echo "  run $run row $r: ${out% *} s, source wire $w bytes, payload sent ${out#* }" >&2
  done
done

# --- table ---------------------------------------------------------------------------------
declare -A NAME=([1]="one barge push to one replica (T1)" [2]="three barge pushes, one after another"
  [3]="three barge pushes at once" [4]="barge relay chain to three replicas"
  [5]="rsync over ssh to three at once (+ sync)")
declare -A REPL=([1]=1 [2]=3 [3]=3 [4]=3 [5]=3)
med() { echo "$1" | tr ' ' '\n' | grep . | median; }
MB=$(echo "$PAYLOAD_BYTES / 1000000" | bc -l)
T1=$(med "${T[1]}")
echo
echo "fanout: $(echo "$PAYLOAD_BYTES / 1048576" | bc) MiB in $NFILES files to each replica, $RATE Mbit/s" \
  "per host each way, median of $RUNS (range), source warm in page cache, replicas' stores on $STORE"
echo
echo "| row | what | seconds | MB/s per replica | MB/s delivered | x T1 | source sent / payload (barge) | source wire / payload |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
for r in $ROWS; do
  s=$(med "${T[$r]}")
  lo=$(echo "${T[$r]}" | tr ' ' '\n' | grep . | sort -g | head -1)
  hi=$(echo "${T[$r]}" | tr ' ' '\n' | grep . | sort -g | tail -1)
  p=$(med "${P[$r]}")
  [ "$p" = - ] && p=- || p=$(printf '%.3fx' "$(echo "$p / $PAYLOAD_BYTES" | bc -l)")
  printf '| %s | %s | %.2f (%.2f-%.2f) | %.1f | %.1f | %.2fx | %s | %.3fx |\n' "$r" "${NAME[$r]}" \
    "$s" "$lo" "$hi" "$(echo "$MB / $s" | bc -l)" "$(echo "${REPL[$r]} * $MB / $s" | bc -l)" \
    "$(echo "$s / $T1" | bc -l)" "$p" "$(echo "$(med "${W[$r]}") / $PAYLOAD_BYTES" | bc -l)"
done
echo
if [ -n "${T[4]:-}" ]; then
  T4=$(med "${T[4]}")
  printf 'relay <= 1.2 x T1: %s (%.2f s = %.2fx T1)\n' \
    "$([ "$(echo "$T4 <= 1.2 * $T1" | bc)" = 1 ] && echo yes || echo no)" "$T4" "$(echo "$T4 / $T1" | bc -l)"
  printf 'relay vs three at once: %.1fx (target >= 2.5x)\n' "$(echo "$(med "${T[3]}") / $T4" | bc -l)"
  # Once by the push's own count, and by the source's link: under 1.5 x the payload on the
  # wire (one copy plus packet overhead is about 1.03x; two copies would be over 2x).
  once=yes
  for v in ${P[4]}; do [ "$v" = "$PAYLOAD_BYTES" ] || once=no; done
  for v in ${W[4]}; do [ "$(echo "$v < 1.5 * $PAYLOAD_BYTES" | bc)" = 1 ] || once=no; done
  printf 'source sends each byte once: %s (bytes_sent per run: %s; on its link: %s; payload %s bytes)\n' \
    "$once" "$(echo ${P[4]})" "$(echo ${W[4]})" "$PAYLOAD_BYTES"
else
  echo "relay chain: skipped (FANOUT_SKIP_RELAY=1)"
fi
