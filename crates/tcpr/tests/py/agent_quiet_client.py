#!/usr/bin/env python3
"""A client that only listens: connects to --connect ADDR --port P, prints
"connected"; on each "read" (stdin) it waits up to --wait seconds for the
server and prints what came: "data N", "eof" (a FIN: a clean end of
stream), "reset", or "silent" (nothing at all)."""
import argparse, socket, sys

ap = argparse.ArgumentParser()
ap.add_argument("--connect")
ap.add_argument("--port", type=int)
ap.add_argument("--wait", type=float, default=3.0)
args = ap.parse_args()
s = socket.create_connection((args.connect, args.port))
print("connected", flush=True)
for line in sys.stdin:
    if line.strip() != "read":
        continue
    s.settimeout(args.wait)
    try:
        d = s.recv(65536)
        print("data %d" % len(d) if d else "eof", flush=True)
    except socket.timeout:
        print("silent", flush=True)
    except ConnectionResetError:
        print("reset", flush=True)
