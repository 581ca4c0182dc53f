"""Status and metrics: `scsi-target status --json` counters move with I/O, and
the Prometheus endpoint serves them."""
from __future__ import annotations

import subprocess
import sys
import urllib.request

from support.cli import status
from support.procs import free_port
from support.rawiscsi import RawInitiator
from support.target import IQN, Target


def test_status_counters_and_prometheus():
    port = free_port()
    with Target("--lun", "ram:16MiB", "--metrics", f"127.0.0.1:{port}") as t:
        before = status(t.data_dir)
        assert before["luns"][0]["commands"] == 0 and before["front_ends"][0]["kind"] == "iscsi"
        host, p = t.portal.rsplit(":", 1)
        ini = RawInitiator(host, int(p), initiator="iqn.2026-11.org.test:metrics")
        ini.login(IQN)
        for lba in range(0, 64, 8):
            ini.write16(lba, bytes([lba]) * 4096)
        for lba in range(0, 64, 8):
            assert ini.read16(lba, 8) == bytes([lba]) * 4096
        status_, sense, _ = ini.command(bytes([0x28, 0, 0xFF, 0xFF, 0xFF, 0xF0, 0, 0, 1, 0]), 0, read=512)
        assert status_ == 2     # LBA out of range: an error
        after = status(t.data_dir)
        lun = after["luns"][0]
        assert lun["commands"] >= 17 and lun["write_bytes"] == 8 * 4096 and lun["read_bytes"] == 8 * 4096
        assert lun["errors"] >= 1 and lun["in_flight"] == 0 and lun["latency_us"]["p50"] > 0
        sess = [s for s in after["sessions"] if s["initiator"].startswith("iqn.2026-11.org.test:metrics")]
        assert sess and sess[0]["write_bytes"] == 8 * 4096
        assert after["front_ends"][0]["read_bytes"] == 8 * 4096

        table = subprocess.run([sys.executable, "-m", "scsi_target", "status", "--data-dir", t.data_dir],
                               capture_output=True, text=True, timeout=60).stdout
        assert "LUNs" in table and "Sessions" in table and "32.0KiB" in table

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert f'scsi_target_lun_write_bytes_total{{lun="0",target="{IQN}"}} 32768.0' in text
        assert f'scsi_target_lun_read_bytes_total{{lun="0",target="{IQN}"}} 32768.0' in text
        assert "scsi_target_session_commands_total" in text
        assert 'scsi_target_front_end_latency_seconds{front_end=' in text
        ini.close()


# ---------------------------------------------------------------- Metrics alone
# A command updates only the set of its (front end, session, LUN); reports add
# the sets up. These drive Metrics as stml/server.py does, with a fake clock.

import types

import pytest

from stml import metrics as metrics_mod
from stml.task import FrontEnd, Nexus

READ, WRITE = 2, 1


class FakeEmulator:
    def __init__(self, targets: dict[str, int]) -> None:
        self.name = "stml"
        self.timing = None   # commands not timed: no stage histograms
        self.front_ends: dict[bytes, FrontEnd] = {}
        opts = types.SimpleNamespace(kind="ram", path=None)
        self.targets = {name: types.SimpleNamespace(name=name, luns={
            i: types.SimpleNamespace(lun=i, blocks=8, block_size=512, options=opts, pr=None,
                                     backend=types.SimpleNamespace(sync_error=None), offline=None,
                                     unit_attentions={}) for i in range(n)})
            for name, n in targets.items()}

    def front_end(self, ident: bytes, name: str) -> FrontEnd:
        fe = self.front_ends[ident] = FrontEnd(ident, name, "iscsi", True, 1.0, 0.0)
        return fe

    def nexus(self, fe: FrontEnd, nid: int, initiator: str, target: str) -> Nexus:
        n = fe.nexuses[nid] = Nexus(fe, nid, initiator, target, 1)
        return n

    def lookup_lu(self, target: str, lun: int):
        t = self.targets.get(target)
        return t.luns.get(lun) if t else None


@pytest.fixture
def clock(monkeypatch):
    """metrics' monotonic clock, moved by hand."""
    now = types.SimpleNamespace(t=100.0)
    monkeypatch.setattr(metrics_mod, "monotonic", lambda: now.t)
    return now


