"""scripts/tcpsend.py's reading of what it measures (decision 0428): each
end's counters from `ss -tin`, and from perf's segment events who sent a
data segment and which one arrived after one sent later. (The measurement
itself needs tgtd, qemu-img and perf.)"""
from __future__ import annotations

from support.scripts import load_script


def tcpsend():
    return load_script("tcpsend")


SS = """ESTAB 1702558 0       127.0.0.1:46376 127.0.0.1:51403
\t bbr wscale:10,10 rto:204 rtt:0.824/1.153 cwnd:18 bytes_acked:30517 data_segs_out:627 rcv_ooopack:41 reordering:38
ESTAB 0 1048576 127.0.0.1:51403 127.0.0.1:46376
\t bbr cwnd:24 retrans:0/37 dsack_dups:36 reord_seen:8 data_segs_out:10156 bytes_acked:650237548 bytes_retrans:2422871 notsent:524288
"""


def test_each_end_of_the_connection_is_read_by_its_local_port():
    got = tcpsend().parse_ss(SS, 51403)
    assert got["target"] == {"retrans": 37, "dsack_dups": 36, "reord_seen": 8, "data_segs_out": 10156,
                             "bytes_acked": 650237548, "bytes_retrans": 2422871, "cwnd": 24, "notsent": 524288}
    assert got["initiator"]["rcv_ooopack"] == 41 and got["initiator"]["bytes_acked"] == 30517


def _event(comm: str, cpu: int, ts: float, event: str, fields: str, chain: list[str]) -> list[str]:
    return ([f"{comm:>16} {1000 + cpu} [{cpu:03d}] {ts:.6f}: {event}: {fields}"]
            + [f"\t ffffffff81000000 {sym}+0x10 ([kernel.kallsyms])" for sym in chain] + [""])


def test_a_segment_delivered_after_one_sent_later_is_named_with_who_sent_both(capsys):
    ts = tcpsend()
    xmit = ["dev_hard_start_xmit", "__dev_queue_xmit", "ip_finish_output2", "__tcp_transmit_skb",
            "tcp_write_xmit"]
    lines = (_event("python", 1, 1.000001, "net:net_dev_start_xmit", "dev=lo skbaddr=0xa len=65226",
                    xmit + ["tcp_sendmsg_locked", "tcp_sendmsg"])
             + _event("python", 1, 1.000010, "net:netif_receive_skb", "dev=lo skbaddr=0xa len=65226", [])
             # the pacing timer's segment on CPU 1 waits; the ACK's on CPU 0, sent later, goes first
             + _event("python", 1, 1.000020, "net:net_dev_start_xmit", "dev=lo skbaddr=0xb len=65226",
                      xmit + ["tcp_tsq_write", "tcp_pace_kick", "__hrtimer_run_queues"])
             + _event("qemu-img", 0, 1.000030, "net:net_dev_start_xmit", "dev=lo skbaddr=0xc len=65226",
                      xmit + ["tcp_ack", "tcp_rcv_established", "tcp_v4_rcv"])
             + _event("qemu-img", 0, 1.000031, "net:netif_receive_skb", "dev=lo skbaddr=0xc len=65226", [])
             + _event("ksoftirqd/1", 1, 1.000060, "net:netif_receive_skb", "dev=lo skbaddr=0xb len=65226", [])
             # an ACK (small) is no data segment
             + _event("qemu-img", 0, 1.000070, "net:net_dev_start_xmit", "dev=lo skbaddr=0xd len=66", xmit)
             + _event("qemu-img", 0, 1.000080, "tcp:tcp_retransmit_skb", "skbaddr=0xe sport=3260 dport=5",
                      ["__tcp_retransmit_skb", "tcp_retransmit_skb", "tcp_xmit_recovery", "tcp_ack",
                       "tcp_rcv_established"]))
    ts.segments(lines, 3260, 1)
    out = capsys.readouterr().out
    assert "data segments per read: 3.00" in out
    assert "sent by send call" in out and "sent by pacing timer" in out and "sent by ACK" in out
    assert "segments delivered after one sent later, per read: 1.000" in out
    assert "pacing timer on cpu 1 (delivered by ksoftirqd) overtaken by ACK on cpu 0: 1.000" in out
    assert "the late one's time from send to delivery: median 40 us" in out
    assert "retransmissions per read by context: 1.000" in out and "ACK (qemu-img)" in out
