# Sourced by compare.sh and serve.sh (bash). nginx_start starts the fixed-answer
# provider (upstream.conf) and the plain reverse proxy in front of it (proxy.conf) on
# free loopback ports, as children of the calling shell (`daemon off`, so the shell
# reaps them), with every file in a new temporary directory: no system configuration is
# read or touched. It sets
#   NGINX_DIR     the directory
#   UPSTREAM_URL  the provider's OpenAI base URL (ending in /v1)
#   PROXY_URL     the same provider behind the proxy
#   NGINX_PIDS    the two master processes
# nginx_stop stops both, waits for them and removes the directory (every step may
# fail without stopping it: it runs from EXIT traps of `set -e` scripts).
# NGINX_WORKERS sets worker_processes of both (default: auto, one per core).

nginx_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Taken by a socket in any state: a port an outgoing connection holds cannot be bound.
nginx_port_taken() { ss -Htan "sport = :$1" | grep -q .; }

# Below the kernel's range of ephemeral ports, which the benchmark's own client
# connections (and everyone else's) draw from.
nginx_free_port() {
    local p low
    low="$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)"
    for _ in $(seq 1 200); do
        p=$((10000 + RANDOM % (low - 10000)))
        if ! nginx_port_taken "$p" && [ "$p" != "${1:-}" ]; then echo "$p"; return 0; fi
    done
    echo "nginx.sh: no free port found" >&2
    return 1
}

nginx_start() {
    local nginx conf port up_port proxy_port workers
    nginx="${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
    if [ ! -x "$nginx" ]; then
        echo "nginx.sh: nginx not found (apt-get install nginx, or set NGINX)" >&2
        return 1
    fi
    NGINX_DIR="$(mktemp -d "${TMPDIR:-/tmp}/ciyuan-nginx-XXXXXX")"
    mkdir -p "$NGINX_DIR/tmp"
    # nginx started as root serves from unprivileged workers: they must reach it.
    chmod 755 "$NGINX_DIR"
    up_port="$(nginx_free_port)" || return 1
    proxy_port="$(nginx_free_port "$up_port")" || return 1
    workers="${NGINX_WORKERS:-auto}"
    NGINX_PIDS=""
    for conf in upstream proxy; do
        sed -e "s|__DIR__|$NGINX_DIR|g" -e "s|__WORKERS__|$workers|g" \
            -e "s|__UPSTREAM_PORT__|$up_port|g" -e "s|__PROXY_PORT__|$proxy_port|g" \
            "$nginx_here/$conf.conf" > "$NGINX_DIR/$conf.conf"
        "$nginx" -p "$NGINX_DIR" -c "$NGINX_DIR/$conf.conf" -e "$NGINX_DIR/$conf-error.log" \
            -g 'daemon off;' &
        NGINX_PIDS="$NGINX_PIDS $!"
    done
    UPSTREAM_URL="http://127.0.0.1:$up_port/v1"
    PROXY_URL="http://127.0.0.1:$proxy_port/v1"
    # Both answer before the URLs are used.
    for port in "$up_port" "$proxy_port"; do
        for _ in $(seq 1 100); do
            if curl -fsS -o /dev/null -X POST -d '{}' "http://127.0.0.1:$port/v1/chat/completions" 2>/dev/null; then
                continue 2
            fi
            sleep 0.05
        done
        echo "nginx.sh: nginx on port $port did not answer (see $NGINX_DIR/*-error.log)" >&2
        return 1
    done
}

nginx_stop() {
    local pid
    # TERM, not QUIT: a shell starts background commands with SIGQUIT ignored, so a
    # QUIT sent before nginx installed its handlers (a start that failed half-way) was
    # lost and left that nginx running.
    for pid in $NGINX_PIDS; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $NGINX_PIDS; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    NGINX_PIDS=""
    case "${NGINX_DIR:-}" in
        */ciyuan-nginx-*) rm -rf "$NGINX_DIR" ;;
    esac
}
