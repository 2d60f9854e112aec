"""GPU slots, the launching half: run a command holding its claimed slots, forward signals, pass
through under a scheduler; the command line (``python -m ordermerge.gpu_slots``)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from ordermerge.gpu_slots.claim import (
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    FORWARDED_SIGNALS,
    LOCK_DIR_ENV,
    SCHEDULER_ENV,
    Claim,
    SlotError,
    claim,
    default_lock_dir,
    discover_devices,
    parse_devices,
    prepare_lock_dir,
)

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
    p.add_argument(
        "--devices",
        help="comma list of device ids to share out (default: CUDA_VISIBLE_DEVICES, else the GPUs nvidia-smi lists)",
    )
    p.add_argument(
        "--lock-dir",
        type=Path,
        help=f"directory of the slot lock files (default: ${LOCK_DIR_ENV}, "
        "else a per-user directory under the temp dir)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up (exit 75) after this many seconds without enough free slots (default: wait)",
    )
    p.add_argument(
        "--respect-scheduler",
        action="store_true",
        help="the scheduler already set this job's CUDA_VISIBLE_DEVICES: run the command unchanged "
        f"(automatic when ${SCHEDULER_ENV} is set)",
    )
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
        print(
            "gpu_slots: put the command after --, e.g. python -m ordermerge.gpu_slots --gpus 1 -- ordermerge "
            "fine-tune ...",
            file=sys.stderr,
        )
        return EXIT_USAGE
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not command:
        parser.error("no command after --")
    if args.gpus < 0:
        parser.error("--gpus must be 0 or more")

    if args.respect_scheduler or under_scheduler():
        why = "--respect-scheduler" if args.respect_scheduler else f"{SCHEDULER_ENV}={os.environ[SCHEDULER_ENV]}"
        print(
            f"gpu_slots: {why}: the scheduler confines this job; running it unchanged "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})",
            file=sys.stderr,
            flush=True,
        )
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
        held = claim(
            lock_dir,
            devices,
            args.gpus,
            timeout=args.timeout,
            on_wait=lambda msg: print(f"gpu_slots: {msg}", file=sys.stderr, flush=True),
        )
    except SlotError as exc:
        print(f"gpu_slots: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C while waiting for a slot: nothing was started
        return 128 + signal.SIGINT
    held.record_holder(command)
    ids = ",".join(held.devices)
    print(
        f"gpu_slots: slot{'s' if len(held.devices) > 1 else ''} {ids} of devices {','.join(devices)} "
        f"(from {source}; locks in {lock_dir}): CUDA_VISIBLE_DEVICES={ids}",
        file=sys.stderr,
        flush=True,
    )
    return run_holding(command, held)
