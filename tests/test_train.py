"""The fine-tune stage on a tiny offline Llama: exact orders, accumulation, resume, LoRA, precision, DDP."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import ordermerge.train.loop as train_mod
from helpers import TASK_SPEC, cli_env, fine_tune_cmd, run_cli, train_cfg, write_train
from ordermerge.data.orders import batches_of, make_order, save_order
from ordermerge.train.loop import TIMING_COLUMNS, fine_tune

N = 14  # batch 4 leaves a short last batch of 2


@pytest.fixture(scope="module")
def tiny(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return {"dir": d, "base": tiny_base, "train": write_train(d / "train.jsonl", N)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: torch on one thread


def order_file(path: Path, scheme: str = "shuffle", epochs: int = 2, batch: int = 4, n: int = N, run: int = 0) -> Path:
    order = make_order(n, epochs, scheme, batch, seed=5, task="t", run=run)
    save_order(order, path)
    return path


def run(tiny, out: Path, order: Path, **cfg) -> Path:
    fine_tune(
        tiny["base"], tiny["train"], order, out, TASK_SPEC, train_cfg(**cfg), seed=1, run_name="r0", progress=False
    )
    return out


def steps(out: Path, drop_timing: bool = True) -> list[dict]:
    with open(out / "steps.csv") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: v for k, v in r.items() if not (drop_timing and k in TIMING_COLUMNS)} for r in rows]


def weights(epoch_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(epoch_dir / "model.safetensors"))


def assert_same_files(a: Path, b: Path, epochs: int) -> None:
    for e in range(1, epochs + 1):
        names = sorted(p.relative_to(a / f"epoch{e}") for p in (a / f"epoch{e}").rglob("*") if p.is_file())
        assert names == sorted(p.relative_to(b / f"epoch{e}") for p in (b / f"epoch{e}").rglob("*") if p.is_file())
        for name in names:
            assert (a / f"epoch{e}" / name).read_bytes() == (b / f"epoch{e}" / name).read_bytes(), f"epoch{e}/{name}"
    assert steps(a) == steps(b)


# 1. The optimizer sees exactly the order ------------------------------------------------------


@pytest.mark.parametrize("scheme", ["shuffle", "fixbatch"])
@pytest.mark.parametrize("micro", [None, 3])
def test_optimizer_sees_exactly_the_order(tiny, tmp_path, monkeypatch, scheme, micro):
    from transformers import AutoTokenizer

    from ordermerge.data.formatting import encode_example
    from ordermerge.data.prepare import read_jsonl

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    index = {
        tuple(encode_example(tok, r["prompt"], r["response"], None, TASK_SPEC["max_length"])["input_ids"]): i
        for i, r in enumerate(read_jsonl(tiny["train"]))
    }
    assert len(index) == N
    seen, current = [], []
    real = train_mod.token_losses

    def recording(model, batch):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            current.append(index[tuple(ids[mask.bool()].tolist())])
        return real(model, batch)

    def on_step(optimizer, args, kwargs):
        seen.append(list(current))
        current.clear()

    monkeypatch.setattr(train_mod, "token_losses", recording)
    hook = register_optimizer_step_pre_hook(on_step)
    try:
        order_path = order_file(tmp_path / "order.npy", scheme, epochs=3)
        out = run(tiny, tmp_path / "out", order_path, epochs=3, micro_batch_size=micro)
    finally:
        hook.remove()
    order = np.load(order_path)
    expected = [b.tolist() for e in range(3) for b in batches_of(order[e], 4)]
    assert seen == expected
    assert [[int(i) for i in r["sample_indices"].split()] for r in steps(out)] == expected


@pytest.mark.parametrize("micro", [None, 3])
def test_packing_keeps_the_order_and_the_losses(tiny, tmp_path, micro):
    """train.packing: the same steps.csv sample ids, losses and (fp32) weights as the padded path."""
    order_path = order_file(tmp_path / "order.npy", "shuffle", epochs=2)
    padded = run(tiny, tmp_path / "padded", order_path, micro_batch_size=micro)
    packed = run(tiny, tmp_path / "packed", order_path, micro_batch_size=micro, packing=True)
    a, b = steps(padded), steps(packed)
    assert [r["sample_indices"] for r in a] == [r["sample_indices"] for r in b]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-4)
    wa, wb = weights(padded / "epoch2"), weights(packed / "epoch2")
    for name in wa:  # saved in bf16: allow a rounding flip of a few ulp
        torch.testing.assert_close(wb[name].float(), wa[name].float(), rtol=2e-2, atol=1e-3)


def test_gradient_accumulation_equals_one_batch(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ordermerge.data.formatting import encode_example
    from ordermerge.data.prepare import read_jsonl

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    examples = [encode_example(tok, r["prompt"], r["response"], None, 96) for r in read_jsonl(tiny["train"])][:7]
    n_scored = sum(sum(1 for y in e["labels"][1:] if y >= 0) for e in examples)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    grads = []
    for micro in (7, 2, 1):
        model.zero_grad(set_to_none=True)
        loss = train_mod.backward_batch(model, examples, micro, tok.pad_token_id, n_scored, torch.device("cpu"), False)
        grads.append(([p.grad.clone() for p in model.parameters()], loss))
    for g, loss in grads[1:]:
        assert loss == pytest.approx(grads[0][1], abs=1e-6)
        for a, b in zip(g, grads[0][0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # ...and so the trained weights after whole epochs agree too.
    order = order_file(tmp_path / "order.npy")
    one = run(tiny, tmp_path / "one", order, save_dtype="float32")
    acc = run(tiny, tmp_path / "acc", order, save_dtype="float32", micro_batch_size=1)
    for e in (1, 2):
        a, b = weights(one / f"epoch{e}"), weights(acc / f"epoch{e}")
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


# 2. Resume --------------------------------------------------------------------------------------


class Interrupted(BaseException):
    pass


def interrupt_after(monkeypatch, target: str, calls: int) -> None:
    """``target``: a function of train/loop.py, or ``module.function`` of another train/ module."""
    import importlib

    where, _, name = target.rpartition(".")
    module = importlib.import_module(f"ordermerge.train.{where}") if where else train_mod
    real = getattr(module, name)
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize(
    "where", [("backward_batch", 6), ("resume.publish", 1), ("resume.save_state", 2), ("resume.write_steps", 0)]
)
def test_interrupted_run_resumes_bit_identically(tiny, tmp_path, monkeypatch, method, where):
    cfg = {
        "epochs": 3,
        "micro_batch_size": 2,
        "method": method,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "lora_target_modules": ["q_proj", "v_proj", "down_proj"],
    }
    order = order_file(tmp_path / "order.npy", epochs=3)
    ref = run(tiny, tmp_path / "ref", order, **cfg)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, *where)
        with pytest.raises(Interrupted):
            run(tiny, out, order, **cfg)
    assert (out / ".resume" / "state" / "state.json").exists() and not (out / "steps.csv").exists()
    for p in out.glob("epoch*"):  # Snakemake deletes a failed job's declared outputs before the rerun
        shutil.rmtree(p)
    run(tiny, out, order, **cfg)
    assert_same_files(ref, out, 3)
    assert not (out / ".resume").exists()


def test_changed_config_discards_the_saved_state(tiny, tmp_path, monkeypatch, capsys):
    order = order_file(tmp_path / "order.npy", epochs=2)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, "backward_batch", 5)
        with pytest.raises(Interrupted):
            run(tiny, out, order, lr=1e-3)
    run(tiny, out, order, lr=2e-3)
    assert "starting over" in capsys.readouterr().out
    assert_same_files(run(tiny, tmp_path / "ref", order, lr=2e-3), out, 2)


def test_killed_cli_run_resumes_bit_identically(tiny, tmp_path):
    cfg = train_cfg(epochs=3, batch_size=2)
    order = order_file(tmp_path / "order.npy", epochs=3, batch=2)
    ref = run(tiny, tmp_path / "ref", order, epochs=3, batch_size=2)
    out = tmp_path / "out"
    cmd = fine_tune_cmd(tiny["base"], tiny["train"], order, out, cfg)
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "epoch1" / "checkpoint.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not (out / "steps.csv").exists()
    for p in out.glob("epoch*"):
        shutil.rmtree(p)
    done = run_cli(cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after epoch" in done.stdout
    assert_same_files(ref, out, 3)
    assert not list(out.glob(".*"))  # no resume state, no half-written temporaries


# 3. LoRA -----------------------------------------------------------------------------------------


def test_lora_saves_merged_full_checkpoints_and_the_adapter(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    order = order_file(tmp_path / "order.npy")
    out = run(
        tiny,
        tmp_path / "out",
        order,
        method="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"],
        save_dtype="float32",
    )
    base = weights(tiny["base"])
    full = weights(out / "epoch2")
    assert sorted(full) == sorted(base) and all(full[k].shape == base[k].shape for k in base)
    changed = {k for k in base if not torch.equal(full[k], base[k].float())}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    assert json.loads((out / "epoch2" / "checkpoint.json").read_text())["method"] == "lora"
    assert json.loads((out / "epoch2" / "config.json").read_text())["dtype"] == "float32"

    ids = torch.tensor([[2, 50, 60, 70, 80, 90, 3]])
    merged = AutoModelForCausalLM.from_pretrained(out / "epoch2")
    assert merged.dtype == torch.float32
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32), out / "epoch2" / "adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_checkpoints_are_merge_compatible_in_the_base_dtype(tiny, tmp_path):
    from ordermerge.storage.checkpoint import LazyCheckpoint

    out = run(tiny, tmp_path / "out", order_file(tmp_path / "order.npy"), method="lora", lora_r=4, lora_alpha=8)
    base, tuned = LazyCheckpoint(tiny["base"]), LazyCheckpoint(out / "epoch2")
    assert tuned.keys() == base.keys()  # what the merge checks: same names, shapes and stored dtype
    assert all(tuned.meta(k) == base.meta(k) for k in base.keys())
    assert 0 < json.loads((out / "epoch2" / "checkpoint.json").read_text())["zero_task_vector_fraction"] < 1


# 4. Precision -------------------------------------------------------------------------------------


def test_bf16_compute_trains_fp32_masters_and_saves_save_dtype(tiny, tmp_path):
    order = order_file(tmp_path / "order.npy")
    fp32 = run(tiny, tmp_path / "fp32", order, save_dtype="float32")
    bf16 = run(tiny, tmp_path / "bf16", order, compute_dtype="bfloat16", save_dtype="float16")
    w = weights(bf16 / "epoch2")
    assert all(t.dtype == torch.float16 for t in w.values())
    assert json.loads((bf16 / "epoch2" / "config.json").read_text())["dtype"] == "float16"
    first = [float(r["loss"]) for r in steps(fp32)][0], [float(r["loss"]) for r in steps(bf16)][0]
    assert first[0] == pytest.approx(first[1], rel=2e-2)  # same model, bf16 rounding only
    meta = json.loads((bf16 / "epoch2" / "checkpoint.json").read_text())
    assert 0 <= meta["zero_task_vector_fraction"] <= 1
    base = json.loads((tiny["base"] / "config.json").read_text())
    default = run(tiny, tmp_path / "default", order)
    assert json.loads((default / "epoch2" / "config.json").read_text()) == base  # base dtype: config untouched
    assert 0 < json.loads((default / "epoch2" / "checkpoint.json").read_text())["zero_task_vector_fraction"] < 1


# 7. Several processes ---------------------------------------------------------------------------


def test_two_processes_match_one(tiny, tmp_path):
    n = 13  # batch 4 leaves a last batch of 1: one rank gets an empty share
    train = write_train(tmp_path / "train13.jsonl", n)
    order = order_file(tmp_path / "order.npy", n=n)
    cfg = train_cfg(save_dtype="float32", micro_batch_size=1)
    fine_tune(tiny["base"], train, order, tmp_path / "one", TASK_SPEC, cfg, seed=1, run_name="r0", progress=False)
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m"]
    done = run_cli(fine_tune_cmd(tiny["base"], train, order, tmp_path / "two", cfg, launcher=launcher))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert [r["sample_indices"] for r in one] == [r["sample_indices"] for r in two]
    for a, b in zip(one, two):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
    for e in (1, 2):
        a, b = weights(tmp_path / "one" / f"epoch{e}"), weights(tmp_path / "two" / f"epoch{e}")
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


# 8. Sharded (FSDP2) full fine-tuning -------------------------------------------------------------

TORCHRUN_2 = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m"]


def assert_close_runs(one: Path, two: Path, epochs: int, rtol: float) -> None:
    """Same order, and losses, grad norms and fp32 weights equal up to float summation order."""
    a_steps, b_steps = steps(one), steps(two)
    assert [r["sample_indices"] for r in a_steps] == [r["sample_indices"] for r in b_steps]
    for a, b in zip(a_steps, b_steps):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=rtol)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=rtol)
        assert a["lr"] == b["lr"]
    for e in range(1, epochs + 1):
        a, b = weights(one / f"epoch{e}"), weights(two / f"epoch{e}")
        assert sorted(a) == sorted(b)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=rtol * float(a[name].abs().max()))


@pytest.fixture(scope="module")
def fsdp_runs(tiny, tmp_path_factory):
    """One uninterrupted 2-process FSDP run and its 1-process reference (13 samples, 3 epochs)."""
    d = tmp_path_factory.mktemp("fsdp")
    n = 13  # batch 4 leaves a last batch of 1: rank 1 runs a zero-weighted filler pass
    runs = {
        "dir": d,
        "train": write_train(d / "train13.jsonl", n),
        "order": order_file(d / "order.npy", epochs=3, n=n),
        "cfg": train_cfg(epochs=3, save_dtype="float32", micro_batch_size=1),
    }
    runs["fsdp_cfg"] = {**runs["cfg"], "parallel": "fsdp"}
    fine_tune(
        tiny["base"],
        runs["train"],
        runs["order"],
        d / "one",
        TASK_SPEC,
        runs["cfg"],
        seed=1,
        run_name="r0",
        progress=False,
    )
    done = run_cli(
        fine_tune_cmd(tiny["base"], runs["train"], runs["order"], d / "two", runs["fsdp_cfg"], launcher=TORCHRUN_2)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return runs


def test_fsdp_two_processes_match_one(fsdp_runs):
    # Measured (CPU, gloo): weights differ by <= 1.2e-7, <= 6.2e-7 of their tensor's largest |w|; losses by
    # 5e-8 and grad norms by 2.3e-7 relative: float sums in another order, far inside 1e-5.
    assert_close_runs(fsdp_runs["dir"] / "one", fsdp_runs["dir"] / "two", 3, rtol=1e-5)
    assert not list((fsdp_runs["dir"] / "two").glob(".*"))


# Rank 0 stops after publishing this many epochs (its state is saved just before); torchrun then
# stops rank 1, as a job killed mid-run would be.
INTERRUPTING_CLI = """
import sys
import ordermerge.train.resume as resume
from ordermerge.cli import main

