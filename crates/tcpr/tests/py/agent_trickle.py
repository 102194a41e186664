#!/usr/bin/env python3
"""Unauthenticated clients that hold an agent's handshakes: each connects
and sends a TLS ClientHello one byte every --interval seconds (a record
header announcing 512 bytes, then zeros), never finishing it.

  agent_trickle.py --connect ADDR --port P --count N --interval S
                   --bytes B [--reconnect RATE]

Opens N connections at once (non-blocking) and prints "open N" once N
connections (replacements included) were established. A connection sends at most B bytes. One the agent
closes (end of stream, reset) is counted, with the bytes it had sent;
with --reconnect it is replaced (at most RATE new connections a second).
Without --reconnect it ends once every connection was closed by the agent
or sent all its bytes and waited 3 more intervals, printing a JSON line:
  {"closed": C, "finished": F, "sent_before_close": [..]}
With --reconnect it runs until "stop" on stdin, then prints the same JSON.
"""
import argparse, errno, json, os, resource, selectors, socket, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("--connect")
ap.add_argument("--port", type=int)
ap.add_argument("--count", type=int, default=1)
ap.add_argument("--interval", type=float, default=1.5)
ap.add_argument("--bytes", type=int, default=517)
ap.add_argument("--reconnect", type=float, default=0)
args = ap.parse_args()
want = args.count + 64
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))

HELLO = bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + bytes(512)
sel = selectors.DefaultSelector()
conns = {}
closed = 0
finished = 0
ups = 0
sent_before_close = []


def open_one():
    s = socket.socket(socket.AF_INET6 if ":" in args.connect else socket.AF_INET)
    s.setblocking(False)
    err = s.connect_ex((args.connect, args.port))
    if err not in (0, errno.EINPROGRESS):
        s.close()
        return False
    st = {"sock": s, "sent": 0, "next": time.monotonic(), "up": False, "done_at": None}
    conns[s.fileno()] = st
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, st)
    return True


def close(st, by_agent):
    global closed
    sel.unregister(st["sock"])
    del conns[st["sock"].fileno()]
    st["sock"].close()
    if by_agent:
        closed += 1
        sent_before_close.append(st["sent"])


for _ in range(args.count):
    open_one()
announced = False
stdin_open = True
if args.reconnect:
    sel.register(sys.stdin, selectors.EVENT_READ, None)
last_reopen = time.monotonic()
reopen_budget = 0.0
while True:
    now = time.monotonic()
    for key, ev in sel.select(timeout=0.05):
        st = key.data
        if st is None:
            if sys.stdin.readline().strip() in ("stop", ""):
                print(json.dumps({"closed": closed, "finished": finished,
                                  "sent_before_close": sent_before_close[:50]}), flush=True)
                sys.exit(0)
            continue
        if ev & selectors.EVENT_WRITE and not st["up"]:
            if st["sock"].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                close(st, True)
                continue
            st["up"] = True
            ups += 1
            sel.modify(st["sock"], selectors.EVENT_READ, st)
        if ev & selectors.EVENT_READ:
            try:
                d = st["sock"].recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                d = b""
            if not d:
                close(st, True)
    if not announced and ups >= args.count:
        announced = True
        print("open", args.count, flush=True)
    for st in list(conns.values()):
        if st["up"] and st["sent"] < args.bytes and now >= st["next"]:
            try:
                st["sock"].send(HELLO[st["sent"] % len(HELLO):][:1])
                st["sent"] += 1
            except BlockingIOError:
                pass
            except OSError:
                close(st, True)
                continue
            st["next"] = now + args.interval
            if st["sent"] == args.bytes:
                st["done_at"] = now
    if args.reconnect:
        reopen_budget = min(reopen_budget + (now - last_reopen) * args.reconnect, args.reconnect)
        last_reopen = now
        while len(conns) < args.count and reopen_budget >= 1:
            reopen_budget -= 1
            open_one()
    else:
        for st in list(conns.values()):
            if st["done_at"] is not None and now - st["done_at"] > 3 * args.interval:
                finished += 1
                close(st, False)
        if not conns:
            print(json.dumps({"closed": closed, "finished": finished,
                              "sent_before_close": sent_before_close}), flush=True)
            sys.exit(0)
