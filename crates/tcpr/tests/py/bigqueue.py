#!/usr/bin/env python3
"""A server that queues a large response at once, and its client: plain
sockets, written independently of tcpr. The response is seeded random
bytes both ends regenerate, so every byte is checked.

--role server: accepts one connection, forces its send buffer large
  (SO_SNDBUFFORCE: run it privileged), hands the whole response to the
  kernel and prints "written FD"; then waits for stdin to close without
  touching the socket (a dump can run).
--role client: connects with a small receive buffer and reads nothing
  until "read" arrives on stdin; then reads the response and prints a JSON
  verdict.
"""
import argparse, hashlib, json, socket, sys

SO_SNDBUFFORCE = 32

ap = argparse.ArgumentParser()
ap.add_argument("--role", choices=["client", "server"], required=True)
ap.add_argument("--addr", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--bytes", type=int, required=True)
args = ap.parse_args()


def response():
    # Fast to regenerate on both ends: SHA-256 in counter mode.
    out = bytearray()
    i = 0
    while len(out) < args.bytes:
        out.extend(hashlib.sha256(i.to_bytes(8, "big")).digest() * 64)
        i += 1
    return bytes(out[:args.bytes])


RESPONSE = response()

if args.role == "server":
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.addr, args.port))
    ls.listen(1)
    print("listening", flush=True)
    conn, _ = ls.accept()
    conn.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 * args.bytes)
    conn.setblocking(False)
    sent = conn.send(RESPONSE)
    assert sent == len(RESPONSE), "the whole response fits the forced buffer"
    print("written", conn.fileno(), flush=True)
    sys.stdin.read()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.connect((args.addr, args.port))
    print("connected", flush=True)
    assert sys.stdin.readline().strip() == "read"
    s.settimeout(60)
    got = bytearray()
    error = None
    try:
        while len(got) < len(RESPONSE):
            data = s.recv(1 << 20)
            if not data:
                error = "EOF after %d bytes" % len(got)
                break
            got.extend(data)
    except OSError as e:
        error = "recv: %s" % e
    print(json.dumps({
        "received": len(got),
        "expected": len(RESPONSE),
        "intact": bytes(got) == RESPONSE,
        "error": error,
    }), flush=True)
