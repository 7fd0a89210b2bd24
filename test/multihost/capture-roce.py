#!/usr/bin/python3
# Watches one NIC of a multi-host test host and tallies every RoCE v2 packet (IPv4, UDP destination port 4791) that
# crosses it, both directions: which IPv4 addresses they carry and their TOS byte. Node has no AF_PACKET sockets,
# hence this small helper (test/multihost/host-side.ts runs it). Each line "report" on stdin gets one JSON line on
# stdout: {"packets": N, "addresses": {ip: n}, "tos": {value: n}, "dropped": n}, where "dropped" counts frames the
# kernel could not queue to this socket (under TCG the tally is then a sample). It ends when stdin closes.
#   capture-roce.py <interface>
import json
import select
import socket
import struct
import sys

ETH_P_ALL = 0x0003
ETHERTYPE_IPV4 = 0x0800
ROCE_V2_PORT = 4791
IPPROTO_UDP = 17
SNAPLEN = 256
# A large receive buffer: the emulated CPU is slow to read, and each dropped frame is one packet not looked at.
RCVBUF_BYTES = 16 << 20
SOL_PACKET = 263
PACKET_STATISTICS = 6

iface = sys.argv[1]
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
sock.bind((iface, 0))
packets = 0
dropped = 0
addresses = {}
tos_values = {}
print(json.dumps({"ready": iface}), flush=True)


def tally(frame):
    global packets
    if len(frame) < 14 + 20 or int.from_bytes(frame[12:14], "big") != ETHERTYPE_IPV4:
        return
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != IPPROTO_UDP or len(ip) < ihl + 4:
        return
    if int.from_bytes(ip[ihl + 2:ihl + 4], "big") != ROCE_V2_PORT:
        return
    packets += 1
    for raw in (ip[12:16], ip[16:20]):
        a = socket.inet_ntoa(raw)
        addresses[a] = addresses.get(a, 0) + 1
    tos_values[str(ip[1])] = tos_values.get(str(ip[1]), 0) + 1


while True:
    ready, _, _ = select.select([sock, sys.stdin], [], [])
    if sock in ready:
        tally(sock.recv(SNAPLEN))
    if sys.stdin in ready:
        line = sys.stdin.readline()
        if line == "":
            break
        if line.strip() == "report":
            # struct tpacket_stats {tp_packets, tp_drops}; reading it resets the kernel's counts.
            dropped += struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]
            print(json.dumps({"packets": packets, "addresses": addresses, "tos": tos_values, "dropped": dropped}), flush=True)
