"""One GPU per job on a machine with several: claim free GPU slots, then run the job on them.

``python -m ordermerge.gpu_slots [--gpus G] [--devices 0,1,...] [--lock-dir D] [--timeout S] -- <command...>``

Every GPU is a *slot*: a lock file ``slot-<id>.lock`` in a lock directory, held with
``fcntl.flock(LOCK_EX | LOCK_NB)``. A job that needs G GPUs claims G free slots at once (all or
nothing; while fewer are free it retries every few tenths of a second, forever or until
``--timeout``), sets ``CUDA_VISIBLE_DEVICES`` to the claimed ids (comma-joined, in claim order),
prints one line to stderr naming them, and runs the command as a child process that holds the locks
with it. The launcher exits with the child's exit code (128 + N when a signal N ended it).

Why flock: the lock belongs to the open file description, so the kernel drops it when the last
process holding it ends, however it ends (``kill -9`` included). A killed job's slot comes back with
no cleanup and there is no stale state to repair; the lock files stay in place and must never be
deleted while jobs run. The child inherits the lock descriptors, so a slot stays claimed as long as
the command runs, even if the launcher itself is killed: the GPU is still in use until then.

Which devices: ``--devices``, else the launcher's own ``CUDA_VISIBLE_DEVICES`` (a card subset the
user picked), else one id per GPU that ``nvidia-smi -L`` lists, else ``0..G-1``: every job then
waits for the same G ids, which is safe but runs GPU jobs one at a time. (torch is not asked: importing
it costs seconds per job, and nvidia-smi ships with every NVIDIA driver.)

The lock directory is ``--lock-dir``, else ``$ORDERMERGE_GPU_SLOTS_DIR``, else a per-user directory
under the system temp dir (``/tmp/ordermerge-gpu-slots-<uid>``). Jobs coordinate when they share it:
all of one user's workflows on a machine do by default; point several users at one group-writable
directory to share GPUs between them.

Under a scheduler that gives each job its own GPUs (SLURM sets ``CUDA_VISIBLE_DEVICES`` per job), the
launcher is a pass-through: with ``SLURM_JOB_ID`` in the environment, or ``--respect-scheduler``, it
runs the command unchanged (exec, no locks).

In the workflow: workflow/rules/common.smk puts this launcher in front of every GPU job's command
(``resources.<rule>.gpus`` >= 1) when Snakemake runs the jobs on this machine, so
``--resources gpu=N`` (profiles/local) runs N GPU jobs at once, each on its own device.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
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
        "a guess (no CUDA_VISIBLE_DEVICES, no nvidia-smi): set CUDA_VISIBLE_DEVICES=0,1,... "
        "to run one job per GPU"
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
                f"waiting for {gpus} free GPU slot(s) among devices {','.join(devices)} "
                f"({holders(lock_dir, devices)})"
            )
        waited = True
        time.sleep(poll * random.uniform(0.5, 1.5))


# --- running the command ---------------------------------------------------------------------------


def run_holding(command: list[str], held: Claim) -> int:
    """Run ``command`` on the claimed devices and return its exit code (128 + N if signal N ended it).

    The child gets the lock descriptors (the slots stay claimed while it runs, whatever happens to the
    launcher) and its own session, so SIGTERM/SIGINT/SIGHUP reach it exactly once: forwarded from here
    (a Ctrl-C on the terminal would otherwise arrive twice, directly and forwarded).
    """
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(held.devices)}
    child: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum, _frame):
        if child:
            try:
                child[0].send_signal(signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        try:
            child.append(subprocess.Popen(command, env=env, pass_fds=held.fds, start_new_session=True))
        except OSError as exc:
            print(f"gpu_slots: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
            return EXIT_NOT_FOUND
        held.record_holder(command, child[0].pid)
        for signum in pending:
            child[0].send_signal(signum)
        code = child[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        held.release()
    return 128 - code if code < 0 else code


def under_scheduler(env: dict[str, str] | None = None) -> bool:
    """A SLURM job: the scheduler already confined it to its own GPUs."""
    env = os.environ if env is None else env
    return bool(env.get(SCHEDULER_ENV))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ordermerge.gpu_slots",
        description="Claim free GPU slots (one lock per GPU) and run a command on them with CUDA_VISIBLE_DEVICES "
        "set, holding the slots until it exits. Put the command after --.",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the command needs (default 1; 0 runs it unchanged)")
    p.add_argument("--devices", help="comma list of device ids to share out (default: CUDA_VISIBLE_DEVICES, "
                   "else the GPUs nvidia-smi lists)")
    p.add_argument("--lock-dir", type=Path, help=f"directory of the slot lock files (default: ${LOCK_DIR_ENV}, "
                   "else a per-user directory under the temp dir)")
    p.add_argument("--timeout", type=float, default=None,
                   help="give up (exit 75) after this many seconds without enough free slots (default: wait)")
    p.add_argument("--respect-scheduler", action="store_true",
                   help="the scheduler already set this job's CUDA_VISIBLE_DEVICES: run the command unchanged "
                   f"(automatic when ${SCHEDULER_ENV} is set)")
    return p


def _exec(command: list[str]) -> int:
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"gpu_slots: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_NOT_FOUND


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if "--" not in argv:
        parser.print_usage(sys.stderr)
        print("gpu_slots: put the command after --, e.g. python -m ordermerge.gpu_slots --gpus 1 -- ordermerge "
              "fine-tune ...", file=sys.stderr)
        return EXIT_USAGE
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        parser.error("no command after --")
    if args.gpus < 0:
        parser.error("--gpus must be 0 or more")

    if args.respect_scheduler or under_scheduler():
        why = "--respect-scheduler" if args.respect_scheduler else f"{SCHEDULER_ENV}={os.environ[SCHEDULER_ENV]}"
        print(f"gpu_slots: {why}: the scheduler confines this job; running it unchanged "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})", file=sys.stderr,
              flush=True)
        return _exec(command)
    if args.gpus == 0:
        return _exec(command)

    try:
        if args.devices is not None:
            devices, source = parse_devices(args.devices), "--devices"
            if not devices:
                raise SlotError("--devices is empty; list the GPU ids to share, e.g. --devices 0,1")
        else:
            devices, source = discover_devices(args.gpus)
        private = args.lock_dir is None and not os.environ.get(LOCK_DIR_ENV)
        lock_dir = prepare_lock_dir(args.lock_dir or default_lock_dir(), private)
        held = claim(lock_dir, devices, args.gpus, timeout=args.timeout,
                     on_wait=lambda msg: print(f"gpu_slots: {msg}", file=sys.stderr, flush=True))
    except SlotError as exc:
        print(f"gpu_slots: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C while waiting for a slot: nothing was started
        return 128 + signal.SIGINT
    held.record_holder(command)
    ids = ",".join(held.devices)
    print(f"gpu_slots: slot{'s' if len(held.devices) > 1 else ''} {ids} of devices {','.join(devices)} "
          f"(from {source}; locks in {lock_dir}): CUDA_VISIBLE_DEVICES={ids}", file=sys.stderr, flush=True)
    return run_holding(command, held)


if __name__ == "__main__":
    sys.exit(main())
