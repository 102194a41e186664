#!/usr/bin/env python3
"""A busy host's queues, for the evacuation tests (plain sockets).

  evacuate.py server --listen ADDR --port P --count N --buf BYTES
      accepts N connections, with both socket buffers forced to BYTES (so
      that a queue can outgrow the default limits), and echoes them; prints
      "ready N". "pause" on stdin hands every byte read to the kernel and
      stops touching the sockets ("paused").
  evacuate.py client --connect ADDR --port P --count N
      opens N connections with a small receive buffer, so that what the
      server echoes waits in the server's send queue. Commands on stdin:
        send K [BIG]  sends K seeded bytes on every connection (BIG on the
                      first instead), reading nothing; prints "sent" once
                      the server's kernel has acknowledged every byte;
        finish        reads and checks every echoed byte, sends 64 KiB more
                      on every connection and checks those too; prints a
                      JSON verdict.
"""
import argparse, fcntl, json, random, selectors, socket, struct, sys, termios, time

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
CLIENT_RCVBUF = 128 * 1024
AFTER_MOVE = 64 * 1024

ap = argparse.ArgumentParser()
ap.add_argument("role", choices=["server", "client"])
ap.add_argument("--connect")
ap.add_argument("--listen")
ap.add_argument("--port", type=int)
ap.add_argument("--count", type=int, default=1)
ap.add_argument("--buf", type=int, default=64 << 20)
ap.add_argument("--seed", type=int, default=11)
args = ap.parse_args()


def server():
    fam = socket.AF_INET6 if ":" in args.listen else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Inherited by accepted sockets; forcing needs CAP_NET_ADMIN.
    ls.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, args.buf)
    ls.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, args.buf)
    ls.bind((args.listen, args.port))
    ls.listen(4096)
    print("listening", flush=True)
    sel = selectors.DefaultSelector()
    conns = []
    while len(conns) < args.count:
        c, _ = ls.accept()
        c.setblocking(False)
        st = {"sock": c, "pending": bytearray()}
        conns.append(st)
        sel.register(c, selectors.EVENT_READ, st)
    ls.close()
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    print("ready", len(conns), flush=True)
    while True:
        for key, _ in sel.select(timeout=0.5):
            if key.data is None:
                cmd = sys.stdin.readline().strip()
                if cmd in ("pause", ""):
                    for st in conns:
                        st["sock"].setblocking(True)
                        st["sock"].sendall(st["pending"])
                        del st["pending"][:]
                    print("paused", flush=True)
                    # Hold the sockets untouched until killed.
                    while sys.stdin.readline():
                        pass
                    # Not a wait: holds the sockets until the test kills us.
                    time.sleep(3600)
                continue
            st = key.data
            try:
                data = st["sock"].recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(st["sock"])
                continue
            st["pending"].extend(data)
            try:
                n = st["sock"].send(st["pending"])
                del st["pending"][:n]
            except BlockingIOError:
                pass


def outq(sock):
    """Bytes not yet acknowledged by the peer's kernel (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def client():
    conns = []
    for i in range(args.count):
        fam = socket.AF_INET6 if ":" in args.connect else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        # Before connect: the window the server may fill stays small.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, args.buf)
        s.connect((args.connect, args.port))
        s.setblocking(False)
        conns.append({"sock": s, "rng": random.Random(args.seed * 100003 + i),
                      "sent": bytearray(), "recv": 0})
    print("connected", len(conns), flush=True)
    error = None

    def send_all(amounts, deadline):
        """Sends amounts[i] more bytes on connection i; False on timeout."""
        sel = selectors.DefaultSelector()
        todo = {}
        for st, k in zip(conns, amounts):
            data = st["rng"].randbytes(k)
            st["sent"].extend(data)
            todo[id(st)] = memoryview(data)
            sel.register(st["sock"], selectors.EVENT_WRITE, st)
        while todo and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                st = key.data
                buf = todo.get(id(st))
                if buf is None:
                    continue
                try:
                    n = st["sock"].send(buf[:1 << 20])
                except BlockingIOError:
                    continue
                buf = buf[n:]
                if len(buf):
                    todo[id(st)] = buf
                else:
                    del todo[id(st)]
                    sel.unregister(st["sock"])
        sel.close()
        return not todo

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "send":
            k = int(words[1])
            big = int(words[2]) if len(words) > 2 else k
            amounts = [big] + [k] * (len(conns) - 1)
            deadline = time.monotonic() + 300
            ok = send_all(amounts, deadline)
            # Every byte is in the server's kernel once acknowledged.
            while ok and any(outq(st["sock"]) for st in conns):
                if time.monotonic() > deadline:
                    ok = False
                    break
                # Poll interval of the wait for the acknowledgements.
                time.sleep(0.01)
            print("sent" if ok else "stuck", flush=True)
        elif words[0] == "finish":
            break

    # Read every echo, then send more after the move and read that too.
    sel = selectors.DefaultSelector()
    for st in conns:
        sel.register(st["sock"], selectors.EVENT_READ, st)

    def drain(deadline):
        nonlocal error
        while time.monotonic() < deadline and not error:
            if all(st["recv"] == len(st["sent"]) for st in conns):
                return
            for key, _ in sel.select(timeout=0.5):
                st = key.data
                try:
                    data = st["sock"].recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as e:
                    error = error or "recv: %s" % e
                    continue
                if not data:
                    error = error or "connection closed after %d of %d bytes" % (
                        st["recv"], len(st["sent"]))
                    sel.unregister(st["sock"])
                    continue
                off = st["recv"]
                if bytes(st["sent"][off:off + len(data)]) != data:
                    error = error or "echo differs at offset %d" % off
                st["recv"] = off + len(data)

    drain(time.monotonic() + 300)
    if not error:
        if not send_all([AFTER_MOVE] * len(conns), time.monotonic() + 60):
            error = "could not send after the move"
        drain(time.monotonic() + 60)
    print(json.dumps({
        "connections": len(conns),
        "sent": sum(len(st["sent"]) for st in conns),
        "received": sum(st["recv"] for st in conns),
        "complete": sum(1 for st in conns if st["recv"] == len(st["sent"]) > 0),
        "largest": max(len(st["sent"]) for st in conns),
        "error": error,
    }), flush=True)


server() if args.role == "server" else client()
