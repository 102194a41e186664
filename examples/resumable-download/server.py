#!/usr/bin/env python3
"""A file server over HTTP/1.1 whose downloads survive a move with tcpr.

tcpr moves the kernel's TCP connection, with every byte queued in it; it
does not move this process. So this server keeps, per connection, what a
new process needs to carry on the HTTP exchange, and writes it down when
asked to stop:

  serve:   python3 server.py --listen ADDR --port PORT --root DIR [--state-dir DIR]
  move:    kill -USR1 PID   (every connection stops at a clean point, writes
           STATE_DIR/conn-FD.json and prints "paused fd FD ... state PATH")
           tcpr dump --pid PID --fd FD --blob PATH -o IMAGE; kill PID
  resume:  tcpr restore IMAGE -- python3 server.py --resume --root DIR

With --resume it takes the connection from fd 3 (LISTEN_FDS=1, LISTEN_PID)
and the state from fd 4 (TCPR_APP_BLOB_FD, TCPR_APP_BLOB_LEN), sends the
rest of the response from where the old process stopped, then serves any
further request on that connection. `tcpr agent --exec` runs it the same
way. Standard library only.
"""
import argparse
import base64
import json
import os
import select
import signal
import socket
import sys
import threading
import urllib.parse

STATE_VERSION = 1
CHUNK = 64 * 1024
MAX_REQUEST_HEAD = 64 * 1024


class Paused(Exception):
    """Raised at a clean point (between two socket calls) once a pause is asked for."""


class Closed(Exception):
    """The client closed the connection."""


class Response:
    """One response: a head, then `body_len` bytes of the file `name` (under
    the root). `head_sent` and `body_sent` count the bytes that `send` has
    accepted: those are in the socket's send queue and travel with the
    connection, so the next process must start right after them."""

    def __init__(self, head, name=None, body_len=0, keep_alive=True):
        self.head = head
        self.head_sent = 0
        self.name = name
        self.body_len = body_len
        self.body_sent = 0
        self.keep_alive = keep_alive

    def to_state(self):
        return {
            "head": self.head.decode("latin-1"),
            "head_sent": self.head_sent,
            "file": self.name,
            "body_len": self.body_len,
            "body_sent": self.body_sent,
            "keep_alive": self.keep_alive,
        }

    @classmethod
    def from_state(cls, s):
        r = cls(s["head"].encode("latin-1"), s["file"], s["body_len"], s["keep_alive"])
        r.head_sent = s["head_sent"]
        r.body_sent = s["body_sent"]
        return r


def error_response(status):
    body = f"{status}\n".encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    # The body rides in the head: it is a few bytes, and the connection ends after it.
    return Response(head + body, keep_alive=False)


def respond(request_head, root):
    """The response to one request head (bytes up to the blank line)."""
    lines = request_head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return error_response("400 Bad Request")
    method, target, version = parts
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return error_response("400 Bad Request")
        headers[name.strip().lower()] = value.strip().lower()
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        return error_response("400 Bad Request")  # a GET or HEAD has no body here
    if method not in ("GET", "HEAD"):
        return error_response("405 Method Not Allowed")
    name = urllib.parse.unquote(urllib.parse.urlsplit(target).path).lstrip("/")
    path = os.path.realpath(os.path.join(root, name))
    if not path.startswith(os.path.realpath(root) + os.sep) or not os.path.isfile(path):
        return error_response("404 Not Found")
    size = os.path.getsize(path)
    keep_alive = headers.get("connection") != "close" and version == "HTTP/1.1"
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {size}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    ).encode()
    return Response(head, name, size if method == "GET" else 0, keep_alive)


