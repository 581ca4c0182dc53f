"""fetd_spi against a real target: what initiators write through the
simulated bus lands on the STML's LU and reads back through iSCSI; runs
repeat exactly; scripts/spi_sim.py runs its scenarios."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fetd_spi.frontend import run_scenario
from fetd_spi.sim import scenario_from_dict
from fetd_spi.workload import block_writer
from support.rawiscsi import RawInitiator
from support.target import IQN, Target

ROOT = Path(__file__).resolve().parent.parent
GOOD = 0x00


def writers(blocks: int = 16) -> dict:
    return {"name": "e2e", "width": 16, "mode": "fast-10", "duration_ms": 30,
            "target": {"id": 7, "service_us": 100, "media_mb_s": 50, "slots": 2},
            "initiator": [{"id": i, "queue_depth": 3, "blocks": blocks, "read_fraction": 0.0, "fair": True,
                           "sequential": True, "region_blocks": 2048} for i in (6, 1, 9)]}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("spi")
    with Target("--lun", f"file:{d / 'lun.img'},size=16MiB", data_dir=str(d)) as t:
        t.endpoint = f"ipc://{d / 'stml.sock'}"
        yield t


def run(scenario: dict, endpoint: str):
    return asyncio.run(run_scenario(scenario_from_dict(scenario), endpoint))


def test_writes_through_the_bus_read_back_through_iscsi(target):
    sim, results = run(writers(), target.endpoint)
    writes = [c for g in sim.generators for c in g.initiator.completed]
    assert len(writes) > 20 and all(c.status == GOOD for c in writes)
    assert {r.id for r in results.initiators if r.commands} == {6, 1, 9}
    host, port = target.portal.rsplit(":", 1)
    ini = RawInitiator(host, int(port), initiator="iqn.2026-11.org.test:spi-check")
    try:
        assert ini.login(IQN).status_class == 0
        for cmd in writes:
            blocks = len(cmd.data_out) // 512
            data = ini.read16(cmd.lba, blocks)
            assert data == cmd.data_out
            assert block_writer(data[:512]) == (cmd.initiator, cmd.lba)
    finally:
        ini.close()


def test_reads_through_the_bus_return_what_was_written(target):
    """A second run reads the regions the writers filled: the data comes back
    over DATA IN, each block naming the LBA it was read from."""
    run(writers(), target.endpoint)
    readers = writers()
    readers["name"] = "e2e-read"
    for i in readers["initiator"]:
        i["read_fraction"] = 1.0
    sim, results = run(readers, target.endpoint)
    reads = [c for g in sim.generators for c in g.initiator.completed]
    assert len(reads) > 20 and all(c.status == GOOD and len(c.data_in) == 16 * 512 for c in reads)
    assert sum(block_writer(c.data_in[:512]) is not None for c in reads) > 0
    assert all(r.bad_reads == 0 for r in results.initiators)


def test_runs_repeat_exactly(target):
    """The simulation's clock stops while the STML works: two runs of one
    scenario measure the same, however loaded the machine is."""
    first = run(writers(8), target.endpoint)[1].as_dict()
    assert run(writers(8), target.endpoint)[1].as_dict() == first


def test_acl_refuses_unknown_initiators(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[[target]]\nname = "{IQN}"\nacl = ["iqn.2026-11.org.test:someone-else"]\n'
                   f'[[target.lun]]\nbackend = "ram"\nsize = "4MiB"\n')
    with Target(config=str(cfg), data_dir=str(tmp_path)):
        with pytest.raises(PermissionError, match="not in the ACL"):
            run(writers(), f"ipc://{tmp_path / 'stml.sock'}")


def test_spi_sim_scenarios(tmp_path):
    """The smoke run of scripts/spi_sim.py: short scenarios, its own STML.
    Under saturation plain arbitration favours high IDs; with fairness the
    lowest ID gets a share near the highest's (model outputs, reproducible)."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "spi_sim.py"), "--duration-ms", "60",
                        "--scenario", "saturated", "--scenario", "saturated-fair", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "saturated: 16-bit fast-20 bus" in p.stdout and "saturated-fair" in p.stdout
    runs = {r["scenario"]: r for r in json.loads((out / "results.json").read_text())}
    plain = {s["id"]: s["mb_s"] for s in runs["saturated"]["initiators"]}
    fair = {s["id"]: s["mb_s"] for s in runs["saturated-fair"]["initiators"]}
    assert plain[6] > plain[2] > plain[8] and plain[6] > 10 * plain[8]
    assert min(fair.values()) > 0.5 * max(fair.values())
    assert (out / "spi.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
