"""What a thin file LUN makes qemu's iSCSI driver do (decision 0820): reads
are one command each, while block status (qemu-img map, convert) still finds
the holes. Counted in a trace of the contract, never timed."""
from __future__ import annotations

import json
import re
import subprocess

from stml.trace.report import commands
from support.target import Target


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True, timeout=120).stdout


def _get_lba_status(cdb: bytes) -> bool:
    return cdb[0] == 0x9E and cdb[1] & 0x1F == 0x12


def test_reads_of_a_fragmented_thin_lun_cost_one_command_each(tmp_path):
    img = tmp_path / "thin.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    trace = tmp_path / "t.trace"
    with Target("--lun", f"file:{img}", "--trace", str(trace)) as t:
        url = t.url(0)
        # 4 KiB written every 20 KiB over the first 4 MiB: a fragmented thin LUN
        _qemu_img("bench", "-w", "-f", "raw", "-c", "200", "-s", "4k", "-S", "20k", "--pattern", "0x5a", url)
        _qemu_img("bench", "-f", "raw", "-c", "64", "-s", "64k", "-S", "64k", url)
        extents = json.loads(_qemu_img("map", "--output=json", "-f", "raw", url))
        inq = subprocess.run(["iscsi-inq", "--evpd=1", "--pagecode=176", url], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    done = list(commands(str(trace)))
    reads = [c for c in done if c.cdb[0] in (0x28, 0x88) and c.length == 64 << 10]
    # the only GET LBA STATUS commands are qemu-img map's, after the reads
    first_status = min((c.index for c in done if _get_lba_status(c.cdb)), default=None)
    assert first_status is not None and first_status > max(c.index for c in reads)
    assert len(reads) == 64   # none answered from an allocation map in qemu
    # (qemu keeps no allocation map without a reported granularity, so it asks nothing before a read)
    assert re.search(r"^optimal unmap granularity:0$", inq, re.M)
    assert re.search(r"^ugavalid:0$", inq, re.M)
    # and block status still tells data from holes
    data = [e for e in extents if e["data"]]
    holes = [e for e in extents if not e["data"]]
    assert data and holes
    assert data[0]["start"] == 0 and data[0]["length"] == 4096
    assert holes[0]["start"] == 4096 and holes[0]["length"] == 16384
