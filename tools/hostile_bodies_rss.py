#!/usr/bin/env python3
"""Resident memory of `ciyuan serve` while three clients post 30 MiB bodies at once
with a key that does not exist (issue 13, item 5). Usage:

    python3 tools/hostile_bodies_rss.py target/release/ciyuan

Starts the server on a fresh data directory, samples VmRSS every 10 ms from before
the posts until all three are answered, and prints the start and the peak. Standard
library only.
"""
import socket, subprocess, sys, threading, time, os, tempfile, re
binary = sys.argv[1]
d = tempfile.mkdtemp()
p = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0", "--data", d], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
url = None
for line in p.stdout:
    m = re.match(r"listening on http://(.*)", line.strip())
    if m: url = m.group(1); break
threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
host, port = url.split(":")
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
body = b"{" + b" " * (30 << 20) + b"}"
def post():
    s = socket.create_connection((host, int(port)))
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer cy_000000000000_{'0'*64}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    try:
        s.sendall(body)
    except OSError:
        pass
    try: s.recv(4096)
    except OSError: pass
    s.close()
time.sleep(0.5)
before = rss(); peak = before
ts = [threading.Thread(target=post) for _ in range(3)]
[t.start() for t in ts]
while any(t.is_alive() for t in ts):
    peak = max(peak, rss()); time.sleep(0.01)
peak = max(peak, rss())
p.kill()
print(f"{os.path.basename(binary)}: VmRSS before {before/1024:.1f} MiB, peak {peak/1024:.1f} MiB")
