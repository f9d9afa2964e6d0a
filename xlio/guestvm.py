"""A real Linux guest under QEMU (TCG) whose NIC xlio serves over vhost-user.

Theory of operation
-------------------
:func:`boot_image` builds, once per kernel, from Debian's packages what the
guest boots: the kernel (``linux-image-amd64``; its vmlinuz is unpacked to
the ELF ``vmlinux``, which QEMU boots through the PVH entry in about 3 s
under TCG where the compressed image takes about 8) and an initramfs
(``busybox-static`` and the virtio modules from the kernel package:
virtio_ring, virtio, virtio_pci_modern_dev, virtio_pci_legacy_dev,
virtio_pci, failover, net_failover, virtio_net), cached under
``~/.cache/xlio/guest``. Each run appends a second cpio archive holding the
command (Linux unpacks every archive of a concatenated initramfs), so the
cached image never changes.

The guest's ``/init`` loads the modules, brings ``eth0`` up at
198.18.0.2/24, prints a start marker, runs the command in busybox's shell,
prints an end marker with its status and powers off; :func:`run_guest`
copies what lies between the markers to the caller and returns the status.

QEMU's options are the ones vhost-user needs under TCG (REFERENCE 14):
the guest's RAM shared (``memory-backend-memfd,share=on`` on a NUMA node),
``-netdev vhost-user`` on a ``-chardev socket`` (``reconnect=1``: QEMU
reconnects when the back-end goes away), and ``virtio-net-pci`` with
``vectors=0`` (INTx: QEMU 7.2 under TCG crashes in ``vhost_net_start``
with MSI-X, for want of an irqfd table) and the guest MAC xlio's backend
checks TX frames against.
"""

from __future__ import annotations

import glob
import hashlib
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xlio.backends.netns import GUEST_IP, PREFIX
from xlio.backends.wire import GUEST_MAC

PACKAGES = "qemu-system-x86 linux-image-amd64 busybox-static"
MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net",
)  # fmt: skip
BEGIN = "XLIO-GUEST-BEGIN"
END = "XLIO-GUEST-END"
GUEST_MEM_MIB = 256
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init mitigations=off"
#: What the serial console carries besides the command's output (the
#: kernel's own lines at loglevel 1 and busybox's on power-off).
_NOISE = re.compile(r"^\[\s*\d+\.\d+\]|^reboot: ")

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in {" ".join(MODULES)}; do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/{PREFIX} dev eth0
echo {BEGIN}
sh /cmd
echo "{END} $?"
poweroff -f
"""


class GuestSetupError(Exception):
    """What is missing to boot a guest (packages, a kernel): one line."""


@dataclass(frozen=True)
class BootImage:
    kernel: str
    initramfs: str
    version: str


def qemu_binary() -> str:
    q = shutil.which("qemu-system-x86_64")
    if q is None:
        raise GuestSetupError(f"no qemu-system-x86_64: install Debian's {PACKAGES}")
    return q


def _kernel() -> tuple[str, str]:
    """(vmlinuz path, version) of the newest Debian kernel with its modules."""
    found = []
    for path in glob.glob("/boot/vmlinuz-*"):
        version = path[len("/boot/vmlinuz-") :]
        if os.path.isdir(f"/lib/modules/{version}"):
            found.append((path, version))
    if not found:
        raise GuestSetupError(f"no kernel in /boot with its modules: install Debian's {PACKAGES}")
    return sorted(found, key=lambda f: [int(x) if x.isdigit() else x
                                        for x in re.split(r"(\d+)", f[1])])[-1]  # fmt: skip


def _static_busybox() -> str:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(path) and not _has_interpreter(path):
            return path
    raise GuestSetupError(f"no statically linked busybox: install Debian's {PACKAGES}")


def _has_interpreter(path: str) -> bool:
    """Whether an ELF64 file asks for a dynamic loader (a PT_INTERP header)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return True
        (phoff,) = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def _vmlinux(vmlinuz: str) -> bytes | None:
    """The ELF kernel inside a bzImage whose payload is xz (Debian's), or None."""
    data = open(vmlinuz, "rb").read()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        return None
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
    except lzma.LZMAError:
        return None
    return out if out[:4] == b"\x7fELF" else None


