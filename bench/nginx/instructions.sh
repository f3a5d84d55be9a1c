#!/usr/bin/env bash
# Instructions a gateway request costs, by phase: `ciyuan serve` under callgrind in
# front of the nginx provider (nginx.sh), wrk at a few connections, instrumentation on
# only while wrk runs, and the inclusive counts of the functions that stand for each
# phase divided by the requests served. Counts, unlike times, do not move with this
# machine's neighbours, so a change to one phase shows as that phase's number moving.
# valgrind runs SHA-256's portable code (it hides the SHA instructions), so hashing
# counts far more here than it costs natively; it is listed on its own line. The
# ledger's and the projector's lines depend on how many entries a group holds, which
# follows the request rate: compare the request's own lines between builds.
# `--controls` measures the hostile tenant of `ciyuan bench gateway --controls
# --prices` (every control set from above, sixteen tags a request, every request
# rated and paid from a wallet; LiteLLM's table from ../shared/fixtures, or PRICES),
# set up by `ciyuan bench gateway --setup` on the gateway under callgrind.
#   cargo build --release -p ciyuan && bench/nginx/instructions.sh [SECONDS] [--controls]
#   CIYUAN=/path/to/ciyuan bench/nginx/instructions.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ciyuan="${CIYUAN:-$here/../../target/release/ciyuan}"
seconds=10
controls=""
for a in "$@"; do
    case "$a" in
        --controls) controls=1 ;;
        *[!0-9]*|"") echo "instructions.sh: unknown argument $a ([SECONDS] [--controls])" >&2; exit 2 ;;
        *) seconds="$a" ;;
    esac
