#!/usr/bin/env python3
"""Long fuzz run with the generators of the CI fuzz tests (tests/fuzzgen.py).

    python scripts/fuzz.py --cases 100000 --seed 8 [--only codec,login,...]

Targets: codec, text, login, connection (sans-IO, in process); cdb (random CDBs through
fetd_loopback into a private STML); zmq (malformed contract messages to that STML).
The case budget is split between the chosen targets; the count actually run is printed.
Exit status 1 on any finding (hypothesis prints the shrunk case)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzzgen as G  # noqa: E402

PURE = ("codec", "text", "login", "connection")
LIVE = ("cdb", "zmq")


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
        fn = _target(name, counter, stml)
        run = seed(args.seed)(settings(max_examples=per, deadline=None, database=None,
                                       suppress_health_check=list(HealthCheck))(fn))
        t0 = time.monotonic()
        try:
            run()
        except Exception as e:  # a finding: hypothesis has printed the falsifying example
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            failed = True
        counts[name] = counter[0]
        print(f"{name}: {counter[0]} cases in {time.monotonic() - t0:.0f}s", flush=True)
    if stml is not None:
        stml.stop()
    print(f"total: {sum(counts.values())} cases, seed {args.seed}, {'FAILED' if failed else 'no findings'}")
    return 1 if failed else 0


def _start_stml():
    from conftest import StmlProcess, short_dir
    return StmlProcess(Path(short_dir()), ("ram:16MiB", "ram:4MiB")).start()


def _target(name: str, counter: list, stml) -> object:
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
    else:
        raise SystemExit(f"unknown target {name!r}")
    return f


if __name__ == "__main__":
    sys.exit(main())
