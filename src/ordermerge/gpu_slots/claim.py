"""GPU slots, the claiming half: the lock directory, which devices, and all-or-nothing flock claims
(the package docstring, ``ordermerge.gpu_slots``, has the design)."""

from __future__ import annotations

import fcntl
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOCK_DIR_ENV = "ORDERMERGE_GPU_SLOTS_DIR"
SCHEDULER_ENV = "SLURM_JOB_ID"
POLL_S = 0.2
EXIT_USAGE = 2
EXIT_TIMEOUT = 75  # EX_TEMPFAIL: no slot became free in time; running again later may succeed
EXIT_NOT_FOUND = 127
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class SlotError(RuntimeError):
    """A claim that cannot succeed, or did not in time; the message says what to change."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


# --- where the slots are ---------------------------------------------------------------------------


def default_lock_dir(env: dict[str, str] | None = None) -> Path:
    """``$ORDERMERGE_GPU_SLOTS_DIR``, else ``<tempdir>/ordermerge-gpu-slots-<uid>`` (one per user)."""
    env = os.environ if env is None else env
    if env.get(LOCK_DIR_ENV):
        return Path(env[LOCK_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"ordermerge-gpu-slots-{os.getuid()}"


def prepare_lock_dir(lock_dir: Path, private: bool) -> Path:
    """Create the lock directory if needed. A private (per-user default) one must belong to this user,
    so another user cannot pre-create it and hold our slots."""
    try:
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    except OSError as exc:
        raise SlotError(
            f"cannot create the GPU slot lock directory {lock_dir}: {exc.strerror}; "
            f"point ${LOCK_DIR_ENV} (or --lock-dir) at a writable directory"
        ) from None
    if private and lock_dir.stat().st_uid != os.getuid():
        raise SlotError(
            f"the GPU slot lock directory {lock_dir} belongs to another user; "
            f"set ${LOCK_DIR_ENV} (or --lock-dir) to a directory of your own"
        )
    return lock_dir


def slot_path(lock_dir: Path, device: str) -> Path:
    """``slot-<id>.lock``; characters outside [A-Za-z0-9._-] (as in MIG ids) become '_'."""
    return lock_dir / f"slot-{re.sub(r'[^A-Za-z0-9._-]', '_', device)}.lock"


def open_lock(path: Path) -> int:
    """A descriptor on a lock file, created if missing. Read-only when another user created it in a shared
    lock directory (flock works on any descriptor; only the holder note is then not written)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def parse_devices(text: str) -> list[str]:
    """'0, 1,2' -> ['0', '1', '2']; ids may also be GPU UUIDs. Duplicates are an error."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if len(set(devices)) != len(devices):
        raise SlotError(f"--devices {text!r} names a device twice; list each GPU once")
    return devices


def nvidia_smi_count() -> int | None:
    """How many GPUs ``nvidia-smi -L`` lists (MIG instances not counted), or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def discover_devices(gpus: int, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """The device ids to share out, and where they came from (for the log line and errors).

    The launcher's CUDA_VISIBLE_DEVICES (the cards the user picked), else nvidia-smi's count, else
    0..gpus-1 (every job waits for the same ids: safe, one job at a time).
    """
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        devices = []
        for d in env["CUDA_VISIBLE_DEVICES"].split(","):
            d = d.strip()
            if not d or d.lstrip("-").isdigit() and int(d) < 0:
                break  # CUDA stops at the first invalid id: '-1' or '' hides the rest
            devices.append(d)
        if not devices:
            raise SlotError(
                f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} makes no GPU visible; "
                "unset it to use every GPU, or list the cards to share (e.g. CUDA_VISIBLE_DEVICES=0,1)"
            )
        return devices, "CUDA_VISIBLE_DEVICES"
    count = nvidia_smi_count()
    if count:
        return [str(i) for i in range(count)], "nvidia-smi"
    return [str(i) for i in range(gpus)], (
        "a guess (no CUDA_VISIBLE_DEVICES, no nvidia-smi): set CUDA_VISIBLE_DEVICES=0,1,... to run one job per GPU"
    )


