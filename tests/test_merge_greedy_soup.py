"""Greedy soup (Wortsman et al., ICML 2022) on the tiny offline Llama: it leaves out an input that
makes the soup worse, writes the bytes of ``average`` of the inputs it keeps, records its choice, and
refuses to run without held-out data."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from helpers import write_train
from ordermerge.cli import main
from ordermerge.merging.engine import merge_models

TASK_SPEC = {"max_length": 120, "system_prompt": None, "batch_size": 4}


def _fine_tune(base, out, records, steps: int = 30):
    """A small fine-tune of the tiny base on ``records`` (float32 Adam, full batch), saved in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ordermerge.batching import collate, token_losses
    from ordermerge.data.formatting import encode_example

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    batch = collate(
        [encode_example(tokenizer, r["prompt"], r["response"], None, TASK_SPEC["max_length"]) for r in records],
        tokenizer.pad_token_id,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        losses, scored = token_losses(model, batch)
        (losses.sum() / scored.sum()).backward()
        opt.step()
        opt.zero_grad()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _perturbed(trained, out, scale: float, seed: int, factor: float = 1.0):
    """A copy of ``trained`` with every float weight times ``factor`` and moved by relative noise of
    size ``scale``: two noisy copies average to something nearer the trained weights (a better soup);
    factor 6 makes the logits sharp and wrong (a much worse model)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(trained, out)
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(out / "model.safetensors"))
    for name, t in state.items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=g) * scale * (t.float().std() + 1e-3)
            state[name] = (t.float() * factor + noise).to(t.dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def soup_zoo(tiny_base, tmp_path_factory):
    from ordermerge.data.prepare import read_jsonl

    root = tmp_path_factory.mktemp("soup")
    data = write_train(root / "heldout.jsonl", n=8)
    trained = _fine_tune(tiny_base, root / "trained", read_jsonl(data))
    models = [
        _perturbed(trained, root / "good0", 0.3, 1),
        _perturbed(trained, root / "bad", 0.02, 2, factor=6.0),
        _perturbed(trained, root / "good1", 0.3, 3),
    ]
    return {"base": tiny_base, "models": models, "data": data}


def _sha(directory):
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def test_leaves_out_the_bad_input_and_writes_the_average_of_the_rest(soup_zoo, tmp_path):
    z = soup_zoo
    main(
        [
            "merge",
            "--base",
            str(z["base"]),
            "--method",
            "greedy_soup",
            "--data",
            str(z["data"]),
            "--task-spec",
            json.dumps(TASK_SPEC),
            "--out",
            str(tmp_path / "soup"),
            *map(str, z["models"]),
        ]
    )
    prov = json.loads((tmp_path / "soup" / "merge.json").read_text())
    soup = prov["greedy_soup"]
    good0, bad, good1 = map(str, z["models"])
    assert soup["ingredients"] == [good0, good1] and soup["split"] == "heldout"
    assert soup["ranking"][-1] == bad and set(soup["ranking"]) == {good0, bad, good1}
    assert set(soup["losses"]) == {good0, bad, good1} and soup["losses"][bad] > max(
        soup["losses"][good0], soup["losses"][good1]
    )
    assert [c["accepted"] for c in soup["candidates"]] == [True, False]
    assert [len(c["ingredients"]) for c in soup["candidates"]] == [2, 3]
    assert soup["soup_loss"] == soup["candidates"][0]["loss"]
    assert prov["method"] == "greedy_soup" and [i["path"] for i in prov["inputs"]] == [good0, bad, good1]

    merge_models(z["base"], [z["models"][0], z["models"][2]], tmp_path / "avg", method="average", progress=False)
    assert _sha(tmp_path / "soup") == _sha(tmp_path / "avg")


def test_data_is_required(soup_zoo, tmp_path, capsys):
    z = soup_zoo
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "merge",
                "--base",
                str(z["base"]),
                "--method",
                "greedy_soup",
                "--out",
                str(tmp_path / "x"),
                *map(str, z["models"]),
            ]
        )
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "greedy_soup chooses on held-out data: pass --data" in err
    assert not (tmp_path / "x").exists()


def test_registry_marks_it_as_needing_data():
    from ordermerge.merging import registry

    m = registry.get("greedy_soup")
    assert m.needs_data and not m.seeded and not m.needs_base
    assert registry.merge_variants(["greedy_soup"], [0, 1, 2]) == [("greedy_soup", 0)]
