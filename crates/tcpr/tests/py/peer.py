#!/usr/bin/env python3
"""The client peer of the integration tests: plain sockets, written
independently of tcpr. It streams seeded random bytes to an echo service
and checks that every byte comes back, in order, unchanged.

Commands on stdin: "stall" (stop reading), "unstall", "progress" (print
"progress SENT RECEIVED [ERROR]": bytes handed to the socket and bytes
echoed back so far), "finish" (stop writing, wait for every echo, print a
JSON verdict and exit).
"""
import argparse, hashlib, json, random, select, socket, sys, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--connect", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--rate", type=int, default=1 << 20, help="bytes per second")
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--rcvbuf", type=int, help="SO_RCVBUF, to make a zero window easy to reach")
args = ap.parse_args()

fam = socket.AF_INET6 if ":" in args.connect else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if args.rcvbuf:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
s.settimeout(10)
s.connect((args.connect, args.port))
s.settimeout(None)
print("connected", s.getsockname()[1], flush=True)

rng = random.Random(args.seed)
sent = bytearray()
lock = threading.Lock()
state = {"stop": False, "stall": False, "recv": 0, "error": None, "max_gap": 0.0, "sha_recv": hashlib.sha256()}
sha_sent = hashlib.sha256()


def writer():
    start = time.monotonic()
    total = 0
    while not state["stop"]:
        due = int((time.monotonic() - start) * args.rate)
        if due <= total:
            # Pacing to --rate, not a wait for some state.
            time.sleep(0.002)
            continue
        chunk = rng.randbytes(min(due - total, 32768))
        with lock:
            sent.extend(chunk)
        sha_sent.update(chunk)
        try:
            s.sendall(chunk)
        except OSError as e:
            state["error"] = "send: %s" % e
            return
        total += len(chunk)


def reader():
    last = time.monotonic()
    while True:
        if state["stall"]:
            # Stalled on purpose (the peer's window must close); checks for
            # "unstall" between naps.
            time.sleep(0.01)
            last = time.monotonic()
            continue
        try:
            # select, not a socket timeout: the writer shares the socket.
            if not select.select([s], [], [], 0.05)[0]:
                if state["stop"] and state["recv"] >= len(sent):
                    return
                continue
            data = s.recv(65536)
        except OSError as e:
            state["error"] = "recv: %s" % e
            return
        if not data:
            state["error"] = "connection closed by the service"
            return
        now = time.monotonic()
        state["max_gap"] = max(state["max_gap"], now - last)
        last = now
        off = state["recv"]
        with lock:
            expect = bytes(sent[off:off + len(data)])
        if expect != data:
            state["error"] = "echo differs from what was sent at offset %d" % off
            return
        state["sha_recv"].update(data)
        state["recv"] = off + len(data)


tw = threading.Thread(target=writer, daemon=True)
tr = threading.Thread(target=reader, daemon=True)
tw.start()
tr.start()
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "stall":
        state["stall"] = True
    elif cmd == "unstall":
        state["stall"] = False
    elif cmd == "progress":
        with lock:
            n = len(sent)
        print("progress", n, state["recv"], state["error"] or "", flush=True)
    elif cmd == "finish":
        break
state["stop"] = True
tw.join()
deadline = time.monotonic() + 30
while state["recv"] < len(sent) and state["error"] is None and time.monotonic() < deadline:
    # Polls for the last echoes (the verdict reports any that never came).
    time.sleep(0.01)
print(json.dumps({
    "sent": len(sent),
    "received": state["recv"],
    "sha_sent": sha_sent.hexdigest(),
    "sha_received": state["sha_recv"].hexdigest(),
    "error": state["error"],
    "max_gap_ms": round(state["max_gap"] * 1000, 1),
}), flush=True)
