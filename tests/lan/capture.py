"""Capture every frame on the interfaces of this network namespace into a file, with a raw socket.

Run inside the switch namespace of a test LAN (``python capture.py OUTFILE``): an ``AF_PACKET``
socket bound to no interface receives each frame that crosses any port of the bridge (tcpdump is
not on the machine). Prints ``ready`` once the socket is open; stops when its stdin closes.
"""

from __future__ import annotations

import os
import select
import socket
import sys

ETH_P_ALL = 0x0003
MAX_FRAME_BYTES = 65_536


def main() -> int:
    out = open(sys.argv[1], "wb")  # closed on exit; frames are appended as they come
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([sock, stdin], [], [])
        if stdin in readable and not os.read(stdin, 4096):
            break
        if sock in readable:
            frame = sock.recv(MAX_FRAME_BYTES)
            out.write(len(frame).to_bytes(4, "big") + frame)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