def command(m, em, clock, fe, nexus: int, lun: int, tag: int, direction: int, length: int,
            latency: float, status: int = 0, resid: int = 0) -> None:
    m.rx_cmnd(fe.ident, {"op": "rx_cmnd", "tag": tag, "nexus": nexus, "lun": lun, "dir": direction,
                         "len": length}, em.front_ends.get(fe.ident))
    clock.t += latency
    m.xmit_response(fe.ident, {"op": "xmit_response", "tag": tag, "status": status, "resid": resid})


def rows(snap: dict) -> tuple[dict, dict, dict]:
    return ({(r["target"], r["lun"]): r for r in snap["luns"]},
            {(r["front_end"], r["nexus"]): r for r in snap["sessions"]},
            {r["name"]: r for r in snap["front_ends"]})


def test_sets_add_up_per_lun_session_and_front_end(clock):
    em = FakeEmulator({"tA": 2, "tB": 1})
    fe1, fe2 = em.front_end(b"fe-1", "one"), em.front_end(b"fe-2", "two")
    em.nexus(fe1, 1, "ini-a", "tA")   # session a: LUNs 0 and 1 of tA
    em.nexus(fe2, 1, "ini-b", "tA")   # session b, another front end, same id: LUN 0 of tA
    em.nexus(fe2, 2, "ini-c", "tB")   # session c: tB
    m = metrics_mod.Metrics(em.lookup_lu)
    tag = iter(range(1000))
    for _ in range(3):
        command(m, em, clock, fe1, 1, 0, next(tag), WRITE, 4096, 100e-6)
        command(m, em, clock, fe1, 1, 1, next(tag), READ, 8192, 200e-6)
        command(m, em, clock, fe2, 1, 0, next(tag), READ, 512, 300e-6, resid=512)   # nothing moved
        command(m, em, clock, fe2, 2, 0, next(tag), WRITE, 1024, 400e-6)
    command(m, em, clock, fe2, 1, 0, next(tag), READ, 512, 50e-6, status=2)        # an error
    m.rx_cmnd(fe1.ident, {"tag": 999, "nexus": 1, "lun": 1, "dir": READ, "len": 4096}, fe1)   # in flight
    m.rx_cmnd(fe1.ident, {"tag": 998, "nexus": 7, "lun": 0, "dir": READ, "len": 4096}, fe1)   # no such nexus
    luns, sessions, fes = rows(m.snapshot(em))

    def counts(r):
        return r["commands"], r["read_bytes"], r["write_bytes"], r["errors"], r["in_flight"]
    assert counts(luns["tA", 0]) == (7, 0, 3 * 4096, 1, 0)
    assert counts(luns["tA", 1]) == (3, 3 * 8192, 0, 0, 1)
    assert counts(luns["tB", 0]) == (3, 0, 3 * 1024, 0, 0)
    assert counts(sessions["one", 1]) == (6, 3 * 8192, 3 * 4096, 0, 1)
    assert counts(sessions["two", 1]) == (4, 0, 0, 1, 0)
    assert counts(sessions["two", 2]) == (3, 0, 3 * 1024, 0, 0)
    assert counts(fes["one"]) == (6, 3 * 8192, 3 * 4096, 0, 1)
    assert counts(fes["two"]) == (7, 0, 3 * 1024, 1, 0)
    # percentiles of exactly the scope's commands, whichever sets they are in
    assert luns["tA", 0]["latency_us"] == {"p50": 100.0, "p90": 300.0, "p99": 300.0}
    assert luns["tA", 1]["latency_us"] == {"p50": 200.0, "p90": 200.0, "p99": 200.0}
    assert sessions["one", 1]["latency_us"] == {"p50": 200.0, "p90": 200.0, "p99": 200.0}
    assert sessions["two", 1]["latency_us"] == {"p50": 300.0, "p90": 300.0, "p99": 300.0}
    assert fes["two"]["latency_us"] == {"p50": 300.0, "p90": 400.0, "p99": 400.0}


