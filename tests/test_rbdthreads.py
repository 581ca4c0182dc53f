"""scripts/rbdthreads.py's accounting: what it reads per thread from /proc
and how it turns two readings into costs per I/O by thread name. (Its
measurement itself needs a cluster, tgtd and qemu-img; decision 0411.)"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def rbdthreads():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("rbdthreads", SCRIPTS / "rbdthreads.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_costs_per_io_are_summed_over_numbered_threads_of_one_name():
    rt = rbdthreads()
    hz = os.sysconf("SC_CLK_TCK")
    before = {1: ("python3", 10, 5, 100, 7), 2: ("msgr-worker-0", 0, 0, 3, 0),
              3: ("msgr-worker-1", 0, 0, 0, 0), 9: ("gone", 50, 50, 50, 50)}
    after = {1: ("python3", 10 + hz, 5 + hz // 2, 300, 17), 2: ("msgr-worker-0", hz, 0, 203, 0),
             3: ("msgr-worker-1", hz, hz, 100, 50), 4: ("safe_timer", hz, 0, 10, 0)}   # 4: new
    rows = rt.by_name(before, after, 1000)
    assert set(rows) == {"pythonN", "msgr-worker-N", "safe_timer"}   # a trailing number is dropped
    assert rows["pythonN"] == pytest.approx([1, 1000.0, 500.0, 0.2, 0.01])
    assert rows["msgr-worker-N"] == pytest.approx([2, 2000.0, 1000.0, 0.3, 0.05])
    assert rows["safe_timer"] == pytest.approx([1, 1000.0, 0.0, 0.01, 0.0])
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
        assert all(second[me][i] >= first[me][i] for i in (1, 2, 4))
    finally:
        stop.set()
        helper.join()
