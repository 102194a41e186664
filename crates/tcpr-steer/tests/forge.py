#!/usr/bin/env python3
"""forge.py SRC SPORT DST DPORT

Forges, from the host it runs on, a SYN, a RST and a FIN (with ACK) with
the tuple SRC SPORT -> DST DPORT and random sequence numbers, as someone
who knows a flow's addresses and ports but not its sequence would (a raw
socket; the kernel adds the IP header). Prints "forged".
"""
import random, socket, struct, sys
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
if v6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 16)
def checksum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
for flags in (0x02, 0x04, 0x11):
    ack = random.getrandbits(32) if flags & 0x10 else 0
    h = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), ack, 5 << 4, flags, 65535, 0, 0)
    if not v6:
        pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(h))
        h = h[:16] + struct.pack("!H", checksum(pseudo + h)) + h[18:]
    s.sendto(h, (dst, 0))
print("forged", flush=True)
