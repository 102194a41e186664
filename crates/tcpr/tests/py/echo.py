#!/usr/bin/env python3
"""An echo service of the integration tests: plain sockets. It serves one
connection, accepted (--listen) or inherited on fd 3 from `tcpr restore`
(LISTEN_FDS). On "pause" (stdin) it stops touching the socket, writes the
bytes it read but could not yet send to --state (they travel as the image's
application blob) and answers "paused FD"; "resume" then carries on.
Restored, it takes the bytes back from TCPR_APP_BLOB_FD and sends them
first.
"""
import argparse, os, selectors, socket, sys

ap = argparse.ArgumentParser()
ap.add_argument("--listen")
ap.add_argument("--port", type=int)
ap.add_argument("--state")
ap.add_argument("--no-control", action="store_true", help="ignore stdin (run by an agent)")
args = ap.parse_args()

if args.listen:
    fam = socket.AF_INET6 if ":" in args.listen else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.listen, args.port))
    ls.listen(1)
    print("listening", flush=True)
    conn, _ = ls.accept()
    ls.close()
else:
    assert os.environ.get("LISTEN_FDS") == "1", "expected one socket from tcpr restore"
    assert os.environ.get("LISTEN_PID") == str(os.getpid()), "LISTEN_PID is not ours"
    conn = socket.socket(fileno=3)

conn.setblocking(False)
pending = bytearray()
if "TCPR_APP_BLOB_FD" in os.environ:
    with os.fdopen(int(os.environ["TCPR_APP_BLOB_FD"]), "rb") as f:
        pending.extend(f.read())
    assert len(pending) == int(os.environ["TCPR_APP_BLOB_LEN"])
print("ready", conn.fileno(), flush=True)

sel = selectors.DefaultSelector()
if not args.no_control:
    sel.register(sys.stdin, selectors.EVENT_READ, "ctl")
sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, "conn")
eof = False
while True:
    want = 0
    if len(pending) < (1 << 20) and not eof:
        want |= selectors.EVENT_READ
    if pending:
        want |= selectors.EVENT_WRITE
    if want:
        sel.modify(conn, want, "conn")
    else:
        sel.unregister(conn)
    for key, ev in sel.select(timeout=0.5 if want else 0.05):
        if key.data == "ctl":
            cmd = sys.stdin.readline().strip()
            if cmd == "flush":
                # Hand every byte read to the kernel, then stop: nothing is
                # left in this process, the socket's queues hold it all.
                conn.setblocking(True)
                conn.sendall(pending)
                del pending[:]
                conn.setblocking(False)
                cmd = "pause"
            if cmd == "pause" or cmd == "":
                if args.state:
                    with open(args.state, "wb") as f:
                        f.write(pending)
                print("paused", conn.fileno(), flush=True)
                # Wait: "resume" carries on (after a snapshot), EOF exits.
                if sys.stdin.readline().strip() != "resume":
                    sys.exit(0)
                print("resumed", flush=True)
            continue
        if ev & selectors.EVENT_READ:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                data = None
            if data == b"":
                eof = True
            elif data:
                pending.extend(data)
        if ev & selectors.EVENT_WRITE and pending:
            try:
                n = conn.send(pending)
                del pending[:n]
            except BlockingIOError:
                pass
    if not want:
        sel.register(conn, selectors.EVENT_READ, "conn")
