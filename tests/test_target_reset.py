"""TARGET WARM/COLD RESET (issue 18): refused by default through the real
iSCSI front end ("function authorization failed", nobody else disturbed),
allowed with `[[target]] target_reset = true`; an allowed reset establishes
its unit attentions a bounded number per turn of the event loop, with one
asynchronous event per nexus, and a burst of resets costs two fan-outs."""
from __future__ import annotations

import asyncio
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from backends import open_backend
from fetd_tcp import pdu as P
from stml import emulator as emulator_mod
from stml.api import Op, Tmf, TmfResponse
from stml.config import ConfigError, load
from stml.emulator import Emulator, Target as StmlTarget
from stml.lu import LogicalUnit, LunOptions
from support.cli import status
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

GOOD, CHECK_CONDITION = 0x00, 0x02
AUTH_FAILED = 6                   # RFC 7143 11.6.1 "function authorization failed"
POWER_ON_RESET = (0x29, 0x00)


def login(t: Target, name: str) -> RawInitiator:
    host, port = t.portal.rsplit(":", 1)
    ini = RawInitiator(host, int(port), initiator=name)
    assert ini.login(IQN).status_class == 0
    return ini


def tmf(ini: RawInitiator, fn: int, lun: int = 0) -> int:
    itt = ini._next_itt()
    ini.send(P.TaskMgmtRequest(itt, fn, P.int_to_lun(lun), P.RESERVED_TAG, ini.cmd_sn, ini.exp_stat_sn,
                               immediate=True))
    while True:
        pdu, _ = ini.recv()
        if isinstance(pdu, P.TaskMgmtResponse) and pdu.itt == itt:
            return pdu.response


def tur(ini: RawInitiator, lun: int) -> tuple[int, tuple[int, int, int] | None]:
    status, sense, _ = ini.command(bytes(6), lun)
    return status, ((sense[2] & 0xF, sense[12], sense[13]) if sense else None)


def test_target_resets_are_refused_by_default_and_disturb_no_one():
    with Target("--lun", "ram:16MiB", "--lun", "ram:16MiB") as t:
        a = login(t, "iqn.2026-11.org.test:resetter")
        b = login(t, "iqn.2026-11.org.test:bystander")
        try:
            b.write16(8, b"\x5a" * 512, lun=1)
            assert tmf(a, P.TMF_TARGET_WARM_RESET) == AUTH_FAILED
            assert tmf(a, P.TMF_TARGET_COLD_RESET) == AUTH_FAILED
            for lun in (0, 1):                     # no unit attention for anyone
                assert tur(b, lun) == (GOOD, None)
                assert tur(a, lun) == (GOOD, None)   # and the cold reset closed nothing
            assert b.read16(8, 1, lun=1) == b"\x5a" * 512
            assert all(lu["unit_attentions"] == 0 for lu in status(t.data_dir)["luns"])
        finally:
            a.close()
            b.close()


def test_a_target_that_allows_resets_resets(tmp_path):
    config = tmp_path / "target.toml"
    lun = '[[target.lun]]\nlun = {}\nbackend = "ram"\nsize = "16MiB"\n'
    config.write_text(f'[[target]]\nname = "{IQN}"\ntarget_reset = true\n' + lun.format(0) + lun.format(1))
    with Target(config=str(config)) as t:
        a = login(t, "iqn.2026-11.org.test:resetter")
        b = login(t, "iqn.2026-11.org.test:bystander")
        try:
            assert tmf(a, P.TMF_TARGET_WARM_RESET) == P.TMF_RESP_COMPLETE
            assert [lu["unit_attentions"] for lu in status(t.data_dir)["luns"]] == [2, 2]   # one per nexus per LU
            for ini in (a, b):
                for lun in (0, 1):
                    assert tur(ini, lun) == (CHECK_CONDITION, (0x6, *POWER_ON_RESET))
                    assert tur(ini, lun) == (GOOD, None)
            assert [lu["unit_attentions"] for lu in status(t.data_dir)["luns"]] == [0, 0]
        finally:
            a.close()
            b.close()


