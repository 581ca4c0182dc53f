"""scripts/rbdthreads.py's accounting: what it reads per thread from /proc
and how it turns two readings into costs per I/O by thread name. (Its
measurement itself needs a cluster, tgtd and qemu-img; decision 0411.)"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from support.scripts import load_script


def rbdthreads():
    return load_script("rbdthreads")


def test_costs_per_io_are_summed_over_numbered_threads_of_one_name():
    rt = rbdthreads()
    hz = os.sysconf("SC_CLK_TCK")
    before = {1: ("python3", 10, 5, 100, 7, 10**9, 3), 2: ("msgr-worker-0", 0, 0, 3, 0, 0, 0),
              3: ("msgr-worker-1", 0, 0, 0, 0, 0, 0), 9: ("gone", 50, 50, 50, 50, 50, 50)}
    after = {1: ("python3", 10 + hz, 5 + hz // 2, 300, 17, 10**9 + 1_500_000_000, 5),
             2: ("msgr-worker-0", hz, 0, 203, 0, 2_000_000_000, 100),
             3: ("msgr-worker-1", hz, hz, 100, 50, 1_000_000_000, 0),
             4: ("safe_timer", hz, 0, 10, 0, 1_000_000, 1)}   # 4: new
    rows = rt.by_name(before, after, 1000)
    assert set(rows) == {"pythonN", "msgr-worker-N", "safe_timer"}   # a trailing number is dropped
    # threads, user us, kernel us, sleeps, preemptions, us on the CPU (ns precise), migrations per I/O
    assert rows["pythonN"] == pytest.approx([1, 1000.0, 500.0, 0.2, 0.01, 1500.0, 0.002])
    assert rows["msgr-worker-N"] == pytest.approx([2, 2000.0, 1000.0, 0.3, 0.05, 3000.0, 0.1])
    assert rows["safe_timer"] == pytest.approx([1, 1000.0, 0.0, 0.01, 0.0, 1.0, 0.001])
    tids = rt.by_name(before, after, 1000, tids=True)
    assert set(tids) == {"python3/1", "msgr-worker-0/2", "msgr-worker-1/3", "safe_timer/4"}


def test_a_reading_has_every_thread_and_counts_a_sleep():
    rt = rbdthreads()
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        me = threading.get_native_id()
        first = rt.sample(os.getpid())
        assert me in first and helper.native_id in first
        time.sleep(0.01)   # blocks: one voluntary context switch at least
        second = rt.sample(os.getpid())
        assert second[me][0] == first[me][0] == Path("/proc/self/comm").read_text().strip()
        assert second[me][3] > first[me][3]
        assert all(second[me][i] >= first[me][i] for i in (1, 2, 4, 6))
        assert second[me][5] > first[me][5]   # ns on the CPU: the reading itself takes some
    finally:
        stop.set()
        helper.join()


def test_wakeups_are_counted_by_waker_and_woken_and_switches_by_how():
    rt = rbdthreads()
    lines = [
        "         python3 100 sched:sched_wakeup: comm=io_context_pool pid=101 prio=120 target_cpu=001",
        "         python3 100 sched:sched_wakeup: comm=io_context_pool pid=101 prio=120 target_cpu=000",
        " io_context_pool 101 sched:sched_wakeup: comm=python3 pid=100 prio=120 target_cpu=000",
        "         python3 100 sched:sched_switch: prev_comm=python3 prev_pid=100 prev_prio=120 prev_state=R "
        "==> next_comm=io_context_pool next_pid=101 next_prio=120",
        "         python3 100 sched:sched_switch: prev_comm=python3 prev_pid=100 prev_prio=120 prev_state=R+ "
        "==> next_comm=swapper/0 next_pid=0 next_prio=120",
        " io_context_pool 101 sched:sched_switch: prev_comm=io_context_pool prev_pid=101 prev_prio=120 "
        "prev_state=S ==> next_comm=python3 next_pid=100 next_prio=120",
        "  msgr-worker-2 102 sched:sched_switch: prev_comm=msgr-worker-2 prev_pid=102 prev_prio=120 "
        "prev_state=D ==> next_comm=swapper/1 next_pid=0 next_prio=120",
        "not a sched line",
    ]
    labelled = []

    def label(tid: int, comm: str) -> str:
        labelled.append(tid)
        return f"stml:{comm}"
    woke, left = rt.wakeups(lines, label)
    assert woke == {("stml:python3", "stml:io_context_pool"): 2, ("stml:io_context_pool", "stml:python3"): 1}
    assert left == {("stml:python3", "preempt"): 2, ("stml:io_context_pool", "sleep"): 1,
                    ("stml:msgr-worker-2", "sleep"): 1}
    assert sorted(labelled) == [100, 101, 102]   # each thread named once


def test_a_thread_is_labelled_by_its_process_and_its_name_without_a_number():
    rt = rbdthreads()
    me = threading.get_native_id()
    assert rt.thread_label(me, "msgr-worker-7", {os.getpid(): "ours/stml"}) == "ours/stml:msgr-worker-N"
    own = Path("/proc/self/comm").read_text().strip()
    assert rt.thread_label(me, "io_context_pool", {}) == f"{own}:io_context_pool"
    assert rt.thread_label(2 ** 22 + 12345, "qemu-img", {}) == "gone:qemu-img"   # no such thread


def test_the_machines_idle_ticks_are_part_of_its_total_and_grow():
    rt = rbdthreads()
    idle, total = rt.idle()
    assert 0 <= idle <= total
    time.sleep(0.05)
    later = rt.idle()
    assert later[1] > total and later[0] >= idle


def test_the_io_size_is_qemu_img_benchs_and_a_bad_one_is_refused():
    rt = rbdthreads()
    assert rt.qemu_args("1M", 8, read=True) == ["-d", "8", "-s", "1M"]
    assert rt.qemu_args("4k", 16, read=False) == ["-d", "16", "-s", "4k", "-w"]
    for bad in ("", "1G", "64", "0k", "1 M"):
        with pytest.raises(SystemExit, match="not a size"):
            rt.qemu_args(bad, 8, read=True)


def test_syscall_exits_are_counted_by_thread_call_and_result():
    rt = rbdthreads()
    lines = [
        "  msgr-worker-2 200 syscalls:sys_exit_sendmsg: 0x100140",               # 1 MiB + 320 bytes
        "  msgr-worker-2 200 syscalls:sys_exit_sendmsg: 0xfffffffffffffff5",     # -11
        "  msgr-worker-2 200 syscalls:sys_exit_sendmsg: 0xfffffffffffffff5",
        "  msgr-worker-0 300 syscalls:sys_exit_read: 0x1000",                    # 4096: a power of two
        "  msgr-worker-0 300 syscalls:sys_exit_read: 0x0",
        "  msgr-worker-0 300 syscalls:sys_exit_read: 0xffffffffffffff98",        # -104 ECONNRESET
        "  msgr-worker-0 300 syscalls:sys_exit_epoll_wait: 0x1",
        "  python3 100 sched:sched_switch: prev_comm=python3 prev_pid=100",     # not a syscall
    ]
    got = rt.syscall_counts(lines, lambda tid, comm: f"{tid}:{comm}")
    assert got == {("200:msgr-worker-2", "sendmsg", "<=2097152"): 1, ("200:msgr-worker-2", "sendmsg", "EAGAIN"): 2,
                   ("300:msgr-worker-0", "read", "<=4096"): 1, ("300:msgr-worker-0", "read", "0"): 1,
                   ("300:msgr-worker-0", "read", "err-104"): 1, ("300:msgr-worker-0", "epoll_wait", "<=1"): 1}


def test_a_connections_counters_are_read_from_ss_with_retransmissions_in_total():
    rt = rbdthreads()
    out = (
        '0      0      127.0.0.1:6800 127.0.0.1:35614 users:(("ceph-osd",pid=7,fd=40))\n'
        '\t cubic wscale:7,7 rto:201 rtt:0.05/0.02 bytes_retrans:131072 data_segs_in:51 '
        'data_segs_out:9001 retrans:0/12 dsack_dups:11 reord_seen:20 rcv_space:65483\n'
        '0      0      127.0.0.1:35614 127.0.0.1:6800 users:(("python3",pid=9,fd=12))\n'
        '\t cubic wscale:7,7 rto:201 rtt:0.05/0.02 data_segs_in:9001 data_segs_out:51\n'
    )
    got = rt.parse_connections(out)
    assert got == {
        ("127.0.0.1:6800", "127.0.0.1:35614"): ("ceph-osd", {
            "retrans": 12, "dsack_dups": 11, "reord_seen": 20, "data_segs_out": 9001, "data_segs_in": 51,
            "bytes_retrans": 131072}),
        ("127.0.0.1:35614", "127.0.0.1:6800"): ("python3", {"data_segs_out": 51, "data_segs_in": 9001}),
    }


def test_the_machines_tcp_counters_are_read_by_kind_and_name():
    rt = rbdthreads()
    got = rt.tcp_counters()
    # Tcp from /proc/net/snmp, TcpExt from /proc/net/netstat; nothing else (Udp, IpExt...)
    assert {"Tcp.RetransSegs", "Tcp.OutSegs", "TcpExt.TCPOFOQueue", "TcpExt.TCPDSACKRecv"} <= set(got)
    assert all(k.split(".", 1)[0] in ("Tcp", "TcpExt") for k in got)
    assert all(isinstance(v, int) for v in got.values())


def test_a_process_and_the_threads_it_starts_later_are_kept_on_one_cpu():
    rt = rbdthreads()
    was = os.sched_getaffinity(0)
    cpu = sorted(was)[-1]
    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    try:
        rt.pin(os.getpid(), cpu)   # this process: the OSD's role
        assert os.sched_getaffinity(0) == os.sched_getaffinity(before.native_id) == {cpu}
        later = threading.Thread(target=stop.wait)
        later.start()
        assert os.sched_getaffinity(later.native_id) == {cpu}
    finally:
        stop.set()
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), was)
        before.join()
