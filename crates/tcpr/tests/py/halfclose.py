#!/usr/bin/env python3
"""Both ends of a half-closed request/response exchange, for the restore
tests of CLOSE_WAIT, LAST_ACK and CLOSING: plain sockets, written
independently of tcpr. The request and the response are seeded random
bytes both ends can regenerate, so every byte is checked.

--role client: connects; commands on stdin: "request" (send the request,
  print "requested LEN SHA"),
  "shut" (shutdown the sending side), "verdict" (wait for the response's
  EOF and print a JSON verdict). It reads the response all along, at
  --rate bytes per second.
--role server: serves one connection, accepted (--listen) or inherited on
  fd 3 (LISTEN_FDS, from tcpr restore or an agent). Commands on stdin:
  "read" (read the request until EOF, print "request LEN SHA"), "respond"
  (hand the whole response to the kernel, print "written"), "shut"
  (shutdown the sending side, print "shut"). While it waits for a command
  it does not touch the socket (a dump can run). Inherited (--restored),
  it reads the rest of the request until EOF, prints "request LEN SHA",
  shuts its sending side (a no-op when the socket already did) and exits.
"""
import argparse, errno, hashlib, json, os, random, socket, sys, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--role", choices=["client", "server"], required=True)
ap.add_argument("--connect")
ap.add_argument("--listen")
ap.add_argument("--port", type=int)
ap.add_argument("--restored", action="store_true")
ap.add_argument("--request", type=int, default=100_000, help="request bytes")
ap.add_argument("--response", type=int, default=1 << 20, help="response bytes")
ap.add_argument("--rate", type=int, default=1 << 30, help="client read rate, bytes/s")
args = ap.parse_args()

REQUEST = random.Random(1).randbytes(args.request)
RESPONSE = random.Random(2).randbytes(args.response)


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def client():
    s = socket.socket(family(args.connect), socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect((args.connect, args.port))
    s.settimeout(None)
    print("connected", s.getsockname()[1], flush=True)
    state = {"received": 0, "eof": False, "error": None, "sha": hashlib.sha256(), "match": True}

    def reader():
        start = time.monotonic()
        while True:
            due = (time.monotonic() - start) * args.rate
            if state["received"] > due:
                # Pacing reads to --rate, not a wait for some state.
                time.sleep(0.005)
                continue
            try:
                data = s.recv(16384)
            except OSError as e:
                state["error"] = "recv: %s" % e
                return
            if not data:
                state["eof"] = True
                return
            off = state["received"]
            if RESPONSE[off:off + len(data)] != data:
                state["match"] = False
            state["sha"].update(data)
            state["received"] = off + len(data)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "request":
            s.sendall(REQUEST)
            print("requested", len(REQUEST), hashlib.sha256(REQUEST).hexdigest(), flush=True)
        elif cmd == "shut":
            s.shutdown(socket.SHUT_WR)
            print("shut", flush=True)
        elif cmd == "verdict":
            t.join(60)
            print(json.dumps({
                "received": state["received"],
                "expected": len(RESPONSE),
                "intact": state["match"] and state["sha"].hexdigest() == hashlib.sha256(RESPONSE).hexdigest(),
                "eof": state["eof"],
                "error": state["error"],
            }), flush=True)
            return


def read_request(conn):
    got = bytearray()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        got.extend(data)
    print("request", len(got), hashlib.sha256(got).hexdigest(), flush=True)
    return got


def server():
    if args.restored:
        assert os.environ.get("LISTEN_FDS") == "1", "expected one socket"
        conn = socket.socket(fileno=3)
        read_request(conn)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError as e:
            # Both FINs were already acknowledged: the close is complete.
            if e.errno != errno.ENOTCONN:
                raise
        return
    ls = socket.socket(family(args.listen), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.listen, args.port))
    ls.listen(1)
    print("listening", flush=True)
    conn, _ = ls.accept()
    ls.close()
    print("ready", conn.fileno(), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "read":
            read_request(conn)
        elif cmd == "respond":
            conn.sendall(RESPONSE)
            print("written", flush=True)
        elif cmd == "shut":
            conn.shutdown(socket.SHUT_WR)
            print("shut", flush=True)


if __name__ == "__main__":
    client() if args.role == "client" else server()
