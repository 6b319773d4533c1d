#!/usr/bin/env bash
# The programs the test suite drives besides Python packages: Debian's Chromium (the dashboard
# is checked in a real headless browser), Prometheus with promtool (the scrape config is
# checked and a real Prometheus scrapes a running gateway), PostgreSQL (the shared registry
# is tested against a real server) and Redis (the shared quota counters are tested against a
# real server). Installed with apt when missing.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing+=(prometheus)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "installing ${missing[*]} with apt-get" >&2
"${sudo[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
