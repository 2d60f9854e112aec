"""``ordermerge <stage>``: every workflow stage as a command, usable without Snakemake."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _json_arg(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_base_model(a):
    from ordermerge.base.build import build_base_model

    build_base_model(a.source, a.out, dtype=a.dtype, trust_remote_code=a.trust_remote_code, revision=a.revision)


def cmd_check_data(a):
    from ordermerge.base.build import load_tokenizer
    from ordermerge.data.prepare import check_task

    print(json.dumps(check_task(a.task, a.spec, load_tokenizer(a.source, a.trust_remote_code, a.revision), a.seed)))


def cmd_prepare_data(a):
    from transformers import AutoTokenizer

    from ordermerge.data.prepare import prepare_task

    summary = prepare_task(a.task, a.spec, AutoTokenizer.from_pretrained(a.base), a.seed, a.out_dir)
    print(json.dumps(summary))


def cmd_orders(a):
    from ordermerge.data.orders import make_order, save_order
    from ordermerge.data.prepare import read_jsonl

    n = len(read_jsonl(a.train))
    save_order(make_order(n, a.epochs, a.scheme, a.batch_size, a.seed, a.task, a.run), a.out)


def cmd_fine_tune(a):
    _set_threads(a.threads)
    from ordermerge.train.loop import fine_tune
    from ordermerge.train.tracking import REPORT_TO_ENV, RunIdentity

    if os.environ.get(REPORT_TO_ENV) is not None:  # the workflow's train.report_to (tracking.REPORT_TO_ENV)
        a.train_cfg["report_to"] = [name for name in os.environ[REPORT_TO_ENV].split(",") if name]

    identity = None
    if a.tracker_group or a.tracker_run or a.tracker_dir:
        identity = RunIdentity(
            a.tracker_group or a.run_name, a.tracker_run or a.run_name, Path(a.tracker_dir) if a.tracker_dir else None
        )
    fine_tune(
        a.base, a.train, a.order, a.out_dir, a.task_spec, a.train_cfg, a.seed, a.run_name, tracker_identity=identity
    )


def cmd_sample_losses(a):
    _set_threads(a.threads)
    from ordermerge.scoring.losses import sample_losses_stage

    splits = dict(s.split("=", 1) for s in a.split)
    sample_losses_stage(a.model_dir, splits, a.task_spec, a.batch_size, a.out, a.compute_dtype)


def cmd_merge(a):
    _set_threads(a.threads)
    from ordermerge.merging import registry
    from ordermerge.merging.engine import merge_models
    from ordermerge.storage.checkpoint import CheckpointError

    try:
        plan = _merge_config(a) if a.config else None
        missing = [
            flag for flag, value in (("--base", a.base), ("--method", a.method), ("MODEL_DIR", a.models)) if not value
        ]
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)} (or --config merge.yml)")
        weights = [float(w) for w in a.weights.split(",")] if a.weights else None
        params = {p: getattr(a, p) for p in registry.PARAMETERS}
        if plan is not None:
            weights, params = plan.weights, {**plan.params, **({"resample": plan.resample} if plan.resample else {})}
        prov = merge_models(
            a.base,
            a.models,
            a.out,
            method=a.method,
            seed=a.seed,
            weights=weights,
            shard_size=a.shard_size,
            force=a.force,
            device=a.device,
            data=a.data,
            task_spec=a.task_spec,
            config=plan and plan.record(),
            **params,
        )
    except (CheckpointError, ValueError, FileExistsError) as exc:
        print(f"ordermerge merge: error: {exc}", file=sys.stderr)
        sys.exit(2)
    # the method's own headline (its summary's stats), whatever the method
    headline = "".join(f"; {k.replace('_', ' ')}: {v}" for k, v in prov["stats"].items() if k != "elements")
    print(f"merged {len(a.models)} models ({prov['method_key']}, seed {a.seed}) into {a.out}{headline}")


def cmd_round(a):
    _set_threads(a.threads)
    from ordermerge.storage.rounding import round_checkpoint

    print(json.dumps(round_checkpoint(a.model_dir, a.base, a.precision, a.seed, a.out)))


def _merge_config(a):
    """``--config merge.yml``: the merge the (mergekit) YAML means, in ``a``; flags that define the merge refused."""
    from ordermerge.merging import mergekit_config, registry

    given = [
        flag
        for flag, value in (
            ("--base", a.base),
            ("--method", a.method),
            ("--weights", a.weights),
            ("MODEL_DIR", a.models or None),
            *((p.flag, getattr(a, p.name)) for p in registry.PARAMETERS.values()),
        )
        if value is not None
    ]
    if given:
        raise ValueError(
            f"--config {a.config} defines the merge; {', '.join(given)} would too: give the merge "
            "in the config or as flags, not both (--out, --seed, --force, --device, --threads, "
            "--shard-size, --data and --task-spec go beside --config)"
        )
    plan = mergekit_config.resolve(a.config)
    a.base, a.models, a.method, a.resample = str(plan.base), [str(m) for m in plan.models], plan.method, plan.resample
    _refuse_overwriting_inputs(a)  # again, now that the inputs are known
    print(f"--config {a.config}: {plan.source}, as ordermerge merge {' '.join(plan.flags())}", file=sys.stderr)
    for note in plan.differences:
        print(f"--config {a.config}: differs from mergekit: {note}", file=sys.stderr)
    return plan


def _merge_parser(sub) -> None:
    """``ordermerge merge``: the methods and their parameter flags, defaults and bounds from the registry."""
    from ordermerge.merging import registry

    names = list(registry.METHODS)
    s = sub.add_parser("merge", help=f"merge fine-tunes of one base ({', '.join(names)})")
    s.add_argument(
        "--config",
        help="a mergekit YAML config (merge_method, base_model, models, parameters): the "
        "merge it means, or a refusal naming the key it cannot honour (docs/mergekit.md); "
        "instead of --base, --method, MODEL_DIRs, --weights and the parameter flags",
    )
    s.add_argument("--base", help="the base model directory (task vectors are relative to it)")
    s.add_argument(
        "--method",
        choices=names,
        help="; ".join(f"{m.name}: {m.summary} ({m.citation})" for m in registry.METHODS.values()).replace("%", "%%"),
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--weights", help="comma-separated, one per model (normalised); default uniform")
    s.add_argument("--shard-size", default="5GB")
    for p in registry.PARAMETERS.values():  # default None: the engine fills in the registry's default
        users = ", ".join(m.name for m in registry.METHODS.values() if p.name in m.params)
        s.add_argument(
            p.flag,
            type=int if p.integer else float,
            default=None,
            help=f"{users}: {p.help} (default {p.default}; {p.bounds()})".replace("%", "%%"),
        )
    data_users = ", ".join(m.name for m in registry.METHODS.values() if m.needs_data) or "no method yet"
    s.add_argument("--data", help=f"held-out JSONL, for methods that choose on data ({data_users}) only")
    s.add_argument("--task-spec", type=_json_arg, help=f"the task's spec as JSON, with --data ({data_users})")
    s.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the float math runs; cuda gives the CPU's bytes (select gathers bits on the CPU)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing output directory")
    s.add_argument("--threads", type=int)
    s.add_argument("--out", required=True)
    s.add_argument("models", nargs="*", metavar="MODEL_DIR")
    s.set_defaults(func=cmd_merge, reads=("base", "models", "data", "config"), writes=("out",))


def cmd_evaluate(a):
    _set_threads(a.threads)
    from ordermerge.scoring.evaluate import evaluate_model

    m = evaluate_model(
        a.model_dir, a.val, a.test, a.task_spec, a.eval_cfg, a.out, a.generations, a.identity, a.val_losses
    )
    print(json.dumps(m))


def cmd_harness(a):
    _set_threads(a.threads)
    from ordermerge.scoring.harness import harness_stage

    m = harness_stage(a.model_dir, a.test, a.task_spec, a.eval_cfg, a.identity, a.out, a.samples)
    print(json.dumps(m))


def cmd_analyze(a):
    from ordermerge.analysis.run import analyze

    analyze(a.config_json, a.results_dir, a.out_dir)


def cmd_timing(a):
    from ordermerge.paths import logs_dir
    from ordermerge.timing import report

    print(report(Path(a.results_dir), Path(a.logs or logs_dir(a.results_dir)), a.since, a.wall, a.cores), end="")


def cmd_study_report(a):
    from ordermerge.analysis.study import study_report

    runs = dict(r.split("=", 1) for r in a.run)
    for path in study_report({name: Path(results) for name, results in runs.items()}, Path(a.out)):
        print(path)


def _refuse_overwriting_inputs(a) -> None:
    """Before anything is written: no output may be, contain or lie inside an input (whatever --force says).

    Each subcommand names the arguments it reads and writes in its ``set_defaults(reads=, writes=)``.
    ``analyze`` reads the results tree and writes its tables/ and figures/ beside the model directories.
    """
    from ordermerge.storage.guards import refuse_duplicates, refuse_overlap

    def values(dest):
        v = getattr(a, dest, None)
        if dest in ("split", "run") and v:  # NAME=PATH
            return [s.split("=", 1)[-1] for s in v]
        if dest == "source" and v and not Path(v).exists():
            return None  # a hub id, not a local directory
        return v

    reads = {dest: values(dest) for dest in a.reads}
    writes = {dest: getattr(a, dest, None) for dest in a.writes}
    if a.command == "analyze":
        reads = {"--results-dir": [Path(a.results_dir) / m for m in a.config_json.get("models", {})]}
        writes = {"--out-dir": [Path(a.out_dir) / "tables", Path(a.out_dir) / "figures"]}
    refuse_overlap(
        f"ordermerge {a.command}",
        {f"--{k.replace('_', '-')}": v for k, v in writes.items()},
        {(f"--{k.replace('_', '-')}" if k != "models" else "MODEL_DIR"): v for k, v in reads.items()},
    )
    if a.command == "merge":
        refuse_duplicates("ordermerge merge", a.models)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per stage, each naming the paths it reads and writes."""
    p = argparse.ArgumentParser(prog="ordermerge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("base-model", help="build the base model as a safetensors HF directory")
    s.add_argument("--source", required=True, help="smollm2-gguf (offline), a hub id or a local directory")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--revision")
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_base_model, reads=("source",), writes=("out",))

    s = sub.add_parser(
        "check-data",
        help="enough samples within max_length for the splits? (tokenizer only; "
        "the workflow runs it before its first job)",
    )
    s.add_argument("--source", required=True, help="the model source, as for base-model")
    s.add_argument("--revision")
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--task", required=True)
    s.add_argument("--spec", type=_json_arg, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.set_defaults(func=cmd_check_data, reads=("source",), writes=())

    s = sub.add_parser("prepare-data", help="write train/val/test JSONL with stable sample ids")
    s.add_argument("--task", required=True)
    s.add_argument("--spec", type=_json_arg, required=True, help="the task's config entry as JSON")
    s.add_argument("--base", required=True, help="base model dir (its tokenizer filters by length)")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_prepare_data, reads=("base",), writes=("out_dir",))

    s = sub.add_parser("orders", help="the data order of one run: int64 [epochs, N] as .npy")
    s.add_argument("--train", required=True)
    s.add_argument("--task", required=True)
    s.add_argument("--scheme", choices=["shuffle", "fixbatch"], required=True)
    s.add_argument("--run", type=int, required=True)
    s.add_argument("--epochs", type=int, required=True)
    s.add_argument("--batch-size", type=int, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_orders, reads=("train",), writes=("out",))

    s = sub.add_parser(
        "fine-tune",
        help="full or LoRA fine-tuning in a given order, a checkpoint per epoch; "
        "resumes after its last complete epoch; several processes under torchrun",
    )
    for flag in ("--base", "--train", "--order", "--out-dir", "--run-name"):
        s.add_argument(flag, required=True)
    s.add_argument("--task-spec", type=_json_arg, required=True)
    s.add_argument("--train-cfg", type=_json_arg, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--threads", type=int)
    s.add_argument("--tracker-group", help="train.report_to: the K runs' group, <model>/<task>/<scheme>")
    s.add_argument("--tracker-run", help="train.report_to: this run's name in its group, run<k>")
    s.add_argument("--tracker-dir", help="train.report_to tensorboard: this run's event-file directory")
    s.set_defaults(func=cmd_fine_tune, reads=("base", "train", "order"), writes=("out_dir", "tracker_dir"))

    s = sub.add_parser("sample-losses", help="per-sample response loss of one checkpoint")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--split", action="append", required=True, help="NAME=PATH.jsonl, repeatable")
    s.add_argument("--task-spec", type=_json_arg, required=True)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    s.add_argument("--threads", type=int)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_sample_losses, reads=("model_dir", "split"), writes=("out",))

    from ordermerge.storage.precisions import PRECISIONS

    s = sub.add_parser(
        "round",
        help="a checkpoint stored in a narrower precision (from its fp32 save), with what "
        "rounding lost against the base (round.json)",
    )
    s.add_argument("--model-dir", required=True, help="the checkpoint as saved (fp32)")
    s.add_argument("--base", required=True, help="the base model directory (what the task vector is relative to)")
    s.add_argument(
        "--precision",
        required=True,
        choices=list(PRECISIONS),
        help="; ".join(f"{p.name}: {p.help}" for p in PRECISIONS.values()).replace("%", "%%"),
    )
    s.add_argument("--seed", type=int, default=0, help="stochastic rounding's seed (per tensor: seed and name)")
    s.add_argument("--threads", type=int)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_round, reads=("model_dir", "base"), writes=("out",))

    _merge_parser(sub)

    s = sub.add_parser("evaluate", help="val loss and greedy exact-match accuracy of one model")
    for flag in ("--model-dir", "--val", "--test", "--out", "--generations"):
        s.add_argument(flag, required=True)
    s.add_argument("--task-spec", type=_json_arg, required=True)
    s.add_argument("--eval-cfg", type=_json_arg, required=True)
    s.add_argument(
        "--identity", type=_json_arg, default={}, help="fields copied into the metrics (model, run, method...)"
    )
    s.add_argument("--val-losses", help="also write per-sample validation losses (CSV) here")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_evaluate, reads=("model_dir", "val", "test"), writes=("out", "generations", "val_losses"))

    s = sub.add_parser(
        "harness",
        help="lm-eval-harness on one model: the task mirrored and/or standard "
        "lm-eval tasks (eval.harness in --eval-cfg; default: mirror)",
    )
    s.add_argument("--model-dir", required=True)
    s.add_argument("--test", help="the task's test split (needed by mirror)")
    s.add_argument("--task-spec", type=_json_arg, default={})
    s.add_argument("--eval-cfg", type=_json_arg, required=True)
    s.add_argument("--identity", type=_json_arg, default={}, help="fields copied into every row (model, task, run...)")
    s.add_argument("--out", required=True, help="metrics JSON: tidy rows, one per harness task, metric and filter")
    s.add_argument("--samples", help="also write lm-eval's per-sample results (JSONL) here")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_harness, reads=("model_dir", "test"), writes=("out", "samples"))

    s = sub.add_parser("analyze", help="figures and tables from the results tree")
    s.add_argument("--config-json", type=_json_arg, required=True)
    s.add_argument("--results-dir", required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=cmd_analyze, reads=("results_dir",), writes=("out_dir",))

    s = sub.add_parser("study-report", help="gather the study's runs into one folder (docs/results/)")
    s.add_argument("--run", action="append", required=True, help="NAME=RESULTS_DIR, repeatable, in order")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_study_report, reads=("run",), writes=("out",))

    s = sub.add_parser("timing", help="where a run's time went: stages, token budget, tokens/s (writes nothing)")
    s.add_argument("--results-dir", default="results")
    s.add_argument("--logs", help="the run's job logs (default: logs/, or logs/<results-dir>/ for another results dir)")
    s.add_argument("--since", type=float, default=0.0, help="only jobs that finished after this Unix time")
    s.add_argument("--wall", type=float, help="the run's wall seconds, to compare with the summed job time")
    s.add_argument("--cores", type=int)
    s.set_defaults(func=cmd_timing, reads=("results_dir", "logs"), writes=())

    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        _refuse_overwriting_inputs(args)
        args.func(args)
    except Exception as exc:
        from ordermerge.data.prepare import DataError
        from ordermerge.storage.atomic import DiskFullError
        from ordermerge.storage.checkpoint import CheckpointError
        from ordermerge.storage.guards import OverlapError

        # Bad input or a full disk: the message says what and how to fix it; a traceback adds nothing
        # (ORDERMERGE_TRACEBACK=1 shows it anyway). Anything else is a bug: keep its traceback.
        if not isinstance(exc, (CheckpointError, DataError, DiskFullError, OverlapError)) or os.environ.get(
            "ORDERMERGE_TRACEBACK"
        ):
            raise
        print(f"ordermerge {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
