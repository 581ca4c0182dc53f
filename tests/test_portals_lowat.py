"""An iSCSI connection's socket holds at most NOTSENT_LOWAT unsent bytes
(decision 0428): set on each portal's listening socket, inherited by the
connections it accepts, on asyncio's loop and on uvloop (what `scsi-target
run` uses); an administrator's lower system default stays theirs."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Callable

import pytest

from fetd_tcp import portals
from fetd_tcp.portals import PortalSpec, Portals


def _loops() -> list[Callable[[], asyncio.AbstractEventLoop]]:
    loops: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
    try:
        import uvloop
        loops.append(uvloop.new_event_loop)
    except ImportError:
        pass
    return loops


@pytest.mark.parametrize("new_loop", _loops())
def test_an_accepted_connection_holds_at_most_notsent_lowat_unsent(new_loop) -> None:
    got: list[int] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, p: PortalSpec) -> None:
        sock = writer.get_extra_info("socket")
        got.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT))
        writer.close()

    async def main() -> None:
        spec = PortalSpec("127.0.0.1", 0, 1)
        ports = Portals([spec], accept, 1 << 16, lambda states: None, lambda: None, lambda: "")
        await ports.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", spec.port)
            await reader.read()   # closed by accept
            writer.close()
        finally:
            for server in ports.servers.values():
                server.close()

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == [portals.NOTSENT_LOWAT] and portals.NOTSENT_LOWAT == 128 << 10


def test_a_lower_system_default_is_left_alone(tmp_path: Path) -> None:
    system = tmp_path / "tcp_notsent_lowat"
    system.write_text("16384\n")
    assert portals.notsent_lowat(str(system)) is None
    system.write_text("4294967295\n")   # the kernel's default: no limit
    assert portals.notsent_lowat(str(system)) == 128 << 10
    assert portals.notsent_lowat(str(tmp_path / "none")) == 128 << 10