def test_target_reset_setting_is_checked(tmp_path):
    config = tmp_path / "target.toml"
    config.write_text(f'[[target]]\nname = "{IQN}"\ntarget_reset = "yes"\n')
    with pytest.raises(ConfigError) as e:
        load(str(config))
    assert "target[0].target_reset" in str(e.value) and "\n" not in str(e.value)
    config.write_text(f'[[target]]\nname = "{IQN}"\n')
    assert load(str(config)).targets[0].target_reset is False     # off unless asked for


# ---------------------------------------------------------------- the fan-out, counted in-process

LUNS, NEXUSES = 40, 300


def reset_emulator(sent: list) -> Emulator:
    luns = {n: LogicalUnit(IQN, n, open_backend("ram", 1 << 20, None, False),
                           LunOptions(kind="ram", size=1 << 20), None) for n in range(LUNS)}
    emu = Emulator([StmlTarget(IQN, luns, target_reset=True)], lambda ident, h, f: sent.append(h),
                   ThreadPoolExecutor(1))
    for lu in luns.values():
        lu.template = emu.templates["disk"]
    emu.handle(b"fe", {"op": Op.REGISTER, "version": [1, 0], "kind": "test", "name": "t",
                       "heartbeat_ms": 1000, "aen": True}, [])
    for n in range(1, NEXUSES + 1):
        emu.handle(b"fe", {"op": Op.REGISTER_NEXUS, "nexus": n, "initiator": f"iqn.2026-11.org.test:{n}",
                           "target": IQN, "tpg": 1}, [])
    return emu


def test_target_reset_fans_out_in_bounded_steps_with_one_event_per_nexus(monkeypatch):
    monkeypatch.setattr(emulator_mod, "FANOUT_STEP", 1000)
    sent: list = []
    emu = reset_emulator(sent)
    calls = []
    real = emu.establish_ua
    def counted(lu, asc, keys, *a, **kw):   # (LU, nexus) entries established
        calls.extend((lu, k) for k in keys)
        return real(lu, asc, keys, *a, **kw)
    monkeypatch.setattr(emu, "establish_ua", counted)
    lus = list(emu.targets[IQN].luns.values())
    steps: list[int] = []

    async def run() -> None:
        for tag in (1, 2, 3, 4):     # a burst of resets
            emu.handle(b"fe", {"op": Op.RX_TMF, "tag": tag, "nexus": 1, "fn": int(Tmf.TARGET_WARM_RESET),
                               "lun": 0, "ref": None}, [])
        while len([h for h in sent if h["op"] == Op.TMF_DONE]) < 4:
            steps.append(sum(len(lu.unit_attentions) for lu in lus))
            await asyncio.sleep(0)
    asyncio.run(run())
    done = [h for h in sent if h["op"] == Op.TMF_DONE]
    assert [h["response"] for h in done] == [TmfResponse.COMPLETE] * 4
    assert all(len(lu.unit_attentions) == NEXUSES for lu in lus)
    growth = max(b - a for a, b in zip(steps, steps[1:]))
    assert 0 < growth <= 1000                                # never the whole 12,000 in one turn
    assert len(calls) == 2 * LUNS * NEXUSES                  # four resets, two fan-outs
    aens = [h for h in sent if h["op"] == Op.REPORT_AEN]
    assert len(aens) == 2 * NEXUSES and {h["lun"] for h in aens} == {0}   # not one per LU


def test_refused_target_reset_touches_nothing():
    sent: list = []
    emu = reset_emulator(sent)
    emu.targets[IQN].target_reset = False
    emu.handle(b"fe", {"op": Op.RX_TMF, "tag": 1, "nexus": 1, "fn": int(Tmf.TARGET_COLD_RESET),
                       "lun": 0, "ref": None}, [])
    assert [h["response"] for h in sent if h["op"] == Op.TMF_DONE] == [TmfResponse.NOT_AUTHORIZED]
    assert not any(lu.unit_attentions for lu in emu.targets[IQN].luns.values())
    assert not [h for h in sent if h["op"] == Op.REPORT_AEN]