real, calls = resume.publish, []

def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) > {after}:
        raise SystemExit("interrupted")
    return real(*args, **kwargs)

resume.publish = failing
main(sys.argv[2:])  # after 'ordermerge'
"""


def test_fsdp_interrupted_run_resumes_with_any_world_size(tiny, fsdp_runs, tmp_path):
    train, order, cfg, fsdp_cfg = fsdp_runs["train"], fsdp_runs["order"], fsdp_runs["cfg"], fsdp_runs["fsdp_cfg"]
    out, script = tmp_path / "out", tmp_path / "interrupting.py"
    script.write_text(INTERRUPTING_CLI.format(after=1))
    killed = run_cli(fine_tune_cmd(tiny["base"], train, order, out, fsdp_cfg, launcher=[*TORCHRUN_2[:-1], str(script)]))
    assert killed.returncode != 0 and "interrupted" in killed.stderr
    state = out / ".resume" / "state"
    assert json.loads((state / "state.json").read_text())["epoch"] == 2
    assert (state / "training.safetensors").exists() and not (out / "steps.csv").exists()
    for p in out.glob("epoch*"):  # Snakemake deletes a failed job's declared outputs before the rerun
        shutil.rmtree(p)
    shutil.copytree(out, tmp_path / "out1")

    done = run_cli(fine_tune_cmd(tiny["base"], train, order, out, fsdp_cfg, launcher=TORCHRUN_2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after epoch 2" in done.stdout
    assert_same_files(fsdp_runs["dir"] / "two", out, 3)  # as if never interrupted, bit for bit
    # The gathered state has the unsharded format: one process continues it too.
    fine_tune(tiny["base"], train, order, tmp_path / "out1", TASK_SPEC, cfg, seed=1, run_name="r0", progress=False)
    assert_close_runs(fsdp_runs["dir"] / "one", tmp_path / "out1", 3, rtol=1e-5)
    assert not list(out.glob(".*")) and not list((tmp_path / "out1").glob(".*"))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_fsdp_micro_batch_count_is_that_of_the_largest_share(world):
    from ordermerge.train import distributed, fsdp

    for n in range(0, 20):
        for micro in (1, 2, 3, 4):
            shares = [
                distributed.my_slice(list(range(n)), distributed.Ranks(r, world, torch.device("cpu")))
                for r in range(world)
            ]
            assert fsdp.micro_batch_count(n, world, micro) == max(-(-len(s) // micro) for s in shares)
