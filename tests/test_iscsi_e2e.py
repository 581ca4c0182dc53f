"""fetd_tcp against real initiators: libiscsi's tools and conformance suite, qemu-img."""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from support.procs import children_by_module, run
from support.target import IQN, Target, cunit_verdicts

pytestmark = pytest.mark.skipif(not shutil.which("iscsi-ls"), reason="libiscsi-bin is not installed")

SECRET = "initiator-secret-1"
TSECRET = "target-secret-22"
DSECRET = "discovery-secret-3"


@pytest.fixture(scope="module")
def target():
    with Target("--lun", "ram:64MiB", "--lun", "ram:16MiB") as t:
        yield t


def test_discovery_lists_target_and_luns(target):
    out = run(["iscsi-ls", "-s", f"iscsi://{target.portal}"]).stdout
    assert f"Target:{IQN} Portal:{target.portal},1" in out
    luns = [line.split()[0] for line in out.splitlines() if line.startswith("Lun:")]
    assert luns == ["Lun:0", "Lun:1"]


def test_inquiry_and_capacity(target):
    inq = run(["iscsi-inq", target.url()]).stdout
    assert "Vendor:SCSITGT" in inq and "Product:PY-STML DISK" in inq
    assert "Peripheral Device Type:DIRECT_ACCESS" in inq
    cap = run(["iscsi-readcapacity16", target.url()]).stdout
    assert "RETURNED LOGICAL BLOCK ADDRESS:131071" in cap
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in cap
    assert "Total size:67108864" in cap
    cap1 = run(["iscsi-readcapacity16", target.url(1)]).stdout
    assert "Total size:16777216" in cap1


def test_header_and_data_digest(target):
    out = run(["iscsi-readcapacity16", target.url(query="?header_digest=crc32c")]).stdout
    assert "Total size:67108864" in out


def test_qemu_img_convert_and_compare(target, tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-utils is not installed")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(64 << 20))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target.url()])
    out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.url()]).stdout
    assert "Images are identical" in out


def test_bulk_data_crosses_to_the_stml_in_shared_memory(target, tmp_path):
    """Same host: fetd_tcp receives big write segments into memory it lends the
    STML, and sends read data from memory the STML lends it; each process maps
    the other's memfd, and what qemu writes that way reads back intact."""
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-utils is not installed")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 << 20))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), target.url(1)])
    out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.url(1)]).stdout
    assert "Images are identical" in out
    kids = children_by_module(target.proc.pid)
    for name in ("stml", "fetd_tcp"):
        maps = Path(f"/proc/{kids[name]}/maps").read_text()
        assert "/memfd:scsi-target-write-data" in maps, name
        assert "/memfd:scsi-target-read-data" in maps, name


def test_standard_event_loop(tmp_path):
    """SCSI_TARGET_LOOP=asyncio: every process runs on asyncio's own loop
    instead of uvloop, and the data path (shared read memory included) works."""
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-utils is not installed")
    t = Target("--lun", "ram:32MiB", env={"SCSI_TARGET_LOOP": "asyncio"})
    try:
        src = tmp_path / "src.img"
        src.write_bytes(os.urandom(32 << 20))
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), t.url()])
        out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), t.url()]).stdout
        assert "Images are identical" in out
        children = subprocess.run(["pgrep", "-P", str(t.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2   # the STML and fetd_tcp
        for pid in children:
            assert "uvloop" not in Path(f"/proc/{pid}/maps").read_text(), pid
    finally:
        t.stop()


def test_qemu_img_segment_crossing_pattern(target, tmp_path):
    """1 MiB writes and reads cross the negotiated MaxRecvDataSegmentLength
    (256 KiB) and MaxBurstLength: every 512-byte block carries its own number."""
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-utils is not installed")
    src = tmp_path / "pattern.img"
    src.write_bytes(b"".join(i.to_bytes(8, "big") * 64 for i in range(32768)))  # 16 MiB
    run(["qemu-img", "convert", "-n", "-S", "0", "-f", "raw", "-O", "raw", str(src), target.url(1)])
    out = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), target.url(1)]).stdout
    assert "Images are identical" in out