def test_latency_is_that_of_the_last_ring_commands_across_sets(clock):
    """Two sessions on one LUN: the LUN's percentiles are those of its last
    RING commands, though each session keeps RING samples of its own."""
    em = FakeEmulator({"t": 1})
    fe = em.front_end(b"fe", "fe")
    em.nexus(fe, 1, "ini-slow", "t")
    em.nexus(fe, 2, "ini-fast", "t")
    m = metrics_mod.Metrics(em.lookup_lu)
    ring = metrics_mod.RING
    for tag in range(ring):
        command(m, em, clock, fe, 1, 0, tag, READ, 512, 5e-3)
    for tag in range(ring // 2):
        command(m, em, clock, fe, 2, 0, tag, READ, 512, 1e-4)
    luns, sessions, fes = rows(m.snapshot(em))
    for r in (luns["t", 0], fes["fe"]):
        assert r["commands"] == ring + ring // 2
        assert r["latency_us"] == {"p50": 5000.0, "p90": 5000.0, "p99": 5000.0}
    for tag in range(10):   # now the fast ones are more than half of the last RING
        command(m, em, clock, fe, 2, 0, tag, READ, 512, 1e-4)
    luns, sessions, fes = rows(m.snapshot(em))
    assert luns["t", 0]["latency_us"] == {"p50": 100.0, "p90": 5000.0, "p99": 5000.0}
    assert sessions["fe", 1]["latency_us"]["p50"] == 5000.0
    assert sessions["fe", 2]["latency_us"]["p99"] == 100.0


def test_forgotten_sessions_and_front_ends_keep_their_lun_counts(clock):
    em = FakeEmulator({"t": 1})
    fe1, fe2 = em.front_end(b"fe-1", "one"), em.front_end(b"fe-2", "two")
    em.nexus(fe1, 1, "ini-a", "t")
    em.nexus(fe1, 2, "ini-b", "t")
    em.nexus(fe2, 1, "ini-c", "t")
    m = metrics_mod.Metrics(em.lookup_lu)
    command(m, em, clock, fe1, 1, 0, 1, WRITE, 4096, 1e-3)
    command(m, em, clock, fe1, 2, 0, 2, WRITE, 4096, 2e-3)
    command(m, em, clock, fe2, 1, 0, 3, READ, 4096, 3e-3)
    m.rx_cmnd(fe1.ident, {"tag": 4, "nexus": 2, "lun": 0, "dir": WRITE, "len": 512}, fe1)
    m.nexus_gone(fe1.nexuses.pop(2), [])     # session b ends with a command in flight
    luns, sessions, fes = rows(m.snapshot(em))
    assert ("one", 2) not in sessions and sessions["one", 1]["commands"] == 1
    assert fes["one"]["commands"] == 2 and fes["one"]["in_flight"] == 1
    assert luns["t", 0]["commands"] == 3 and luns["t", 0]["in_flight"] == 1
    clock.t += 1e-3
    m.xmit_response(fe1.ident, {"tag": 4, "status": 0, "resid": 0})   # still counts for LUN and front end
    em.nexus(fe1, 2, "ini-b", "t")           # the id again: a session starting from zero
    luns, sessions, fes = rows(m.snapshot(em))
    assert sessions["one", 2]["commands"] == 0
    assert fes["one"]["commands"] == 3 and fes["one"]["write_bytes"] == 2 * 4096 + 512
    assert luns["t", 0]["commands"] == 4 and luns["t", 0]["in_flight"] == 0
    assert luns["t", 0]["latency_us"]["p99"] == 3000.0

    m.rx_cmnd(fe2.ident, {"tag": 5, "nexus": 1, "lun": 0, "dir": READ, "len": 512}, fe2)
    del em.front_ends[fe2.ident]             # front end two is gone, a command in flight
    m.nexus_gone(fe2.nexuses.pop(1), [])
    m.front_end_gone(fe2.ident)
    luns, sessions, fes = rows(m.snapshot(em))
    assert list(fes) == ["one"] and ("two", 1) not in sessions
    lun = luns["t", 0]
    assert (lun["commands"], lun["errors"], lun["in_flight"], lun["read_bytes"]) == (5, 1, 0, 4096)
    em.front_end(b"fe-2", "two")             # back with the same ident: counters from zero
    em.nexus(em.front_ends[b"fe-2"], 1, "ini-c", "t")
    command(m, em, clock, em.front_ends[b"fe-2"], 1, 0, 6, READ, 512, 1e-3)
    luns, sessions, fes = rows(m.snapshot(em))
    assert fes["two"]["commands"] == 1 and sessions["two", 1]["commands"] == 1
    assert luns["t", 0]["commands"] == 6


def test_aborted_and_reused_tags_end_as_errors(clock):
    em = FakeEmulator({"t": 1})
    fe = em.front_end(b"fe", "fe")
    em.nexus(fe, 1, "ini", "t")
    m = metrics_mod.Metrics(em.lookup_lu)
    for tag in (1, 2, 3):
        m.rx_cmnd(fe.ident, {"tag": tag, "nexus": 1, "lun": 0, "dir": READ, "len": 512}, fe)
    m.aborted(fe.ident, [1, 9])
    m.rx_cmnd(fe.ident, {"tag": 2, "nexus": 1, "lun": 0, "dir": READ, "len": 512}, fe)   # 2 reused
    (lun,), = rows(m.snapshot(em))[0].values(),
    assert (lun["commands"], lun["errors"], lun["in_flight"]) == (2, 2, 2)
    m.front_end_gone(fe.ident)
    (lun,), = rows(m.snapshot(em))[0].values(),
    assert (lun["commands"], lun["errors"], lun["in_flight"], lun["read_bytes"]) == (4, 4, 0, 0)


class _CountedIdent(bytes):
    """A front end's ident that counts the comparisons made with it."""
    compared = 0

    def __eq__(self, other: object) -> bool:
        _CountedIdent.compared += 1
        return bytes.__eq__(self, other)   # type: ignore[arg-type]

    __hash__ = bytes.__hash__


def test_a_gone_front_end_visits_only_its_own_commands_in_flight(clock):
    """A front end's end costs its own commands in flight: those of another
    front end (here a thousand) are not looked at, and stay in flight."""
    em = FakeEmulator({"t": 1})
    busy, gone = em.front_end(_CountedIdent(b"busy"), "busy"), em.front_end(b"gone", "gone")
    em.nexus(busy, 1, "ini-a", "t")
    em.nexus(gone, 1, "ini-b", "t")
    m = metrics_mod.Metrics(em.lookup_lu)
    for tag in range(1000):
        m.rx_cmnd(busy.ident, {"tag": tag, "nexus": 1, "lun": 0, "dir": READ, "len": 512}, busy)
    for tag in range(3):
        m.rx_cmnd(gone.ident, {"tag": tag, "nexus": 1, "lun": 0, "dir": READ, "len": 512}, gone)
    del em.front_ends[gone.ident]
    m.nexus_gone(gone.nexuses.pop(1), [])
    _CountedIdent.compared = 0
    m.front_end_gone(gone.ident)
    assert _CountedIdent.compared == 0
    (lun,), = rows(m.snapshot(em))[0].values(),
    assert (lun["commands"], lun["errors"], lun["in_flight"]) == (3, 3, 1000)


# ---------------------------------------------------------------- bounded sets, real STML

def test_counter_sets_exist_only_for_real_lus_and_live_sessions(stml_factory, client_factory):
    """TEST UNIT READYs to 2,000 absent LUNs make no set each (they share one
    of their session's), and a session's sets go when it ends; its counts stay
    with the LUN (issue 18: ~16 KB per absent LUN and session before)."""
    import time

    from scsi_target.mgmt import MgmtClient
    stml = stml_factory("ram:16MiB", "ram:16MiB")
    mgmt = MgmtClient(stml.endpoint)
    a = client_factory(stml.endpoint, initiator="iqn.2026-11.org.test:absent-luns")
    b = client_factory(stml.endpoint, initiator="iqn.2026-11.org.test:bystander")
    for lun in range(2, 2002):
        r = a.execute(lun, bytes(6))
        assert r.status == 2 and r.asc_ascq == (0x25, 0x00)    # LOGICAL UNIT NOT SUPPORTED
    assert b.execute(1, bytes(6)).status == 0
    snap = mgmt.call("status")
    assert snap["counter_sets"] == 2            # a's one set for absent LUNs, b's for LUN 1
    (sa,) = [s for s in snap["sessions"] if s["initiator"] == a.initiator]
    assert (sa["commands"], sa["errors"]) == (2000, 2000)

    for i in range(5):                          # sessions come and go: their sets go with them
        c = client_factory(stml.endpoint, initiator=f"iqn.2026-11.org.test:passing-{i}")
        assert c.execute(0, bytes(6)).status == 0
        c.close()
    a.close()
    deadline = time.monotonic() + 15
    while True:
        snap = mgmt.call("status")
        if len(snap["front_ends"]) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # b's set, and one per LUN (absent ones: one) for the counts of gone front ends
    assert snap["counter_sets"] == 3
    lun0 = next(r for r in snap["luns"] if r["lun"] == 0)
    assert lun0["commands"] == 5 and lun0["errors"] == 0


@pytest.mark.parametrize("cmd", ["session_list", "frontend_list", "scrape"])
def test_management_reports_rows_a_bounded_number_per_loop_turn(cmd, clock, monkeypatch):
    """`session list`, `frontend list` (and `status`) build the report in
    steps: at most FANOUT_STEP rows (each a sum of counter sets) per turn of
    the event loop, however many LUs and sessions there are (0267); before,
    all of them in one step. So does a Prometheus scrape (it built the whole
    snapshot in one step). A row's sets are summed in steps too: the front
    end's row, the sum of its 160 sessions' sets, merged all their latency
    samples in one step (0225). The rows are still all there and right."""
    import asyncio

    from stml import mgmt as mgmt_mod
    step = 16
    monkeypatch.setattr(mgmt_mod, "FANOUT_STEP", step)
    monkeypatch.setattr(metrics_mod, "FANOUT_STEP", step)
    em = FakeEmulator({"tA": 5 * step})
    fe = em.front_end(b"fe-1", "one")
    for n in range(1, 10 * step + 1):
        em.nexus(fe, n, f"ini-{n}", "tA")
    m = metrics_mod.Metrics(em.lookup_lu)
    for n in range(1, 10 * step + 1):
        command(m, em, clock, fe, n, n % (5 * step), n, WRITE, 512, 1e-4)
    mg = mgmt_mod.Management(em, None, gateway=None, metrics=m, portals=None,   # type: ignore[arg-type]
                             endpoints=[], traces=None)   # type: ignore[arg-type]
    reports, merged = [0], [0]   # rows built; sets whose latency samples were merged into a row's
    real, real_recent = metrics_mod.summed, metrics_mod.Counters.recent

    def counted(sets, in_flight, row):
        yield from real(sets, in_flight, row)
        reports[0] += 1
    monkeypatch.setattr(metrics_mod, "summed", counted)

    def recent(c):
        merged[0] += 1
        return real_recent(c)
    monkeypatch.setattr(metrics_mod.Counters, "recent", recent)

    async def run() -> tuple[list, list[int], list[int]]:
        if cmd == "scrape":   # a Prometheus scrape, as its HTTP thread asks the loop for it
            exporter = metrics_mod.PrometheusExporter(m, em, asyncio.get_running_loop())
            work = exporter._async_snapshot()
        else:
            work = getattr(mg, cmd)()
        job = asyncio.get_running_loop().create_task(work)
        per_turn, merged_per_turn = [], []
        while not job.done():
            before, merged_before = reports[0], merged[0]
            await asyncio.sleep(0)
            per_turn.append(reports[0] - before)
            merged_per_turn.append(merged[0] - merged_before)
        return job.result(), per_turn, merged_per_turn
    result, per_turn, merged_per_turn = asyncio.run(run())
    assert sum(per_turn) == 5 * step + 10 * step + 1          # every LU, session and front end
    assert max(per_turn) <= step, per_turn
    # each LU's 2 sessions, and the front end's 160 (one-set session rows merge nothing)
    assert sum(merged_per_turn) == 2 * 5 * step + 10 * step
    assert max(merged_per_turn) <= 2 * step, merged_per_turn
    if cmd == "scrape":
        assert len(result["luns"]) == 5 * step and len(result["sessions"]) == 10 * step
        assert sum(r["commands"] for r in result["sessions"]) == 10 * step
    elif cmd == "session_list":
        assert sorted(r["nexus"] for r in result) == list(range(1, 10 * step + 1))
        assert all(r["commands"] == 1 and r["write_bytes"] == 512 for r in result)
    else:
        assert [(r["name"], r["nexuses"], r["commands"]) for r in result] == [("one", 10 * step, 10 * step)]
