"""A device-side ring over test guest memory: a DriverQueue (the guest's side)
and a started fetd_vhost Virtqueue serving it, for tests that drive the
device's ring code without a vhost-user connection."""
from __future__ import annotations

from fetd_vhost import virtqueue as V
from fetd_vhost.memory import GuestMemory, Region, RegionSpec
from support.vhost_master import DriverQueue, GuestRam


def served_ring(ram: GuestRam, layout: list[tuple[int, int, int]],
                size: int = 16) -> tuple[DriverQueue, V.Virtqueue, GuestMemory]:
    """Queue 2 of `size` entries in `ram`, its memory table made of `layout`'s
    (guest offset, length, offset in ram's memfd) regions, event index and
    indirect descriptors on, started and enabled."""
    mem = GuestMemory([Region(RegionSpec(ram.GPA_BASE + g, n, ram.UVA_BASE + g, off), ram.fd)
                       for g, n, off in layout])
    dq = DriverQueue(ram, 2, size)
    vq = V.Virtqueue(2)
    vq.num = size
    vq.desc_addr, vq.avail_addr, vq.used_addr = ram.uva(dq.desc), ram.uva(dq.avail), ram.uva(dq.used)
    vq.attach(mem, event_idx=True, indirect=True)
    vq.started = vq.enabled = True
    return dq, vq, mem
