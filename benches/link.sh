#!/usr/bin/env bash
# Shaped-link benchmark (root): barge against a plain TCP copy over an emulated link
# between two network namespaces, in one run.
#
#   sudo benches/link.sh            # 1 Gbit/s; 20 and 100 ms RTT; loss 0, 0.5, 2 and 5 %;
#                                   # then the fairness case
#   SIZE_MIB=256 LONG_MIB=1024 ROUNDS=3 RTTS="20" LOSSES="0 0.5" benches/link.sh
#   (the file is SIZE_MIB on paths under 100 ms, LONG_MIB from 100 ms: at 100 ms a
#   256 MiB push is half start-up, and TCP reached only 0.6 of the link with it)
#   CONNS=2 LOSSES=0 benches/link.sh   # adds a row with 2 connections; clean link only
#   FAIR=0 benches/link.sh             # without the fairness case
#
# The link is made by shared/tools/linkem (netem where the kernel has it, otherwise its
# NFQUEUE emulator; its queue holds 20 ms, one bandwidth-delay product of the 20 ms
# link). Rows per link: tcp (the transfer bench's sendfile copy, receiver syncs; TCP
# congestion control bbr), barge over QUIC with its default controller (bbr-bounded),
# with quinn's plain bbr and (clean links only) cubic. Every row writes to disk and is
# durable before it counts. Medians of ROUNDS: MB/s, ratio to tcp, and for barge the
# share of its QUIC packets lost (the link's random loss plus what the controller
# overflowed the link's queue with).
#
# Fairness (clean 20 ms link): a barge push and a TCP copy of the same size start
# together; each one's rate over its own run is printed, with barge's lost share. The
# one that ends first shared the link all along; the other had it alone at the end.
# `RTTS= benches/link.sh` runs the fairness case only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LINKEM=${LINKEM:-$ROOT/../shared/tools/linkem/linkem}
SIZE_MIB=${SIZE_MIB:-256}
LONG_MIB=${LONG_MIB:-1024}
SIZE=$SIZE_MIB  # of the file now in $WORK/src/data
ROUNDS=${ROUNDS:-3}
[ "$(id -u)" = 0 ] || { echo "link.sh: needs root (network namespaces)"; exit 1; }
[ -x "$LINKEM" ] || [ -f "$LINKEM" ] || { echo "link.sh: linkem not found at $LINKEM"; exit 1; }

cargo build --release --quiet
cargo bench --bench transfer --no-run --quiet 2>/dev/null
BARGE=$ROOT/target/release/barge
BENCH=$(ls -t "$ROOT"/target/release/deps/transfer-* | grep -v '\.d$' | head -1)
WORK=$(mktemp -d /tmp/barge-link.XXXXXX)
trap 'pkill -f "barge agent --config $WORK" 2>/dev/null || true; bash "$LINKEM" down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

"$BARGE" certs init --dir "$WORK/c" >/dev/null
"$BARGE" certs issue b --dir "$WORK/c" >/dev/null
"$BARGE" certs issue a --dir "$WORK/c" >/dev/null
mkdir -p "$WORK/src" "$WORK/in"
data_file() {  # $1 = MiB
  SIZE=$1
  head -c $(($1 << 20)) /dev/urandom >"$WORK/src/data"
}
data_file "$SIZE_MIB"
agent_config() {  # $1 = RTT in ms: the agent's windows follow it
cat >"$WORK/agent.toml" <<TOML
listen = "10.251.0.2:7878"
data_dir = "$WORK/agent-data"
[tls]
ca = "$WORK/c/ca.pem"
cert = "$WORK/c/b.pem"
key = "$WORK/c/b.key"
[transport]
bandwidth_mbit = 1000
rtt_ms = $1
[[import]]
name = "in"
path = "$WORK/in"
allow = ["a"]
TOML
}

