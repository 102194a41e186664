#!/usr/bin/env python3
"""A broken application behind `tcpr agent --unix PATH`: it listens at
PATH, takes each delivery message with its fd, then closes both without
the acknowledgement byte. Prints "listening", then "dropped N" per
message. The agent must treat each as not delivered."""
import os, socket, sys

path = sys.argv[1]
if os.path.exists(path):
    os.unlink(path)
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ls.bind(path)
ls.listen(16)
print("listening", flush=True)
n = 0
while True:
    u, _ = ls.accept()
    data, fds, _, _ = socket.recv_fds(u, 65536, 4)
    if not data:
        # The agent's probe: a connection that carries nothing.
        u.close()
        continue
    for fd in fds:
        os.close(fd)
    u.close()
    n += 1
    print("dropped", n, flush=True)
