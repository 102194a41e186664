#!/usr/bin/env python3
"""A backend for the balancer tests: HTTP/1.1 (keep-alive), optionally TLS.

GET /who          -> this server's name and the client address it saw
GET /name         -> this server's name (the same length however it came)
GET /bytes/N      -> N bytes of a fixed pseudo-random stream
--digest N        -> print the SHA-256 of the first N bytes of that stream
"""
import argparse
import hashlib
import http.server
import random
import socket
import ssl
import sys

BLOCK = random.Random(1234).randbytes(1 << 20)


def stream(n):
    """The first n bytes of the stream, block by block."""
    while n > 0:
        chunk = BLOCK[: min(n, len(BLOCK))]
        yield chunk
        n -= len(chunk)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without this the body waits on
    # Nagle for the peer's delayed ACK (about 400 ms per keep-alive request).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/name":
            body = f"{self.server.name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/who" or self.path.startswith("/api"):
            body = f"{self.server.name} {self.path} {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/bytes/"):
            n = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            for chunk in stream(n):
                self.wfile.write(chunk)
        else:
            self.send_error(404)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, addr, name, family):
        self.address_family = family
        self.name = name
        super().__init__(addr, Handler)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="")
    p.add_argument("--bind", default="::")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--digest", type=int)
    a = p.parse_args()
    if a.digest is not None:
        h = hashlib.sha256()
        for chunk in stream(a.digest):
            h.update(chunk)
        print(h.hexdigest())
        return
    family = socket.AF_INET6 if ":" in a.bind else socket.AF_INET
    srv = Server((a.bind, a.port), a.name, family)
    if a.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
