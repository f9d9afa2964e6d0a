"""L2's endpoint (:class:`xlio.packets.Endpoint`) against scapy's reading of
the same frames: what it answers, what it ignores, and that each answer is a
well-formed frame whose checksums hold."""

from __future__ import annotations

from hypothesis import event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet
from scapy.utils import str2mac

from xlio.backends.netns import GUEST_IP, HOST_IP
from xlio.backends.wire import GUEST_MAC, PEER_MAC
from xlio.packets import UDP_DISCARD_PORT, UDP_ECHO_PORT, Endpoint, ip4

OTHER_MAC = bytes.fromhex("020000000077")
OTHER_IP = "10.99.0.7"


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A frame toward the guest, built by scapy, then perhaps cut short."""
    dst = draw(st.sampled_from([GUEST_MAC, GUEST_MAC, b"\xff" * 6, OTHER_MAC]))
    eth = Ether(dst=str2mac(dst), src=str2mac(PEER_MAC))
    kind = draw(st.sampled_from(["udp", "udp", "icmp", "icmp", "arp", "other"]))
    if kind == "arp":
        tip = draw(st.sampled_from([GUEST_IP, GUEST_IP, OTHER_IP]))
        op = draw(st.sampled_from([1, 2]))
        pkt = eth / ARP(op=op, hwsrc=str2mac(PEER_MAC), psrc=HOST_IP, pdst=tip)
    elif kind == "other":
        pkt = eth / bytes(draw(st.binary(min_size=0, max_size=60)))
        pkt.type = draw(st.sampled_from([0x86DD, 0x88CC]))
    else:
        ip = IP(src=HOST_IP, dst=draw(st.sampled_from([GUEST_IP, GUEST_IP, OTHER_IP])))
        if draw(st.booleans()):
            ip.options = [b"\x01\x01\x01\x00"]  # NOPs and an end: IHL 6
        payload = draw(st.binary(min_size=0, max_size=80))
        l4: Packet
        if kind == "udp":
            port = draw(st.sampled_from([UDP_ECHO_PORT, UDP_ECHO_PORT, UDP_DISCARD_PORT, 5000]))
            l4 = UDP(sport=draw(st.integers(1024, 65535)), dport=port) / payload
        else:
            l4 = ICMP(type=draw(st.sampled_from([8, 8, 0, 3])), id=draw(st.integers(0, 65535)),
                      seq=draw(st.integers(0, 65535))) / payload  # fmt: skip
        pkt = eth / ip / l4
    raw = bytes(pkt)
    if draw(st.integers(0, 3)):  # three in four whole
        return raw
    return raw[: draw(st.integers(0, len(raw)))]


def _checksums_hold(p: Ether) -> bool:
    """Whether the IP and L4 checksums are the ones scapy computes afresh."""
    again = Ether(bytes(p))
    del again[IP].chksum
    layer = UDP if UDP in again else ICMP
    del again[layer].chksum
    rebuilt = Ether(bytes(again))
    return bool(rebuilt[IP].chksum == p[IP].chksum and rebuilt[layer].chksum == p[layer].chksum)


@settings(max_examples=500, deadline=None)
@given(frame=frames())
def test_the_endpoint_answers_what_scapy_reads_and_nothing_else(frame: bytes) -> None:
    ep = Endpoint(GUEST_MAC, ip4(GUEST_IP))
    out = ep.handle(frame)
    assert ep.received == 1
    assert ep.answered == len(out) <= 1
    if len(frame) < 14:  # not even an Ethernet header (scapy will not parse it)
        assert out == [] and ep.discarded == 1
        return
    p = Ether(frame)
    whole = IP in p and len(frame) >= 14 + p[IP].len and p[IP].ihl >= 5
    ours = p.dst in (str2mac(GUEST_MAC), "ff:ff:ff:ff:ff:ff")
    want = None
    if ours and ARP in p and len(frame) >= 42 and p[ARP].pdst == GUEST_IP:
        want = "arp" if p[ARP].op == 1 else None
    elif ours and whole and p[IP].dst == GUEST_IP:
        if UDP in p and p[UDP].dport == UDP_ECHO_PORT:
            want = "udp"
        elif ICMP in p and p[ICMP].type == 8:
            want = "icmp"
    event(f"answer: {want}")
    if want is None:
        assert out == []
        return
    assert len(out) == 1
    r = Ether(out[0])
    assert r.src == str2mac(GUEST_MAC) and r.dst == str2mac(PEER_MAC)
    if want == "arp":
        assert r[ARP].op == 2 and r[ARP].psrc == GUEST_IP and r[ARP].pdst == HOST_IP
        assert r[ARP].hwsrc == str2mac(GUEST_MAC) and r[ARP].hwdst == str2mac(PEER_MAC)
        return
    assert r[IP].src == GUEST_IP and r[IP].dst == HOST_IP
    assert _checksums_hold(r)
    if want == "udp":
        assert (r[UDP].sport, r[UDP].dport) == (UDP_ECHO_PORT, p[UDP].sport)
        assert bytes(r[UDP].payload) == bytes(p[UDP].payload)
    else:
        assert r[ICMP].type == 0 and (r[ICMP].id, r[ICMP].seq) == (p[ICMP].id, p[ICMP].seq)
        assert bytes(r[ICMP].payload) == bytes(p[ICMP].payload)