done
prices="${PRICES:-$here/../../../shared/fixtures/litellm_model_prices.json}"
[ -z "$controls" ] || [ -f "$prices" ] || { echo "instructions.sh: no price table at $prices (set PRICES)" >&2; exit 1; }
for tool in valgrind callgrind_control callgrind_annotate wrk curl python3; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool not found" >&2; exit 1; }
done
[ -x "$ciyuan" ] || { echo "instructions.sh: no $ciyuan (cargo build --release -p ciyuan, or set CIYUAN)" >&2; exit 1; }
source "$here/nginx.sh"
dir="$(mktemp -d "${TMPDIR:-/tmp}/ciyuan-instructions-XXXXXX")"
serve_pid=""
cleanup() {
    [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
    nginx_stop
    rm -rf "$dir"
}
trap cleanup EXIT
nginx_start
printf '[[providers]]\nname = "upstream"\nprotocol = "openai"\nbase_url = "%s"\nmodels = ["*"]\n' \
    "$UPSTREAM_URL" > "$dir/gateway.toml"
admin="cy_$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')_$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port="$(nginx_free_port)"
CIYUAN_LOG=warn CIYUAN_BOOTSTRAP_ADMIN_KEY="$admin" valgrind --tool=callgrind \
    --instr-atstart=no --callgrind-out-file="$dir/callgrind.out" \
    "$ciyuan" --config "$dir/gateway.toml" serve --listen "127.0.0.1:$port" --data "$dir/data" \
    > "$dir/serve.log" 2>&1 &
serve_pid=$!
gw="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "$gw/healthz" 2>/dev/null && break
    sleep 0.1
done
# The tenant, as `ciyuan bench gateway` sets it up: its key and its requests' headers.
setup=(bench gateway --setup "$gw")
[ -n "$controls" ] && setup+=(--controls --prices "$prices")
CIYUAN_KEY="$admin" "$ciyuan" "${setup[@]}" > "$dir/tenant.json"
python3 - "$dir/tenant.json" > "$dir/chat.lua" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
print('wrk.method = "POST"')
print("""wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello to the benchmark."}],"max_tokens":32}'""")
print('wrk.headers["Content-Type"] = "application/json"')
for name, value in [("Authorization", "Bearer " + t["key"])] + sorted(t["headers"].items()):
    print(f'wrk.headers["{name}"] = [==[{value}]==]')
EOF
# Warm: vocabularies, pools, caches, the first ledger segment.
wrk -t1 -c4 -d3s -s "$dir/chat.lua" "$gw/v1/chat/completions" > /dev/null
callgrind_control -i on "$serve_pid" > /dev/null
wrk -t1 -c4 -d"${seconds}s" -s "$dir/chat.lua" "$gw/v1/chat/completions" > "$dir/wrk.txt"
callgrind_control -i off "$serve_pid" > /dev/null
# The ledger and projector finish the last group before the counts are written.
sleep 2
callgrind_control -d "$serve_pid" > /dev/null
sleep 1
requests="$(grep -oE '^ *[0-9]+ requests in' "$dir/wrk.txt" | grep -oE '[0-9]+')"
out="$(ls -S "$dir"/callgrind.out.* | head -1)"
[ -n "${KEEP:-}" ] && cp "$out" "$KEEP"
echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores; $("$ciyuan" --version 2>/dev/null || echo ciyuan); $requests requests at 4 connections under callgrind; tenant: $([ -n "$controls" ] && echo "hostile (--controls --prices)" || echo "a key on a bare node")"
callgrind_annotate --inclusive=yes --threshold=100 "$out" 2>/dev/null | python3 -c '
import re, sys
requests = int(sys.argv[1])
# Phase: the functions whose inclusive count stands for it, the largest found (each
# its largest line: a function inlined into several places has a line for each). The
# release profile optimises the binary as one unit, and some functions are inlined
# into their callers: a phase then stands on the function within it that is left.
phases = [
    ("all threads, in all", []),
    ("the request (serve_call)", ["ciyuan_server::gateway::serve_call::{{closure}}"]),
    ("  reading the request", ["ciyuan_server::gateway::request::inspect",
        "<ciyuan_server::gateway::request::_::<impl serde_core::de::Deserialize for ciyuan_server::gateway::request::Request>::deserialize::__Visitor as serde_core::de::Visitor>::visit_map"]),
    ("  the caller (key)", ["ciyuan_server::gateway::caller::{{closure}}", "ciyuan_server::App::caller::{{closure}}"]),
    ("  the provider call (hyper client)", ["ciyuan_server::gateway::upstream::Clients::request::{{closure}}"]),
    ("  reading the answer", ["ciyuan_server::gateway::protocol::read_answer",
        "<ciyuan_server::gateway::openai::Chat as ciyuan_server::gateway::protocol::Wire>::read_answer_typed"]),
    ("hyper server connection", ["<hyper_util::server::graceful::GracefulConnectionFuture<C,F> as core::future::future::Future>::poll"]),
    ("metering and the entry (record_call)", ["ciyuan_server::gateway::meter::record_call::{{closure}}",
        "ciyuan_server::gateway::meter::Finishing::run::{{closure}}",
        "ciyuan_server::gateway::meter::finish::{{closure}}"]),
    ("counting (admission, recount)", ["ciyuan_measure::text::Encoding::count"]),
    ("the recorder task", ["ciyuan_server::gateway::record::recorder::{{closure}}"]),
    ("  the ledger append", ["<ciyuan_ledger::group::GroupCommitter as ciyuan_store::log::Log>::append",
        "ciyuan_ledger::group::GroupCommitter::append"]),
    ("the ledger writer thread", ["ciyuan_ledger::group::writer"]),
    ("the projector", ["ciyuan_server::pipeline::run", "ciyuan_server::pipeline::run::{{closure}}",
        "ciyuan_server::pipeline::project_reusing"]),
    ("  SQLite parsing statements", ["sqlite3Prepare"]),
    ("memcpy and memmove, all threads", ["__memcpy_avx_unaligned_erms", "__memmove_avx_unaligned_erms",
        "__memmove_avx512_unaligned_erms", "__memcpy_avx512_unaligned_erms"]),
    ("SHA-256 (portable under valgrind)", ["sha2::sha256::compress256"]),
]
best = {}
for line in sys.stdin:
    if "PROGRAM TOTALS" in line:
        best["all threads, in all"] = int(line.split()[0].replace(",", ""))
        continue
    m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(?:\* )?[^:]*:(.*?)(?: \[[^\]]*\])?$", line)
    if not m:
        continue
    n, function = int(m.group(1).replace(",", "")), m.group(2)
    for name, pats in phases:
        if function in pats and n > best.get(name, -1):
            best[name] = n
for name, _ in phases:
    v = best.get(name)
    print(f"  {name:40s} " + (f"{v / requests / 1000:8.1f} k instructions a request" if v else "       - (not found)"))
' "$requests"
