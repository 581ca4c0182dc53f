#!/usr/bin/env python3
"""Long fuzz run with the generators of the CI fuzz tests (tests/support/fuzzgen.py).

    python scripts/fuzz.py --cases 100000 --seed 8 [--only codec,login,...]

Targets: codec, text, login, connection (sans-IO, in process); cdb (random CDBs through
fetd_loopback into a private STML); zmq (malformed contract messages to that STML);
abuse (resource abuse: legal commands with the largest lengths, counts and ranges their
fields allow, against a 1 GiB thin file LUN and a RAM LUN; the STML's RSS must stay under
a bound no request field moves, and each command must finish within 2 s plus 1 s per
20 MB it may legitimately move; SANITIZE, whose work is the medium, is exempt from the
time bound). `abuse` is not in the default set: --only abuse.
The case budget is split between the chosen targets; the count actually run is printed.
Exit status 1 on any finding (hypothesis prints the shrunk case)."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from support import fuzzgen as G  # noqa: E402

PURE = ("codec", "text", "login", "connection")
LIVE = ("cdb", "zmq")
ABUSE_LUNS = {0: (1 << 30) // 512, 1: (32 << 20) // 512}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--only", default=",".join(PURE + LIVE))
    args = ap.parse_args()
    chosen = [t for t in args.only.split(",") if t]
    per = max(1, args.cases // len(chosen))
    counts: dict[str, int] = {}
    failed = False
    stml = None
    for name in chosen:
        counter = [0]
        if name in LIVE and stml is None:
            stml = _start_stml()
        if name == "abuse":
            abuse_stml = _start_abuse_stml()
        fn = _target(name, counter, abuse_stml if name == "abuse" else stml)
        run = seed(args.seed)(settings(max_examples=per, deadline=None, database=None,
                                       suppress_health_check=list(HealthCheck))(fn))
        t0 = time.monotonic()
        try:
            run()
        except Exception as e:  # a finding: hypothesis has printed the falsifying example
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            failed = True
        counts[name] = counter[0]
        if hasattr(fn, "report"):
            fn.report()
        print(f"{name}: {counter[0]} cases in {time.monotonic() - t0:.0f}s", flush=True)
        if name == "abuse":
            abuse_stml.stop()
            shutil.rmtree(abuse_stml.data_dir, ignore_errors=True)
    if stml is not None:
        stml.stop()
        shutil.rmtree(stml.data_dir, ignore_errors=True)
    print(f"total: {sum(counts.values())} cases, seed {args.seed}, {'FAILED' if failed else 'no findings'}")
    return 1 if failed else 0


def _start_stml():
    from conftest import StmlProcess, short_dir
    return StmlProcess(Path(short_dir()), ("ram:16MiB", "ram:4MiB")).start()


def _start_abuse_stml():
    from conftest import StmlProcess, short_dir
    d = Path(short_dir())
    return StmlProcess(d, (f"file:{d}/big.img,size=1GiB", "ram:32MiB")).start()


def _target(name: str, counter: list, stml) -> Any:
    if name == "codec":
        @given(st.one_of(G.mutated_pdu(), st.binary(max_size=120)))
        def f(buf):
            counter[0] += 1
            G.run_decode(buf)
    elif name == "text":
        @given(st.one_of(G.text_segments(), st.binary(max_size=200)))
        def f(buf):
            counter[0] += 1
            G.run_text(buf)
    elif name == "login":
        @given(G.login_stream())
        def f(stream):
            counter[0] += 1
            G.run_login(stream)
    elif name == "connection":
        @given(G.conn_stream(), st.booleans())
        def f(stream, discovery):
            counter[0] += 1
            G.run_connection(stream, discovery)
    elif name == "cdb":
        from fetd_loopback import LoopbackClient
        client = LoopbackClient(stml.endpoint, timeout=20, initiator="iqn.2026-11.org.test:fuzz-cdb").open()

        @given(G.random_cdb(), st.integers(0, 2))
        def f(case, lun):
            counter[0] += 1
            G.run_cdb(client, case, lun)
    elif name == "zmq":
        fe = G.ZmqPoker(stml.endpoint)

        @given(G.zmq_messages())
        def f(frames):
            counter[0] += 1
            G.run_zmq(fe, frames)
    elif name == "abuse":
        from fetd_loopback import LoopbackClient
        client = LoopbackClient(stml.endpoint, timeout=120, initiator="iqn.2026-11.org.test:fuzz-abuse").open()
        limit = G.rss(stml.pid) + (32 << 20) + (128 << 20)
        slowest = [0.0, None]

        @given(st.sampled_from(sorted(ABUSE_LUNS)).flatmap(
            lambda lun: st.tuples(st.just(lun), G.abusive_cdb(ABUSE_LUNS[lun]))))
        def f(drawn):
            lun, case = drawn
            counter[0] += 1
            t0 = time.monotonic()
            G.run_abuse(client, case, lun, stml.pid, limit)
            took = time.monotonic() - t0
            kind, legit = case[0], case[4]
            if legit >= 0:
                assert took <= 2 + legit / 20e6, (kind, case[1].hex(), took)
                if took > slowest[0]:
                    slowest[:] = [took, kind]
        setattr(f, "report", lambda: print(f"abuse: slowest bounded command {slowest[1]} {slowest[0]:.2f}s, "
                                           f"STML RSS {G.rss(stml.pid) >> 20} MiB (limit {limit >> 20} MiB)"))
    else:
        raise SystemExit(f"unknown target {name!r}")
    return f


if __name__ == "__main__":
    sys.exit(main())