now() { date +%s.%N; }
reset() {  # NORESET=1: the fairness case, whose two runs share one reset
  [ -n "${NORESET:-}" ] && return
  rm -rf "$WORK/in"/* "$WORK/dst"; mkdir -p "$WORK/dst"; sync; cat "$WORK/src/data" >/dev/null
}

run_tcp() {
  reset
  BARGE_BENCH_BIND=10.251.0.2 bash "$LINKEM" exec b "$BENCH" __role tcp-recv "$WORK/dst" >"$WORK/port" &
  local recv=$!
  while [ ! -s "$WORK/port" ]; do sleep 0.05; done
  local port; port=$(awk '{print $2}' "$WORK/port" | sed 's/.*://')
  local t0; t0=$(now)
  bash "$LINKEM" exec a "$BENCH" __role tcp-send "$WORK/src" "10.251.0.2:$port"
  wait $recv; rm -f "$WORK/port"
  echo "$(now) - $t0" | bc
}

run_barge() {  # $1 = congestion controller, $2 = connections; prints seconds and % of packets lost
  reset
  bash "$LINKEM" exec b "$BARGE" agent --config "$WORK/agent.toml" >/dev/null 2>&1 &
  sleep 0.7
  local t0; t0=$(now)
  bash "$LINKEM" exec a env RUST_LOG=barge::client=debug NO_COLOR=1 "$BARGE" push "$WORK/src/data" \
    --to b@10.251.0.2:7878 --import in --certs "$WORK/c" --identity a --congestion "$1" \
    --connections "${2:-1}" >/dev/null 2>"$WORK/push.log"
  local t; t=$(echo "$(now) - $t0" | bc)
  pkill -f "barge agent --config $WORK" || true
  sleep 0.3
  # The client logs each connection's packets sent and lost (path stats) at debug level.
  local pct; pct=$(sed -n 's/.* sent=\([0-9]*\) lost=\([0-9]*\).*/\1 \2/p' "$WORK/push.log" |
    awk '{s+=$1; l+=$2} END {printf "%.1f", s ? 100*l/s : 0}')
  echo "$t $pct"
}
row() {  # $1 = row name, rest: run_barge's arguments; adds to T (seconds) and L (loss %)
  local r; r=$(run_barge "${@:2}")
  T[$1]+="${r% *} "; L[$1]+="${r#* } "
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Brings the link up and checks that it is shaped (a plain veth would make every figure
# meaningless): the measured round trip must be at least 80 % of the one asked for.
link_up() {  # $1 = RTT ms, $2 = loss %
  bash "$LINKEM" up --delay $(($1 / 2)) --rate 1000 --loss "$2" >/dev/null 2>&1 &
  sleep 3
  local rtt; rtt=$(bash "$LINKEM" rtt | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
  if [ -z "$rtt" ] || [ "$(echo "$rtt < $1 * 0.8" | bc)" = 1 ]; then
    echo "link.sh: the link is not shaped (round trip ${rtt:-unknown} ms, $1 asked); see ../shared/tools/linkem/README.md" >&2
    exit 1
  fi
  # TCP's autotuned windows may grow to 64 MiB, more than the 100 ms path's 12.5 MB
  # bandwidth-delay product (the default 6 MiB would cap TCP, not the link).
  for ns in lem-a lem-b; do
    ip netns exec $ns sysctl -qw net.ipv4.tcp_congestion_control=bbr || true
    ip netns exec $ns sysctl -qw net.ipv4.tcp_rmem="4096 131072 67108864" net.ipv4.tcp_wmem="4096 16384 67108864"
  done
}

mbs() { echo "$SIZE * 1.048576 / $1" | bc -l; }

for rtt in ${RTTS-20 100}; do
  agent_config "$rtt"
  want=$SIZE_MIB; [ "$rtt" -ge 100 ] && want=$LONG_MIB
  [ "$SIZE" = "$want" ] || data_file "$want"
  for loss in ${LOSSES:-0 0.5 2 5}; do
    link_up "$rtt" "$loss"
    declare -A T=() L=()
    for _ in $(seq "$ROUNDS"); do
      T[tcp]+="$(run_tcp) "
      row bbr-bounded bbr-bounded
      row bbr bbr
      [ -n "${CONNS:-}" ] && row "bbr-bounded-x$CONNS" bbr-bounded "$CONNS"
      # cubic under loss crawls at about 1 MB/s (measured once: 64 MiB in 59 s); clean links only.
      [ "$loss" = 0 ] && row cubic cubic
    done
    echo "link: 1 Gbit/s, ${rtt} ms RTT, loss ${loss}%, ${SIZE} MiB, median of $ROUNDS"
    base=$(echo "${T[tcp]}" | tr ' ' '\n' | grep . | median)
    for row in tcp bbr-bounded bbr ${CONNS:+bbr-bounded-x$CONNS} cubic; do
      [ -n "${T[$row]:-}" ] || continue
      s=$(echo "${T[$row]}" | tr ' ' '\n' | grep . | median)
      slow=$(echo "${T[$row]}" | tr ' ' '\n' | grep . | sort -g | tail -1)
      fast=$(echo "${T[$row]}" | tr ' ' '\n' | grep . | sort -g | head -1)
      lost=$(echo "${L[$row]:-}" | tr ' ' '\n' | { grep . || true; } | median)
      printf '  %-18s %8.1f MB/s (%5.1f-%5.1f)  %5.2fx tcp  %4.2f of the link  %s\n' \
        "$([ $row = tcp ] && echo tcp-bbr || echo barge-$row)" "$(mbs "$s")" "$(mbs "$slow")" "$(mbs "$fast")" \
        "$(echo "$base / $s" | bc -l)" "$(echo "$(mbs "$s") / 125" | bc -l)" "${lost:+packets lost ${lost}%}"
    done
    unset T L
    bash "$LINKEM" down >/dev/null 2>&1
  done
done

# Fairness: a barge push and a TCP copy at once on the clean 20 ms link.
[ "${FAIR:-1}" = 0 ] && exit 0
agent_config 20
[ "$SIZE" = "$SIZE_MIB" ] || data_file "$SIZE_MIB"
link_up 20 0
for _ in $(seq "$ROUNDS"); do
  reset
  (sleep 0.7; NORESET=1 run_tcp) >"$WORK/fair-tcp" &  # as barge waits for its agent
  tcp=$!
  r=$(NORESET=1 run_barge bbr-bounded 1)
  wait $tcp
  tb=${r% *} tt=$(cat "$WORK/fair-tcp")
  printf '  fairness, clean 20 ms: barge %6.1f MB/s in %5.2f s, tcp %6.1f MB/s in %5.2f s (%.2f / %.2f of the link), barge packets lost %s%%\n' \
    "$(mbs "$tb")" "$tb" "$(mbs "$tt")" "$tt" "$(echo "$(mbs "$tb") / 125" | bc -l)" \
    "$(echo "$(mbs "$tt") / 125" | bc -l)" "${r#* }"
done
bash "$LINKEM" down >/dev/null 2>&1 || true
exit 0
