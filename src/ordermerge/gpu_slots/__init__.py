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
(``resources.<rule>.gpus`` >= 1), whichever executor runs it: on a workstation ``--resources gpu=N``
(profiles/local) then runs N GPU jobs at once, each on its own device, and in a SLURM job the launcher
passes the command through. So the workflow never needs to know where its jobs run.
"""

from ordermerge.gpu_slots.claim import *  # noqa: F401,F403  (the public names, as before the split)
from ordermerge.gpu_slots.claim import (  # noqa: F401
    EXIT_NOT_FOUND,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    LOCK_DIR_ENV,
    SlotError,
    default_lock_dir,
    discover_devices,
    parse_devices,
)
from ordermerge.gpu_slots.launch import main, run_holding, under_scheduler  # noqa: F401