def cpio(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc cpio archive of (name, mode, data, (rdev major, minor)) entries."""
    out = bytearray()

    def put(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        nm = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + nm)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        put(ino, name, mode, data, rdev)
    put(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xlio", "guest")


def boot_image(cache: str | None = None) -> BootImage:
    """The kernel and base initramfs, built once (see the module docstring)."""
    vmlinuz, version = _kernel()
    busybox = _static_busybox()
    key = hashlib.sha256((INIT + version + str(os.path.getmtime(busybox))).encode()).hexdigest()
    where = os.path.join(cache or _cache_dir(), f"{version}-{key[:12]}")
    kernel, initramfs = os.path.join(where, "vmlinux"), os.path.join(where, "initramfs.cpio")
    if os.path.exists(kernel) and os.path.exists(initramfs):
        return BootImage(kernel, initramfs, version)
    os.makedirs(where, exist_ok=True)
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (d, 0o040755, b"", (0, 0))
        for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "lib", "lib/modules")
    ]
    entries.append(("dev/console", 0o020600, b"", (5, 1)))
    entries.append(("bin/busybox", 0o100755, open(busybox, "rb").read(), (0, 0)))
    entries.append(("init", 0o100755, INIT.encode(), (0, 0)))
    moddir = f"/lib/modules/{version}"
    for m in MODULES:
        hits = glob.glob(f"{moddir}/kernel/**/{m}.ko", recursive=True)
        if not hits:
            raise GuestSetupError(f"module {m}.ko not in {moddir}: install Debian's {PACKAGES}")
        entries.append((f"lib/modules/{m}.ko", 0o100644, open(hits[0], "rb").read(), (0, 0)))
    elf = _vmlinux(vmlinuz)
    with tempfile.NamedTemporaryFile(dir=where, delete=False) as f:
        f.write(elf if elf is not None else open(vmlinuz, "rb").read())
    os.replace(f.name, kernel)
    with tempfile.NamedTemporaryFile(dir=where, delete=False) as f:
        f.write(cpio(entries))
    os.replace(f.name, initramfs)
    return BootImage(kernel, initramfs, version)


def qemu_command(image: BootImage, initrd: str, socket_path: str) -> list[str]:
    mem = f"{GUEST_MEM_MIB}M"
    return [
        qemu_binary(), "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", mem,
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-numa", "node,memdev=mem",
        "-kernel", image.kernel, "-initrd", initrd, "-append", CMDLINE,
        "-chardev", f"socket,id=c0,path={socket_path},reconnect=1",
        "-netdev", "vhost-user,id=n0,chardev=c0",
        "-device", f"virtio-net-pci,netdev=n0,vectors=0,mac={GUEST_MAC.hex(':')}",
        "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-no-reboot",
    ]  # fmt: skip


@dataclass
class GuestRun:
    status: int | None  # the command's exit status; None: it never finished
    output: str  # what the command printed
    console: str  # the whole serial console
    seconds: float
    qemu_status: int | None


def run_guest(
    socket_path: str, command: str, timeout: float, *, echo: Callable[[str], None] | None = None,
    started: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> GuestRun:  # fmt: skip
    """Boot the guest on ``socket_path``, run ``command``, power off. ``echo``
    hears each line of the command's output as it comes; ``started`` gets
    the QEMU process (a test kills it). QEMU is killed on the way out,
    whatever happens (a timeout, a stop signal)."""
    if not os.path.exists(socket_path):
        raise GuestSetupError(f"no vhost-user socket at {socket_path}: start xlio serve first")
    image = boot_image()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xlio-guest-") as tmp:
        initrd = os.path.join(tmp, "initrd.cpio")
        with open(initrd, "wb") as f:
            f.write(open(image.initramfs, "rb").read())
            f.write(cpio([("cmd", 0o100644, command.encode() + b"\n", (0, 0))]))
        proc = subprocess.Popen(
            qemu_command(image, initrd, socket_path), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_default_signals,
        )  # fmt: skip
        if started is not None:
            started(proc)
        console: list[str] = []
        out: list[str] = []
        status: int | None = None
        inside = began = False
        try:
            assert proc.stdout is not None
            deadline = t0 + timeout
            for raw in _lines(proc, deadline):
                line = raw.decode(errors="replace").rstrip("\r\n")
                console.append(line)
                if not began and "Failed to connect" in line:  # reconnect=1 would retry
                    raise GuestSetupError(f"QEMU cannot reach the vhost-user socket: {line}")
                if line.startswith(END + " "):
                    inside = False
                    try:
                        status = int(line.split()[1])
                    except (IndexError, ValueError):
                        status = None
                    continue
                if line == BEGIN:
                    inside = began = True
                    continue
                if inside and not _NOISE.match(line):
                    out.append(line)
                    if echo is not None:
                        echo(line)
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    if status is None and not began and proc.returncode not in (None, -signal.SIGKILL):
        last = next((line for line in reversed(console) if line.strip()), "no output")
        raise GuestSetupError(f"QEMU exited with status {proc.returncode} before the guest "
                              f"ran: {last}")  # fmt: skip
    return GuestRun(status, "\n".join(out), "\n".join(console), time.monotonic() - t0,
                    proc.returncode)  # fmt: skip


def _default_signals() -> None:
    """QEMU starts with the default action of every stop signal (a parent run
    in the background has SIGINT ignored, which an exec keeps)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def _lines(proc: subprocess.Popen[bytes], deadline: float) -> Iterator[bytes]:
    """The process's output lines until it closes them or the deadline passes."""
    import selectors

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not sel.select(min(left, 1.0)):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                if buf:
                    yield buf
                return
            buf += chunk
            *done, buf = buf.split(b"\n")
            yield from (d + b"\n" for d in done)
