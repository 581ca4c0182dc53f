"""Linux guests for tests: Debian's cloud kernel and a busybox initramfs
built here, booted by QEMU.

The kernel package is fetched with `apt-get download` and unpacked with
`dpkg-deb -x` into a cache directory, not installed: installing a kernel
image runs initramfs and boot-loader hooks meant for the machine itself,
and a test needs only the files. The initramfs is a newc cpio written here:
busybox-static, the kernel modules the test names (with their
dependencies, read from each module's .modinfo), host binaries with the
shared libraries they load (e2fsprogs, open-iscsi), and an /init that runs
the test's shell script and powers off (busybox's shell runs its own applets
before anything on PATH: call host binaries by full path, /usr/sbin/mke2fs).
The guest reports through its
serial console: lines "@@ KEY value" that `Guest` collects.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

KERNEL_META = "linux-image-cloud-amd64"
BLOCK_MODULES = ("virtio_pci", "virtio_scsi", "sd_mod")
NET_MODULES = ("virtio_pci", "virtio_net", "iscsi_tcp")
MARK = re.compile(r"^@@ (\S+) ?(.*?)\r?$", re.M)


def cache_dir() -> Path:
    d = Path(os.environ.get("SCSI_TARGET_GUEST_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scsi-target" / "guest")
    d.mkdir(parents=True, exist_ok=True)
    return d


class GuestUnavailable(Exception):
    """Something a guest needs is not on this machine (the test is skipped with why)."""


@dataclass
class Kernel:
    vmlinuz: Path
    modules: Path     # lib/modules/VERSION

    @property
    def version(self) -> str:
        return self.modules.name


def kernel() -> Kernel:
    """Debian's cloud kernel, unpacked in the cache (downloaded once)."""
    cache = cache_dir()
    try:
        deps = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True,
                              timeout=60).stdout
        m = re.search(r"Depends: (linux-image-\S+)", deps)
    except (OSError, subprocess.TimeoutExpired):
        m = None
    package = m.group(1) if m else None
    if package is None:   # no package lists: any kernel unpacked before
        trees = sorted(cache.glob("linux-image-*/boot/vmlinuz-*"))
        if not trees:
            raise GuestUnavailable(f"cannot find {KERNEL_META} (apt-get update?) and none is cached")
        root = trees[-1].parent.parent
    else:
        root = cache / package
        if not (root / "boot").is_dir():
            debs = cache / "debs"
            debs.mkdir(exist_ok=True)
            for old in debs.glob(f"{package}_*.deb"):
                old.unlink()
            p = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True,
                               text=True, timeout=600)
            found = list(debs.glob(f"{package}_*.deb"))
            if p.returncode or not found:
                raise GuestUnavailable(f"apt-get download {package}: {p.stderr.strip()[-300:]}")
            tmp = root.with_suffix(".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(found[0]), str(tmp)], check=True, timeout=600)
            tmp.rename(root)
            found[0].unlink()
    vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
    mods = sorted((root / "lib" / "modules").glob("*"))
    if not vmlinuz or not mods:
        raise GuestUnavailable(f"{root} holds no kernel")
    return Kernel(vmlinuz[-1], mods[-1])


# ------------------------------------------------------------------ modules

def modinfo(path: Path) -> dict[str, str]:
    """The key=value strings of a module's .modinfo ELF section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError(f"{path} is not a 64-bit ELF module")
    shoff = int.from_bytes(data[0x28:0x30], "little")
    shentsize = int.from_bytes(data[0x3A:0x3C], "little")
    shnum = int.from_bytes(data[0x3C:0x3E], "little")
    shstrndx = int.from_bytes(data[0x3E:0x40], "little")

    def section(i: int) -> tuple[int, int, int]:
        h = shoff + i * shentsize
        name = int.from_bytes(data[h:h + 4], "little")
        offset = int.from_bytes(data[h + 24:h + 32], "little")
        size = int.from_bytes(data[h + 32:h + 40], "little")
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            info = {}
            for item in data[offset:offset + size].split(b"\0"):
                key, _, value = item.decode(errors="replace").partition("=")
                if key and key not in info:
                    info[key] = value
            return info
    return {}


def module_closure(k: Kernel, names: tuple[str, ...]) -> list[Path]:
    """The modules named and everything they depend on, in load order
    (built-in ones are skipped: modules.builtin lists them)."""
    builtin = {Path(line).stem for line in (k.modules / "modules.builtin").read_text().split()}
    paths = {p.stem.replace("-", "_"): p for p in (k.modules / "kernel").rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in {b.replace("-", "_") for b in builtin}:
            return
        seen.add(name)
        if name not in paths:
            raise GuestUnavailable(f"kernel {k.version} has no module {name}")
        for dep in filter(None, modinfo(paths[name]).get("depends", "").split(",")):
            visit(dep)
        order.append(paths[name])

    for n in names:
        visit(n)
    return order


# ------------------------------------------------------------------ initramfs

class Cpio:
    """A newc cpio archive, what the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 1
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        if name in self.names:
            return
        self.names.add(name)
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        self.out += b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        self.out += bytes(-len(self.out) % 4)
        self.out += data
        self.out += bytes(-len(self.out) % 4)
        self.ino += 1

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def host_binary(self, path: str) -> None:
        """A host executable and the shared libraries it loads (from ldd)."""
        real = shutil.which(path) or path
        if not os.path.exists(real):
            raise GuestUnavailable(f"{path} is not installed")
        self.file(real, Path(real).read_bytes())
        out = subprocess.run(["ldd", real], capture_output=True, text=True).stdout
        for lib in re.findall(r"(/\S+\.so[.\d]*)", out):
            if os.path.exists(lib):
                self.file(lib, Path(os.path.realpath(lib)).read_bytes())

    def close(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.out)


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /proc /sys /dev /mnt /tmp /etc /run /var/lock
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 0 > /proc/sys/kernel/printk
for m in $(cat /modules.list); do insmod /modules/$m || echo "@@ INSMOD-FAILED $m"; done
echo "@@ BOOTED"
/bin/sh /test.sh
echo "@@ EXIT $?"
sync
poweroff -f
"""


def initramfs(k: Kernel, script: str, modules: tuple[str, ...] = BLOCK_MODULES,
              binaries: tuple[str, ...] = ("/usr/sbin/mke2fs", "/usr/sbin/e2fsck"),
              files: dict[str, bytes] | None = None) -> Path:
    """Build (or reuse, by content) an initramfs that runs `script` as /test.sh."""
    busybox = shutil.which("busybox")
    ldd = subprocess.run(["ldd", busybox], capture_output=True, text=True) if busybox else None
    if ldd is None or "not a dynamic executable" not in ldd.stdout + ldd.stderr:
        raise GuestUnavailable("busybox-static is not installed")
    mods = module_closure(k, modules)
    key = hashlib.sha256(repr((k.version, script, modules, binaries, sorted((files or {}).items()),
                               INIT)).encode()).hexdigest()[:16]
    path = cache_dir() / f"initramfs-{key}.cpio"
    if path.exists():
        return path
    c = Cpio()
    c.file("init", INIT.encode())
    c.file("bin/busybox", Path(busybox).read_bytes())
    c.file("test.sh", script.encode())
    c.file("modules.list", "\n".join(m.name for m in mods).encode() + b"\n", 0o644)
    c.file("etc/mke2fs.conf", b"", 0o644)
    for m in mods:
        c.file(f"modules/{m.name}", m.read_bytes(), 0o644)
    for b in binaries:
        c.host_binary(b)
    for name, data in (files or {}).items():
        c.file(name, data)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(c.close())
    tmp.rename(path)
    clean_cache()
    return path


# ------------------------------------------------------------------ QEMU

def qemu_binary() -> str:
    q = shutil.which("qemu-system-x86_64")
    if q is None:
        raise GuestUnavailable("qemu-system-x86 is not installed")
    return q


def accelerator(k: Kernel) -> str:
    """"kvm" when /dev/kvm really runs a guest here (a tiny boot, once per
    machine boot, remembered in the cache), else "tcg". SCSI_TARGET_GUEST_ACCEL
    forces one."""
    forced = os.environ.get("SCSI_TARGET_GUEST_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    memo = cache_dir() / f"accel-{boot_id}"
    if memo.exists():
        return memo.read_text().strip()
    rd = initramfs(k, "echo '@@ PROBE ok'\n", modules=())
    g = Guest(k, rd, accel="kvm", memory_mb=128)
    try:
        g.start()
        g.wait("PROBE", timeout=20)
        result = "kvm"
    except (TimeoutError, RuntimeError):
        result = "tcg"
    finally:
        g.stop()
    memo.write_text(result)
    return result


@dataclass
class Guest:
    """One QEMU process booting the kernel with an initramfs; the serial
    console goes to a file that `wait` reads."""
    kernel: Kernel
    initrd: Path
    accel: str = "tcg"
    memory_mb: int = 256
    args: list[str] = field(default_factory=list)
    append: str = ""       # more kernel command line (a script reads /proc/cmdline)
    log_path: Path | None = None     # None: a file of its own in /tmp, removed by stop()
    proc: subprocess.Popen | None = None
    _own_log: bool = field(default=False, repr=False)

    def argv(self) -> list[str]:
        return [qemu_binary(), "-accel", self.accel, "-m", f"{self.memory_mb}M", "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                "-monitor", "none", "-no-reboot",
                "-kernel", str(self.kernel.vmlinuz), "-initrd", str(self.initrd),
                "-append", f"console=ttyS0 panic=-1 loglevel=4 rdinit=/init {self.append}".strip(),
                *self.args]

    def start(self) -> Guest:
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="guest-", suffix=".log", dir="/tmp")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def console(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def marks(self) -> list[tuple[str, str]]:
        return MARK.findall(self.console())

    def value(self, key: str) -> str | None:
        return next((v for k, v in reversed(self.marks()) if k == key), None)

    def wait(self, key: str, timeout: float = 300) -> str:
        """The value of the first "@@ KEY value" line, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for k, v in self.marks():
                if k == key:
                    return v
            assert self.proc is not None
            if self.proc.poll() is not None:
                time.sleep(0.2)
                for k, v in self.marks():
                    if k == key:
                        return v
                raise RuntimeError(f"the guest ended (QEMU exit {self.proc.returncode}) without "
                                   f"'@@ {key}':\n{self.console()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no '@@ {key}' from the guest in {timeout}s:\n{self.console()[-4000:]}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float = 300) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the guest did not power off:\n{self.console()[-4000:]}") from None

    def stop(self) -> None:
        """Kill QEMU; a console file the guest made itself goes with it (the
        KVM probe boots one per machine boot: they would pile up in /tmp)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)


def vhost_scsi_args(socket_path: str, memory_mb: int, num_queues: int = 1) -> list[str]:
    """QEMU options attaching a vhost-user-scsi back end (guest RAM shared by memfd)."""
    return ["-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=vus,path={socket_path}",
            "-device", f"vhost-user-scsi-pci,chardev=vus,num_queues={num_queues}"]


def clean_cache(keep: int = 8) -> None:
    """Drop all but the newest initramfs images (each is a few MiB): scripts
    that differ per run (the benchmark's) would otherwise pile up."""
    images = sorted(glob.glob(str(cache_dir() / "initramfs-*.cpio")), key=os.path.getmtime)
    for old in images[:-keep]:
        os.unlink(old)


# ------------------------------------------------------------------ a file system cycle

FS_CYCLE = r"""
fail() { echo "@@ FAIL $*"; exit 1; }
waitfor() { i=0; while [ ! -e "$1" ] && [ $i -lt $2 ]; do sleep 0.1; i=$((i+1)); done; [ -e "$1" ]; }
# fs_cycle DISK TAG: partition, mke2fs, mount, write, sync, umount, e2fsck, verify
fs_cycle() {
    d=$1; t=$2
    printf 'o\nn\np\n1\n\n\nw\n' | fdisk /dev/$d >/tmp/fdisk.$t 2>&1
    waitfor /dev/${d}1 100 || fail $t no partition
    /usr/sbin/mke2fs -q -F -t ext4 /dev/${d}1 || fail $t mke2fs
    mount -t ext4 /dev/${d}1 /mnt || fail $t mount
    dd if=/dev/urandom of=/mnt/big bs=1M count=6 2>/dev/null || fail $t dd big
    dd if=/dev/urandom of=/mnt/small bs=4k count=3 2>/dev/null || fail $t dd small
    mkdir /mnt/dir
    for n in 1 2 3 4 5 6 7 8; do echo "file $n $t $(date +%s%N)" > /mnt/dir/f$n; done
    sync
    (cd /mnt && sha256sum big small dir/f1 dir/f8) > /tmp/sums.$t
    umount /mnt || fail $t umount
    /usr/sbin/e2fsck -fn /dev/${d}1 >/tmp/fsck.$t 2>&1; echo "@@ $t-FSCK $?"
    echo 3 > /proc/sys/vm/drop_caches
    mount -o ro -t ext4 /dev/${d}1 /mnt || fail $t remount
    (cd /mnt && sha256sum -c /tmp/sums.$t >/dev/null 2>&1); echo "@@ $t-VERIFY $?"
    umount /mnt
    while read sum name; do echo "@@ $t-SUM $name $sum"; done < /tmp/sums.$t
}
"""


def cycle_sums(g: Guest, tag: str) -> dict[str, str]:
    """{file: sha256} the guest's fs_cycle reported under `tag`."""
    return dict(v.split() for k, v in g.marks() if k == f"{tag}-SUM")


def check_sums_over_iscsi(source: str, sums: dict[str, str], workdir: Path) -> None:
    """Read a LUN through iSCSI (qemu-img: an iscsi:// URL, or --image-opts
    options when they start with "driver="), and check that its first partition
    passes e2fsck and holds the files with these checksums (debugfs, no mount)."""
    raw = workdir / "lun.raw"
    src = ["--image-opts", source] if source.startswith("driver=") else [source]
    p = subprocess.run(["qemu-img", "convert", *src, "-O", "raw", str(raw)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    image = raw.read_bytes()
    assert image[510:512] == b"\x55\xaa", "no partition table"
    start, count = int.from_bytes(image[0x1C6:0x1CA], "little"), int.from_bytes(image[0x1CA:0x1CE], "little")
    part = workdir / "part1.img"
    part.write_bytes(image[start * 512:(start + count) * 512])
    fsck = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True, timeout=300)
    assert fsck.returncode == 0, fsck.stdout
    for name, digest in sums.items():
        data = subprocess.run(["debugfs", "-R", f"cat /{name}", str(part)], capture_output=True,
                              timeout=120).stdout
        assert hashlib.sha256(data).hexdigest() == digest, name
    raw.unlink()
    part.unlink()
