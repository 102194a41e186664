#!/usr/bin/env python3
"""Many connections at once, for the batch handoff tests (plain sockets).

  many.py peer --connect ADDR --port P --count N
      opens N connections, sends seeded random bytes on all of them and
      checks every echoed byte; "finish" on stdin stops sending, waits for
      every echo and prints a JSON verdict; "mark" notes how far each
      connection got; "progress" prints "progress K [ERROR]", K the
      connections with echoes since the last mark (or the start).
  many.py echo --listen ADDR --port P --count N
      accepts N connections and echoes them; "flush" on stdin hands every
      byte read to the kernel and stops touching the sockets ("paused");
      "resume" carries on.
  many.py echo --unix PATH
      takes connections delivered by `tcpr agent --unix PATH` (fd passing)
      and echoes them; prints "got K" as they arrive.
"""
import argparse, json, os, random, selectors, socket, struct, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("role", choices=["peer", "echo"])
ap.add_argument("--connect")
ap.add_argument("--listen")
ap.add_argument("--unix")
ap.add_argument("--port", type=int)
ap.add_argument("--count", type=int, default=1)
ap.add_argument("--seed", type=int, default=7)
args = ap.parse_args()
sel = selectors.DefaultSelector()


def peer():
    rng = random.Random(args.seed)
    conns = []
    for _ in range(args.count):
        s = socket.create_connection((args.connect, args.port))
        s.setblocking(False)
        st = {"sock": s, "sent": bytearray(), "recv": 0, "mark": 0}
        conns.append(st)
        sel.register(s, selectors.EVENT_READ, st)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    print("connected", len(conns), flush=True)
    error = None
    stop = False
    turn = 0
    last_send = 0.0
    deadline = None
    ctl = b""
    while True:
        now = time.monotonic()
        if not stop and now - last_send > 0.002:
            # A few connections per round, 1 KiB each.
            for _ in range(8):
                st = conns[turn % len(conns)]
                turn += 1
                chunk = rng.randbytes(1024)
                try:
                    n = st["sock"].send(chunk)
                except BlockingIOError:
                    n = 0
                except OSError as e:
                    error = error or "send: %s" % e
                    n = 0
                st["sent"].extend(chunk[:n])
            last_send = now
        for key, _ in sel.select(timeout=0.002):
            if key.data is None:
                # os.read, not readline: lines that arrive together must not
                # wait in Python's buffer, where select cannot see them.
                chunk = os.read(sys.stdin.fileno(), 4096)
                ctl += chunk if chunk else b"finish\n"
                while b"\n" in ctl and not stop:
                    raw, ctl = ctl.split(b"\n", 1)
                    line = raw.decode().strip()
                    if line == "mark":
                        for st in conns:
                            st["mark"] = st["recv"]
                    elif line == "progress":
                        flowing = sum(1 for st in conns if st["recv"] > st["mark"])
                        print("progress", flowing, error or "", flush=True)
                    elif line in ("finish", ""):
                        stop = True
                        deadline = time.monotonic() + 30
                        sel.unregister(sys.stdin)
                continue
            st = key.data
            try:
                data = st["sock"].recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                error = error or "recv: %s" % e
                sel.unregister(st["sock"])
                continue
            if not data:
                error = error or "connection closed"
                sel.unregister(st["sock"])
                continue
            off = st["recv"]
            if bytes(st["sent"][off:off + len(data)]) != data:
                error = error or "echo differs at offset %d" % off
            st["recv"] = off + len(data)
        if stop:
            done = all(st["recv"] == len(st["sent"]) for st in conns)
            if done or error or time.monotonic() > deadline:
                break
    print(json.dumps({
        "connections": len(conns),
        "sent": sum(len(st["sent"]) for st in conns),
        "received": sum(st["recv"] for st in conns),
        "complete": sum(1 for st in conns if st["recv"] == len(st["sent"]) and len(st["sent"]) > 0),
        "error": error,
    }), flush=True)


def add(conn, pending_init=b""):
    conn.setblocking(False)
    st = {"sock": conn, "pending": bytearray(pending_init)}
    st["mask"] = selectors.EVENT_READ
    sel.register(conn, st["mask"], st)
    if st["pending"]:
        want(st)
    return st


def want(st):
    """Select for writing only while bytes wait: no busy loop."""
    mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if st["pending"] else 0)
    if mask != st["mask"]:
        st["mask"] = mask
        sel.modify(st["sock"], mask, st)


def recv_delivery(u):
    """One message of tcpr's unix delivery protocol, with its fd; answers
    the acknowledgement byte once it holds the connection."""
    fd = None
    buf = bytearray()

    def need(n):
        nonlocal fd
        while len(buf) < n:
            data, fds, _, _ = socket.recv_fds(u, 65536, 1)
            if fds:
                fd = fds[0]
            if not data:
                raise EOFError("delivery message cut short")
            buf.extend(data)

    need(10)
    assert buf[:8] == b"TCPR-FD1", buf[:8]
    (ll,) = struct.unpack(">H", buf[8:10])
    need(10 + ll + 2)
    i = 10 + ll
    (pl,) = struct.unpack(">H", buf[i:i + 2])
    need(i + 2 + pl + 4)
    i += 2 + pl
    (bl,) = struct.unpack(">I", buf[i:i + 4])
    need(i + 4 + bl)
    blob = bytes(buf[i + 4:i + 4 + bl])
    assert fd is not None, "no fd attached"
    u.sendall(b"k")
    return socket.socket(fileno=fd), blob


def echo():
    conns = []
    listener = None
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.unix)
        listener.listen(1024)
        sel.register(listener, selectors.EVENT_READ, "unix")
        print("listening", flush=True)
    else:
        fam = socket.AF_INET6 if ":" in args.listen else socket.AF_INET
        ls = socket.socket(fam, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((args.listen, args.port))
        ls.listen(4096)
        print("listening", flush=True)
        while len(conns) < args.count:
            c, _ = ls.accept()
            conns.append(add(c))
        ls.close()
        print("ready", len(conns), flush=True)
    sel.register(sys.stdin, selectors.EVENT_READ, "ctl")
    while True:
        for key, ev in sel.select(timeout=0.5):
            if key.data == "unix":
                u, _ = listener.accept()
                try:
                    sock, blob = recv_delivery(u)
                except EOFError:
                    # The agent checking that we listen: carries nothing.
                    u.close()
                    continue
                u.close()
                conns.append(add(sock, blob))
                print("got", len(conns), flush=True)
                continue
            if key.data == "ctl":
                cmd = sys.stdin.readline().strip()
                if cmd in ("flush", ""):
                    for st in conns:
                        st["sock"].setblocking(True)
                        st["sock"].sendall(st["pending"])
                        del st["pending"][:]
                    print("paused", flush=True)
                    if sys.stdin.readline().strip() != "resume":
                        sys.exit(0)
                    for st in conns:
                        st["sock"].setblocking(False)
                    print("resumed", flush=True)
                continue
            st = key.data
            if ev & selectors.EVENT_READ and len(st["pending"]) < (1 << 20):
                try:
                    data = st["sock"].recv(65536)
                    if data:
                        st["pending"].extend(data)
                    else:
                        sel.unregister(st["sock"])
                        continue
                except (BlockingIOError, ConnectionError):
                    pass
            if st["pending"]:
                try:
                    n = st["sock"].send(st["pending"])
                    del st["pending"][:n]
                except (BlockingIOError, ConnectionError):
                    pass
            want(st)


peer() if args.role == "peer" else echo()
