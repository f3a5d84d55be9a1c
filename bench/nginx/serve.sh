#!/usr/bin/env bash
# Runs the nginx provider and the nginx reverse proxy (nginx.sh) until interrupted, for
# measuring by hand, e.g. `ciyuan bench gateway --upstream URL --proxy URL`.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/nginx.sh"
nginx_start
trap nginx_stop EXIT
trap 'exit 0' INT TERM
echo "provider (direct): $UPSTREAM_URL"
echo "nginx proxy:       $PROXY_URL"
echo "files:             $NGINX_DIR (removed on exit); Ctrl-C stops both"
wait
