#!/usr/bin/env python3
"""Raw clients for the balancer tests.

request ADDR PORT TEXT [--split] [--hold N] [--ending]
    Sends TEXT (Python escapes allowed: \\r\\n), whole or one byte per
    segment (--split), and prints the first line of the answer (or
    "closed" when the balancer closed without a byte); with --ending, then
    "end fin" or "end rst": how the stream ended. With --hold N,
    opens N such connections first, sends each TEXT, and prints "held"
    once all are open; then waits for a line on stdin before reading
    their answers (one line per connection).
keepalive ADDR PORT HOST
    One connection; per stdin line PATH, GET PATH (keep-alive) and print
    the body's first line; prints "connected" first.
loop ADDR PORT HOST SECONDS THREADS
    Until a line comes on stdin (SECONDS at most), THREADS threads each
    send GET /who with Host HOST over a new connection after another
    (Connection: close) and read the whole answer; prints "ok N failed M"
    (failed: any error, or not a 200 with its whole body) and, for each
    failure, a line saying why.
download ADDR PORT HOST PATH
    GET PATH with Host HOST over one connection; prints the body's length
    and SHA-256 ("LEN HEX").
"""
import hashlib
import socket
import sys
import time


def connect(addr, port):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(60)
    s.connect((addr, port))
    return s


def first_line(s):
    data = b""
    while b"\n" not in data:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    if not data:
        return "closed"
    return data.split(b"\r\n")[0].split(b"\n")[0].decode("latin-1")


def ending(s):
    """How the answer's stream ended: "fin" (end of stream) or "rst" (a
    reset: read as an error, or, once the end of stream was read, the
    error it left on the socket; Linux reads the end first)."""
    try:
        while s.recv(4096):
            pass
    except OSError:
        return "rst"
    # A reset sent right behind the FIN (a close with unread data) has
    # arrived by now on these links.
    time.sleep(0.05)
    return "rst" if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else "fin"


def send(s, text, split):
    if split:
        for i in range(len(text)):
            s.send(text[i : i + 1])
            time.sleep(0.002)
    else:
        s.sendall(text)


def main():
    mode = sys.argv[1]
    if mode == "request":
        addr, port, text = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        text = text.encode("latin-1").decode("unicode_escape").encode("latin-1")
        split = "--split" in sys.argv
        if "--hold" in sys.argv:
            n = int(sys.argv[sys.argv.index("--hold") + 1])
            socks = [connect(addr, port) for _ in range(n)]
            for s in socks:
                send(s, text, False)
            print("held", flush=True)
            sys.stdin.readline()
            for s in socks:
                print(first_line(s), flush=True)
            return
        s = connect(addr, port)
        send(s, text, split)
        print(first_line(s), flush=True)
        if "--ending" in sys.argv:
            print("end", ending(s), flush=True)
    elif mode == "loop":
        addr, port, host = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        seconds, threads = float(sys.argv[5]), int(sys.argv[6])
        import threading

        counts = {"ok": 0, "failed": 0}
        whys = []
        lock = threading.Lock()
        end = time.monotonic() + seconds

        def one():
            s = connect(addr, port)
            try:
                s.sendall(f"GET /who HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            finally:
                s.close()
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
            if not head.startswith(b"HTTP/1.1 200") or not length or len(body) != length[0]:
                raise ValueError(f"bad answer {data[:60]!r}")

        def run():
            while time.monotonic() < end:
                try:
                    one()
                    key = "ok"
                except Exception as e:  # noqa: BLE001 - every failure counts
                    key = "failed"
                    with lock:
                        whys.append(repr(e))
                with lock:
                    counts[key] += 1

        def stop_on_line():
            nonlocal end
            sys.stdin.readline()
            end = time.monotonic()

        threading.Thread(target=stop_on_line, daemon=True).start()
        ts = [threading.Thread(target=run) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        print(f"ok {counts['ok']} failed {counts['failed']}", flush=True)
        for w in whys:
            print(w, flush=True)
    elif mode == "keepalive":
        addr, port, host = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        s = connect(addr, port)
        f = s.makefile("rb")
        print("connected", flush=True)
        for line in sys.stdin:
            path = line.strip()
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            status = f.readline()
            length = 0
            while True:
                h = f.readline()
                if h in (b"\r\n", b""):
                    break
                if h.lower().startswith(b"content-length"):
                    length = int(h.split(b":")[1])
            body = f.read(length)
            print("body", status.split()[1].decode() if status else "closed", body.decode().strip(), flush=True)
    elif mode == "download":
        addr, port, host, path = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
        s = connect(addr, port)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                sys.exit("closed before the head")
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        h = hashlib.sha256(body)
        got = len(body)
        while got < length:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            got += len(chunk)
        print(got, h.hexdigest(), flush=True)


if __name__ == "__main__":
    main()