# --- claiming --------------------------------------------------------------------------------------


@dataclass
class Claim:
    """Slots held by this process: device ids in claim order and their locked descriptors."""

    devices: list[str]
    fds: list[int] = field(repr=False)

    def record_holder(self, command: list[str], child_pid: int | None = None) -> None:
        """Write who holds each slot into its lock file (read back in the waiting and timeout messages)."""
        who = f"pid {os.getpid()}" + (f" (command pid {child_pid})" if child_pid else "")
        text = f"{who}: {shlex.join(command)[:200]}\n".encode()
        for fd in self.fds:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, text, 0)
            except OSError:  # a read-only descriptor (see open_lock): the lock itself is what counts
                pass

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # the lock goes with the last descriptor of the open file description
        self.fds = []


class _ClaimMutex:
    """claim.lock, held (blocking) while one claimer tests the slots: two claimers of 2 GPUs each can
    then never hold one slot apiece and retry in lockstep. Held for microseconds, freed by the kernel
    if its holder dies."""

    def __init__(self, lock_dir: Path):
        self.path = lock_dir / "claim.lock"

    def __enter__(self):
        self.fd = open_lock(self.path)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def try_claim(lock_dir: Path, devices: list[str], gpus: int) -> Claim | None:
    """Lock ``gpus`` free slots among ``devices`` (in list order), or none at all (returns None)."""
    with _ClaimMutex(lock_dir):
        held: list[tuple[str, int]] = []
        for device in devices:
            fd = open_lock(slot_path(lock_dir, device))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((device, fd))
            if len(held) == gpus:
                return Claim([d for d, _ in held], [f for _, f in held])
        for _, fd in held:
            os.close(fd)
        return None


def holders(lock_dir: Path, devices: list[str]) -> str:
    """'0: pid 12 (command pid 13): ordermerge fine-tune ...; 1: free' for messages. Each slot is tested
    under the claim mutex (a free one is locked and released at once, so no claimer ever misses it)."""
    parts = []
    with _ClaimMutex(lock_dir):
        for device in devices:
            fd = open_lock(slot_path(lock_dir, device))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                parts.append(f"{device}: free")
            except BlockingIOError:
                text = os.pread(fd, 400, 0).decode(errors="replace").strip()
                parts.append(f"{device}: held by {text or 'a job starting up'}")
            finally:
                os.close(fd)
    return "; ".join(parts)


def claim(
    lock_dir: Path,
    devices: list[str],
    gpus: int,
    timeout: float | None = None,
    poll: float = POLL_S,
    on_wait=None,
) -> Claim:
    """Claim ``gpus`` slots, retrying until they are free; SlotError if that is impossible or takes
    longer than ``timeout`` seconds. ``on_wait(message)`` is called once, when the first try fails."""
    if gpus > len(devices):
        raise SlotError(
            f"a job needs {gpus} GPUs but only {len(devices)} devices are known ({','.join(devices)}); "
            "lower resources.<rule>.gpus in the config, or make more GPUs visible (CUDA_VISIBLE_DEVICES, --devices)"
        )
    start = time.monotonic()
    waited = False
    while True:
        got = try_claim(lock_dir, devices, gpus)
        if got is not None:
            return got
        if timeout is not None and time.monotonic() - start >= timeout:
            raise SlotError(
                f"no {gpus} free GPU slot(s) among devices {','.join(devices)} after {timeout:g} s "
                f"(lock dir {lock_dir}; {holders(lock_dir, devices)}); wait for those jobs, raise --timeout, "
                f"or lower --resources gpu=N so that Snakemake starts no more GPU jobs than there are GPUs",
                exit_code=EXIT_TIMEOUT,
            )
        if not waited and on_wait is not None:
            on_wait(
                f"waiting for {gpus} free GPU slot(s) among devices {','.join(devices)} ({holders(lock_dir, devices)})"
            )
        waited = True
        time.sleep(poll * random.uniform(0.5, 1.5))
