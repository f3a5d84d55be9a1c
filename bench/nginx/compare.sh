#!/usr/bin/env bash
# One command for issue 18's side-by-side measurement: starts the nginx provider and
# the nginx reverse proxy (nginx.sh), runs `ciyuan bench gateway` against them (direct,
# nginx proxy and Ciyuan alternating in 1 s slices), and stops them whatever happens.
# Extra arguments go to the bench, e.g. `--seconds 20` or `--json`.
#   cargo build --release -p ciyuan && bench/nginx/compare.sh
#   CIYUAN=/path/to/ciyuan bench/nginx/compare.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ciyuan="${CIYUAN:-$here/../../target/release/ciyuan}"
[ -x "$ciyuan" ] || { echo "compare.sh: no $ciyuan (cargo build --release -p ciyuan, or set CIYUAN)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "compare.sh: wrk not found (apt-get install wrk)" >&2; exit 1; }
source "$here/nginx.sh"
trap nginx_stop EXIT
nginx_start
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load average $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%Y-%m-%dT%H:%MZ)"
# Issue 18's rate for p99, unless the arguments name another.
rate=(--rate 10000)
for a in "$@"; do
    case "$a" in --rate|--rate=*) rate=() ;; esac
done
"$ciyuan" bench gateway --upstream "$UPSTREAM_URL" --proxy "$PROXY_URL" \
    --proxy-pid "${NGINX_PIDS##* }" "${rate[@]}" "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
