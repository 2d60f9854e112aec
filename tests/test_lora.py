"""LoRA artefacts are deterministic byte for byte, like every other output."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import cli_env


def test_lora_adapter_config_bytes_do_not_depend_on_the_hash_seed(tiny_base, tmp_path):
    """peft stores target_modules as a set; saved sorted, two runs give the same adapter_config.json."""
    code = (
        "import sys; from pathlib import Path; from transformers import AutoModelForCausalLM; "
        "from ordermerge.train.lora import save_adapter, wrap; "
        "m = wrap(AutoModelForCausalLM.from_pretrained(sys.argv[1]), {'lora_r': 2}); "
        "save_adapter(m, Path(sys.argv[2]))"
    )
    texts = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"a{seed}"
        env = {**cli_env(), "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(tiny_base), str(out)], env=env, check=True, timeout=120)
        texts.append((out / "adapter_config.json").read_bytes())
    assert texts[0] == texts[1] == texts[2]
    assert json.loads(texts[0])["target_modules"] == sorted(json.loads(texts[0])["target_modules"])
