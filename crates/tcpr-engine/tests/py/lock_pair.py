"""A connected TCP pair on loopback for the lock tests, driven line by line.

Prints "client_addr client_port server_addr server_port", then obeys:
  send c|s TEXT   -> sends TEXT from that end (TCP_NODELAY), prints "ok"
  retrans c|s     -> prints that end's tcpi_total_retrans (TCP_INFO)
  inq c|s         -> prints the bytes waiting in that end's receive queue
  unsent c|s      -> prints the bytes in that end's send queue not yet sent
  recv c|s N      -> reads exactly N bytes (blocking), prints them
  state c|s       -> prints that end's tcpi_state
  close s         -> closes that end
"""
import fcntl, socket, struct, sys, termios

family = socket.AF_INET6 if len(sys.argv) > 1 and sys.argv[1] == "6" else socket.AF_INET
host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
l = socket.socket(family)
l.bind((host, 0))
l.listen()
c = socket.socket(family)
c.connect(l.getsockname())
s, _ = l.accept()
ends = {"c": c, "s": s}
for e in ends.values():
    e.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ca, sa = c.getsockname(), s.getsockname()
print(ca[0], ca[1], sa[0], sa[1], flush=True)
# struct tcp_info: 8 bytes of u8 fields, then u32s; tcpi_total_retrans is
# the 24th u32.
TOTAL_RETRANS_AT = 8 + 23 * 4
# linux/sockios.h: the send queue's bytes not yet sent.
SIOCOUTQNSD = 0x894B
for line in sys.stdin:
    words = line.split()
    cmd, end = words[0], ends[words[1]]
    if cmd == "send":
        end.sendall(words[2].encode())
        print("ok", flush=True)
    elif cmd == "retrans":
        info = end.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        print(struct.unpack_from("I", info, TOTAL_RETRANS_AT)[0], flush=True)
    elif cmd == "state":
        info = end.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        print(info[0], flush=True)
    elif cmd == "inq":
        print(struct.unpack("i", fcntl.ioctl(end, termios.FIONREAD, b"\0" * 4))[0], flush=True)
    elif cmd == "unsent":
        print(struct.unpack("i", fcntl.ioctl(end, SIOCOUTQNSD, b"\0" * 4))[0], flush=True)
    elif cmd == "recv":
        want, got = int(words[2]), b""
        while len(got) < want:
            more = end.recv(want - len(got))
            if not more:
                break
            got += more
        print(got.decode(), flush=True)
    elif cmd == "close":
        end.close()
        print("ok", flush=True)
