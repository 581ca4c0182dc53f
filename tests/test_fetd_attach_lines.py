"""What fetd_tcp says about its STML (decision 0704): a portal opened before
any STML answers says it waits for one (a listener alone serves nobody),
and every attach and every loss is a line. In-process: an IscsiFrontEnd and
a FakeStml on a stream socket."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fetd_tcp.portals import PortalSpec
from fetd_tcp.server import IscsiFrontEnd
from support.aio import until
from support.fakestml import FakeStml



def test_listening_before_an_stml_says_it_waits_and_each_attach_and_loss_is_said(tmp_path: Path, capsys,
                                                                                 caplog) -> None:
    caplog.set_level(logging.INFO, "fetd_tcp")
    endpoint = f"ipc://{tmp_path}/stml"
    out: list[str] = []

    def lines() -> list[str]:
        out.extend(capsys.readouterr().out.splitlines())
        return out

    async def main() -> None:
        fe = IscsiFrontEnd(endpoint, [PortalSpec("127.0.0.1", 0, 1)])
        await fe.start()
        stml = None
        try:
            listening = [x for x in lines() if x.startswith("fetd_tcp: listening on 127.0.0.1:")]
            assert len(listening) == 1
            assert listening[0].endswith(f"(tpgt 1); waiting for the STML at {endpoint} "
                                         "(logins refused until it answers)"), listening
            stml = FakeStml(str(tmp_path / "stml"), version=(1, 10), caps=[])
            await until(lambda: fe.link.connected.is_set(), "the attach")
            stml._drop()   # the STML goes away, and comes back on the same socket
            await until(lambda: "link lost to the STML at" in caplog.text, "the loss")
            await until(lambda: stml.accepts == 2 and fe.link.connected.is_set(), "the second attach")
        finally:
            await fe.stop()
            if stml is not None:
                stml.close()

    asyncio.run(main())
    attached = [x for x in lines() if x.startswith("fetd_tcp: attached to STML")]
    assert attached == [f"fetd_tcp: attached to STML at {endpoint}"] * 2
    assert caplog.text.count(f"link lost to the STML at {endpoint}: closing 0 session(s); logins refused") == 1