class Connection:
    """One client connection and the HTTP state around it."""

    def __init__(self, sock, root, wake, state_dir, unread=b"", response=None):
        sock.setblocking(False)
        self.sock = sock
        self.root = root
        self.wake = wake
        self.state_dir = state_dir
        # Bytes read from the socket but not yet handled (a pipelined next
        # request): they left the kernel, so only the state can carry them.
        self.unread = bytearray(unread)
        self.response = response

    def wait(self, events):
        """Waits until the socket is ready for `events`, or raises Paused."""
        p = select.poll()
        p.register(self.sock, events)
        p.register(self.wake, select.POLLIN)
        while True:
            ready = dict(p.poll())
            if self.wake in ready:
                raise Paused()
            if self.sock.fileno() in ready:
                return

    def serve(self):
        """Serves requests until the client closes; returns on a pause once
        the state is written (the socket is left open, untouched)."""
        try:
            while True:
                if self.response is None:
                    head = self.read_request_head()
                    if head is None:
                        self.response = error_response("431 Request Header Fields Too Large")
                    else:
                        self.response = respond(head, self.root)
                self.send_response()
                if not self.response.keep_alive:
                    self.sock.shutdown(socket.SHUT_WR)
                    break
                self.response = None
        except Paused:
            self.save_state()
            return "paused"
        except (Closed, ConnectionError):
            pass
        self.sock.close()
        return "done"

    def read_request_head(self):
        while b"\r\n\r\n" not in self.unread:
            if len(self.unread) > MAX_REQUEST_HEAD:
                return None
            self.wait(select.POLLIN)
            data = self.sock.recv(CHUNK)
            if not data:
                raise Closed()
            self.unread += data
        head, _, rest = bytes(self.unread).partition(b"\r\n\r\n")
        self.unread = bytearray(rest)
        return head

    def send_response(self):
        r = self.response
        while r.head_sent < len(r.head):
            self.wait(select.POLLOUT)
            r.head_sent += self.send(r.head[r.head_sent:])
        if r.body_sent == r.body_len:
            return
        fd = os.open(os.path.join(self.root, r.name), os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != r.body_len:
                raise Closed()  # the file changed: end the connection rather than send other bytes
            while r.body_sent < r.body_len:
                self.wait(select.POLLOUT)
                chunk = os.pread(fd, min(CHUNK, r.body_len - r.body_sent), r.body_sent)
                # Count what send() accepted, not what was offered: only
                # those bytes are in the send queue that tcpr moves.
                r.body_sent += self.send(chunk)
        finally:
            os.close(fd)

    def send(self, data):
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    def save_state(self):
        state = {
            "version": STATE_VERSION,
            "unread": base64.b64encode(bytes(self.unread)).decode(),
            "response": self.response.to_state() if self.response else None,
        }
        fd = self.sock.fileno()
        path = os.path.join(self.state_dir, f"conn-{fd}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.rename(tmp, path)  # whoever sees the file sees all of it
        r = self.response
        sent = f"{r.body_sent} of {r.body_len} bytes of /{r.name}" if r and r.name else "idle"
        print(f"paused fd {fd} sent {sent} state {path}", flush=True)


def park(_connections):
    """Holds the paused connections (open, untouched) until the operator ends us."""
    while True:
        signal.pause()


def listen_and_serve(args, wake):
    family = socket.AF_INET6 if ":" in args.listen else socket.AF_INET
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.listen, args.port))
    ls.listen(64)
    ls.setblocking(False)
    print(f"listening on {args.listen} port {args.port} pid {os.getpid()}", flush=True)
    # Every connection stays referenced here, paused ones included: a
    # socket object that is garbage-collected is closed, and closing a
    # paused connection would send its client a FIN before tcpr takes it.
    live = []
    p = select.poll()
    p.register(ls, select.POLLIN)
    p.register(wake, select.POLLIN)
    while True:
        ready = dict(p.poll())
        if wake in ready:
            break
        try:
            sock, _ = ls.accept()
        except BlockingIOError:
            continue
        live = [(t, c) for t, c in live if t.is_alive()]
        conn = Connection(sock, args.root, wake, args.state_dir)
        t = threading.Thread(target=conn.serve, daemon=True)
        t.start()
        live.append((t, conn))
    # Paused: new clients wait in the backlog; each connection writes its state.
    for t, _ in live:
        t.join()
    print(f"paused all, pid {os.getpid()}", flush=True)
    park(live)


def resume(args, wake):
    if os.environ.get("LISTEN_FDS") != "1" or os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("server.py: --resume expects one connection on fd 3 (LISTEN_FDS=1, LISTEN_PID): run it under tcpr restore or tcpr agent --exec")
    if "TCPR_APP_BLOB_FD" not in os.environ:
        sys.exit("server.py: no application state on fd 4: dump the connection with --blob STATE")
    with os.fdopen(int(os.environ["TCPR_APP_BLOB_FD"]), "rb") as f:
        blob = f.read()
    if len(blob) != int(os.environ["TCPR_APP_BLOB_LEN"]):
        sys.exit("server.py: the application state is cut short")
    try:
        state = json.loads(blob)
        if state.get("version") != STATE_VERSION:
            sys.exit(f"server.py: unknown state version {state.get('version')}")
        response = Response.from_state(state["response"]) if state["response"] else None
        unread = base64.b64decode(state["unread"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"server.py: the application state on fd 4 is not one this server wrote: {e!r}")
    sock = socket.socket(fileno=3)
    conn = Connection(sock, args.root, wake, args.state_dir, unread, response)
    r = response
    at = f"{r.body_sent} of {r.body_len} bytes of /{r.name}" if r and r.name else "idle"
    print(f"resumed {os.environ.get('TCPR_PEER', '')} at {at} pid {os.getpid()}", flush=True)
    if conn.serve() == "paused":
        park([conn])  # moved again: the next process carries on


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", help="address to listen on")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--root", default=".", help="directory whose files are served")
    ap.add_argument("--state-dir", default=".", help="where a pause writes conn-FD.json")
    ap.add_argument("--resume", action="store_true", help="carry on a connection handed over by tcpr")
    args = ap.parse_args()
    if bool(args.listen) == args.resume:
        ap.error("give either --listen ADDR or --resume")
    # A pause is a byte in this pipe, written once and never read: every
    # poll() in every thread then sees it, whatever it was waiting for.
    wake, wake_w = os.pipe()
    signal.signal(signal.SIGUSR1, lambda *_: os.write(wake_w, b"p"))
    if args.resume:
        resume(args, wake)
    else:
        listen_and_serve(args, wake)


if __name__ == "__main__":
    main()