def test_conformance_iscsi_family(target):
    """libiscsi's conformance suite, iSCSI family: no failures (by CUnit's verdicts)."""
    p = run(["iscsi-test-cu", "-d", "-v", "-t", "iSCSI", target.url()], timeout=300, check=False)
    verdicts = cunit_verdicts(p.stdout)
    assert len(verdicts) >= 15, p.stdout[-3000:]
    failed = sorted(t for t, v in verdicts.items() if v == "failed")
    assert not failed, f"failed: {failed}\n{p.stdout[-5000:]}"


@pytest.fixture(scope="module")
def chap_target(tmp_path_factory):
    d = tmp_path_factory.mktemp("chap")
    cfg = d / "target.toml"
    cfg.write_text(textwrap.dedent(f"""
        discovery_chap = {{ user = "disc", secret = "{DSECRET}" }}

        [[target]]
        name = "{IQN}"
        chap = {{ user = "alice", secret = "{SECRET}" }}
        mutual_chap = {{ user = "tgt", secret = "{TSECRET}" }}
        [[target.lun]]
        backend = "ram"
        size = "16MiB"

        [[target]]
        name = "iqn.2026-11.org.scsi-target:acl"
        acl = ["iqn.2026-11.org.example:allowed"]
        [[target.lun]]
        backend = "ram"
        size = "16MiB"
    """))
    cfg.chmod(0o600)
    with Target(config=str(cfg), data_dir=str(d)) as t:
        yield t


def test_chap_required(chap_target):
    t = chap_target
    bad = run(["iscsi-inq", t.url()], check=False)
    assert bad.returncode != 0
    wrong = run(["iscsi-inq", t.url(auth="alice%wrong-secret-123@")], check=False)
    assert wrong.returncode != 0
    good = run(["iscsi-inq", t.url(auth=f"alice%{SECRET}@")]).stdout
    assert "Vendor:SCSITGT" in good


def test_chap_mutual(chap_target):
    t = chap_target
    q = f"?target_user=tgt&target_password={TSECRET}"
    good = run(["iscsi-inq", t.url(auth=f"alice%{SECRET}@", query=q)]).stdout
    assert "Vendor:SCSITGT" in good
    q_bad = "?target_user=tgt&target_password=not-the-secret"
    bad = run(["iscsi-inq", t.url(auth=f"alice%{SECRET}@", query=q_bad)], check=False)
    assert bad.returncode != 0


def test_discovery_chap(chap_target):
    t = chap_target
    assert run(["iscsi-ls", f"iscsi://{t.portal}"], check=False).returncode != 0
    out = run(["iscsi-ls", f"iscsi://disc%{DSECRET}@{t.portal}"]).stdout
    assert f"Target:{IQN}" in out


def test_chap_secret_never_logged(chap_target):
    run(["iscsi-inq", chap_target.url(auth="alice%wrong-secret-123@")], check=False)
    log = chap_target.log()
    assert SECRET not in log and TSECRET not in log and DSECRET not in log


def test_acl_limits_login_and_discovery(chap_target):
    t = chap_target
    acl_iqn = "iqn.2026-11.org.scsi-target:acl"
    listed = run(["iscsi-ls", "-i", "iqn.2026-11.org.example:other",
                  f"iscsi://disc%{DSECRET}@{t.portal}"]).stdout
    assert IQN in listed and acl_iqn not in listed
    denied = run(["iscsi-inq", "-i", "iqn.2026-11.org.example:other", t.url(iqn=acl_iqn)], check=False)
    assert denied.returncode != 0
    allowed = run(["iscsi-inq", "-i", "iqn.2026-11.org.example:allowed", t.url(iqn=acl_iqn)]).stdout
    assert "Vendor:SCSITGT" in allowed
