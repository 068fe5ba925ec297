#!/usr/bin/env bash
# The trials behind barge's all-or-nothing promise (root): real agents and senders
# killed with SIGKILL at random moments, deaths at failpoints inside the hand-over, a
# full disk (a 200 MiB loop file system), bytes flipped in staging, 8 clients x 8 jobs,
# a link that loses 5 % of packets (shared/tools/linkem) and a matrix of bad input.
# Prints a table: trial | count | passed | failed. About 20-25 minutes on 2 cores.
#
#   sudo benches/trials.sh
#   TRIALS_SCALE=0.1 benches/trials.sh          # a tenth of the counts (and smaller files)
#   TRIALS_ONLY=kills,failpoints,full,flips,many,lossy,bad benches/trials.sh
#   TRIALS_SEED=N benches/trials.sh             # repeat a run's random choices
#
# Everything it starts it stops: agents and pushes are killed when their trial ends,
# the loop file system is unmounted, the link's namespaces are removed, and its work
# folder (TRIALS_DIR, default /var/tmp/barge-trials) is deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "trials.sh: needs root (loop file system, network namespaces)"; exit 1; }
for tool in mkfs.ext4 mount fallocate ip iptables; do
  command -v "$tool" >/dev/null || { echo "trials.sh: needs $tool"; exit 1; }
done
export TRIALS_DIR=${TRIALS_DIR:-/var/tmp/barge-trials}
LINKEM=${LINKEM:-$PWD/../shared/tools/linkem/linkem}
cleanup() {
  pkill -f "barge agent --config $TRIALS_DIR" 2>/dev/null || true
  for m in $(grep -o "$TRIALS_DIR[^ ]*" /proc/mounts 2>/dev/null); do umount "$m" 2>/dev/null || true; done
  [ -f "$LINKEM" ] && bash "$LINKEM" down >/dev/null 2>&1 || true
  rm -rf "$TRIALS_DIR"
}
trap cleanup EXIT
cargo bench --bench trials --no-run --quiet 2>/dev/null
BIN=$(ls -t target/release/deps/trials-* | grep -v '\.d$' | head -1)
TRIALS_RUN=1 LINKEM=$LINKEM "$BIN"
