#!/usr/bin/env bash
# The Debian package as an operator meets it, on this machine (root; it installs and
# removes the package): `apt-get install ./barge_*.deb`, then the binary, the units
# (systemd-analyze verify and security <= 2.0), the barge user, the man page, the
# conffile kept on reinstall, and removal and purge that keep /var/lib/barge.
#   sudo tests/package.sh target/debian/barge_*.deb
# .ci/run runs it after building the package with systemd/deb/build.
set -euo pipefail
deb="$(realpath "${1:?usage: tests/package.sh PATH/TO/barge_VERSION_ARCH.deb}")"
export DEBIAN_FRONTEND=noninteractive
fail() { echo "package: FAILED: $*" >&2; exit 1; }
ok() { echo "package: ok: $*"; }

apt-get install -y -qq "$deb" >/dev/null
barge --version | grep -q '^barge [0-9]' || fail "barge --version"
ok "installed: $(barge --version)"

units=(/lib/systemd/system/barge.service /lib/systemd/system/barge.socket
       /lib/systemd/system/barge-zdb-sync.service /lib/systemd/system/barge-zdb-sync.timer)
out="$(systemd-analyze verify "${units[@]}" 2>&1)" || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify printed: $out"
ok "systemd-analyze verify: clean"
level="$(systemd-analyze security --offline=true --no-pager /lib/systemd/system/barge.service 2>&1 |
         sed -n 's/.*Overall exposure level for barge.service: \([0-9.]*\).*/\1/p')"
[ -n "$level" ] || fail "no exposure level from systemd-analyze security"
awk -v l="$level" 'BEGIN { exit !(l <= 2.0) }' || fail "exposure $level > 2.0"
ok "systemd-analyze security: exposure $level"

id barge >/dev/null 2>&1 || fail "no user barge"
[ "$(getent passwd barge | cut -d: -f6,7)" = "/var/lib/barge:/usr/sbin/nologin" ] ||
  fail "user barge: $(getent passwd barge)"
[ "$(stat -c '%U %a' /var/lib/barge)" = "barge 700" ] || fail "/var/lib/barge: $(stat -c '%U %a' /var/lib/barge)"
ok "user barge, /var/lib/barge owned by it, mode 700"

man -P cat barge 2>/dev/null | grep -q "barge-push" || fail "man barge does not show the page"
man -P cat barge-push 2>/dev/null | grep -q -- "--to" || fail "man barge-push"
[ -s /usr/share/bash-completion/completions/barge ] || fail "bash completion"
ok "man barge, man barge-push, completions"

dpkg-query -W -f='${Conffiles}' barge | grep -q '/etc/barge/barge.toml' || fail "barge.toml is no conffile"
echo "# edited by the operator" >> /etc/barge/barge.toml
apt-get install -y -qq --reinstall "$deb" >/dev/null
grep -q "edited by the operator" /etc/barge/barge.toml || fail "reinstall overwrote the edited config"
ok "the edited config survives a reinstall"

echo "staged data" > /var/lib/barge/keep-me
apt-get remove -y -qq barge >/dev/null
[ ! -e /usr/bin/barge ] || fail "remove left /usr/bin/barge"
[ -f /var/lib/barge/keep-me ] || fail "remove deleted /var/lib/barge"
[ -f /etc/barge/barge.toml ] || fail "remove deleted the config"
ok "remove keeps /var/lib/barge and the config"
apt-get install -y -qq "$deb" >/dev/null
apt-get purge -y -qq barge >/dev/null
[ -f /var/lib/barge/keep-me ] || fail "purge deleted /var/lib/barge"
[ ! -e /etc/barge/barge.toml ] || fail "purge left the config"
ok "purge removes the config and keeps /var/lib/barge"
rm -f /var/lib/barge/keep-me
echo "package: all checks passed"
