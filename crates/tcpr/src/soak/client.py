"""The soak's client: an independent peer for every connection.

Connects to each service address, sends a seeded pseudo-random stream on
each connection at a steady rate and checks that every byte the server
echoes back is the next byte of what was sent. Commands come on stdin, one
per line; answers are JSON lines on stdout:

  pause I    stop reading connection I (its window closes: a zero window)
  resume I   read it again
  shut I     stop sending on I and half-close it (shutdown(SHUT_WR))
  stats      print every connection's counters
  finish T   stop sending everywhere, wait up to T seconds for every echo,
             print the counters and exit

A connection's state is "ok" until something breaks it: "reset" (the
kernel reported ECONNRESET: a RST reached the client), "closed" (the
server's end closed), "corrupt" (an echoed byte differs from the one sent
at that offset: lost, duplicated or reordered data), "error" (anything
else). Usage: client.py SEED RATE_BYTES_PER_SEC PORT ADDR...
"""

import hashlib
import json
import os
import selectors
import socket
import sys
import time

BLOCK = 64  # bytes per blake2b block of the stream
CHUNK = 4096  # bytes per send
READ = 65536  # bytes per recv


def stream(seed, index, off, length):
    """Bytes [off, off+length) of connection INDEX's stream."""
    first, last = off // BLOCK, (off + length + BLOCK - 1) // BLOCK
    key = f"{seed}/{index}/".encode()
    data = b"".join(
        hashlib.blake2b(key + b.to_bytes(8, "little"), digest_size=BLOCK).digest()
        for b in range(first, last)
    )
    start = off - first * BLOCK
    return data[start : start + length]


class Conn:
    def __init__(self, index, sock, rate):
        self.index = index
        self.sock = sock
        self.rate = rate
        self.sent = 0
        self.verified = 0
        self.state = "ok"
        self.error = ""
        self.paused = False
        self.shut = False
        self.started = time.monotonic()
        self.base = 0

    def fail(self, state, error):
        if self.state == "ok":
            self.state, self.error = state, error

    def report(self):
        return {
            "index": self.index,
            "sent": self.sent,
            "verified": self.verified,
            "state": self.state,
            "error": self.error,
            "paused": self.paused,
            "shut": self.shut,
        }


def main():
    seed, rate, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    conns = []
    for i, addr in enumerate(sys.argv[4:]):
        s = socket.create_connection((addr, port), timeout=10)
        s.setblocking(False)
        conns.append(Conn(i, s, rate))
    print(json.dumps({"ready": len(conns)}), flush=True)

    sel = selectors.DefaultSelector()
    # Commands are read from fd 0 directly: a buffered readline could hold
    # a second line where select() no longer sees it.
    sel.register(0, selectors.EVENT_READ)
    pending = b""
    finishing_until = None
    sending = True
    while True:
        now = time.monotonic()
        for c in conns:
            if c.state != "ok" or not sending or c.shut:
                continue
            due = c.base + int((now - c.started) * c.rate)
            while c.sent < due:
                n = min(CHUNK, due - c.sent)
                try:
                    w = c.sock.send(stream(seed, c.index, c.sent, n))
                except BlockingIOError:
                    # The server's window is closed: the schedule waits.
                    c.base, c.started = c.sent, now
                    break
                except OSError as e:
                    c.fail("reset" if isinstance(e, ConnectionResetError) else "error", f"send: {e}")
                    break
                c.sent += w
            if c.sent >= due:
                pass
        for c in conns:
            if c.state != "ok" or c.paused:
                continue
            while True:
                try:
                    data = c.sock.recv(READ)
                except BlockingIOError:
                    break
                except OSError as e:
                    c.fail("reset" if isinstance(e, ConnectionResetError) else "error", f"recv: {e}")
                    break
                if not data:
                    c.fail("closed", f"the server closed the connection after {c.verified} bytes")
                    break
                if c.verified + len(data) > c.sent:
                    c.fail("corrupt", f"{c.verified + len(data) - c.sent} bytes more came back than were sent")
                    break
                want = stream(seed, c.index, c.verified, len(data))
                if data != want:
                    bad = next(k for k in range(len(data)) if data[k] != want[k])
                    c.fail("corrupt", f"echoed byte {c.verified + bad} differs from the one sent")
                    break
                c.verified += len(data)
        if finishing_until is not None:
            done = all(c.state != "ok" or c.verified == c.sent for c in conns)
            if done or time.monotonic() > finishing_until:
                for c in conns:
                    if c.state == "ok" and c.verified != c.sent:
                        c.fail("short", f"{c.sent - c.verified} bytes sent were never echoed")
                print(json.dumps({"conns": [c.report() for c in conns]}), flush=True)
                return
        lines = []
        for key, _ in sel.select(timeout=0.005):
            chunk = os.read(0, 4096)
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
        for line in lines:
            words = line.decode().split()
            if not words:
                continue
            cmd = words[0]
            if cmd == "stats":
                print(json.dumps({"conns": [c.report() for c in conns]}), flush=True)
            elif cmd == "finish":
                sending = False
                for c in conns:
                    c.paused = False
                finishing_until = time.monotonic() + float(words[1])
            else:
                c = conns[int(words[1])]
                if cmd == "pause":
                    c.paused = True
                elif cmd == "resume":
                    c.paused = False
                elif cmd == "shut" and not c.shut and c.state == "ok":
                    c.shut = True
                    try:
                        c.sock.shutdown(socket.SHUT_WR)
                    except OSError as e:
                        c.fail("error", f"shutdown: {e}")


if __name__ == "__main__":
    main()
