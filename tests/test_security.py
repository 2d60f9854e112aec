"""Security checks that need no model: no unpickling and no remote code in src/, and every shipped
config validates.

The scan reads code only: strings, docstrings and comments are blanked first, so documentation may
name the calls it refuses (e.g. "never torch.load(") without tripping it.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
import yaml

from ordermerge.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# name -> pattern found in code (strings and comments blanked)
FORBIDDEN = {
    "torch.load": re.compile(r"\btorch\.load\s*\("),
    "pickle.load/loads": re.compile(r"\b(c?[pP]ickle|_pickle)\.loads?\s*\("),
    "dill": re.compile(r"\bdill\b"),
    "joblib.load": re.compile(r"\bjoblib\.load\b"),
    "trust_remote_code=True": re.compile(r"\btrust_remote_code\s*=\s*True\b"),
    "allow_pickle=True": re.compile(r"\ballow_pickle\s*=\s*True\b"),
    "weights_only=False": re.compile(r"\bweights_only\s*=\s*False\b"),
    "yaml.unsafe_load / full_load": re.compile(r"\byaml\.(unsafe_load|full_load|unsafe_load_all)\s*\("),
}
# Calls that are only safe with an argument: (name, call pattern, required argument pattern).
NEEDS_ARG = [
    (
        "np.load without allow_pickle=False",
        re.compile(r"\b(np|numpy)\.load\s*\("),
        re.compile(r"\ballow_pickle\s*=\s*False\b"),
    ),
    (
        "yaml.load without SafeLoader",
        re.compile(r"\byaml\.load(_all)?\s*\("),
        re.compile(r"\bLoader\s*=\s*(yaml\.)?C?SafeLoader\b"),
    ),
]


def code_only(source: str) -> str:
    """The source with every string and comment replaced by spaces (line and column numbers kept)."""
    lines = source.splitlines(keepends=True)
    blank = {tokenize.STRING, tokenize.COMMENT} | {getattr(tokenize, "FSTRING_MIDDLE", -1)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in blank:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end
        for r in range(r0, r1 + 1):
            line = lines[r - 1]
            a, b = (c0 if r == r0 else 0), (c1 if r == r1 else len(line.rstrip("\r\n")))
            lines[r - 1] = line[:a] + " " * (b - a) + line[b:]
    return "".join(lines)


def call_text(code: str, start: int) -> str:
    """From a call's name to its matching close parenthesis."""
    depth, i = 0, code.index("(", start)
    for j in range(i, len(code)):
        depth += {"(": 1, ")": -1}.get(code[j], 0)
        if depth == 0:
            return code[start : j + 1]
    return code[start:]


def findings(source: str, name: str = "<source>") -> list[str]:
    code = code_only(source)
    line_of = lambda pos: code.count("\n", 0, pos) + 1  # noqa: E731
    out = [f"{name}:{line_of(m.start())}: {what}" for what, pat in FORBIDDEN.items() for m in pat.finditer(code)]
    for what, call, arg in NEEDS_ARG:
        out += [
            f"{name}:{line_of(m.start())}: {what}"
            for m in call.finditer(code)
            if not arg.search(call_text(code, m.start()))
        ]
    return sorted(out)


def test_src_never_unpickles_or_trusts_remote_code():
    files = sorted(SRC.rglob("*.py"))
    assert files, f"no sources under {SRC}"
    found = [f for path in files for f in findings(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "unsafe loading in src/ (use safetensors / np.load(..., allow_pickle=False)):\n  " + "\n  ".join(
        found
    )


@pytest.mark.parametrize(
    "snippet, hits",
    [
        ("import torch\nstate = torch.load(path)\n", ["torch.load"]),
        ("import pickle\nobj = pickle.load(fh)\nobj = pickle.loads(b)\n", ["pickle.load/loads"] * 2),
        ("import dill\n", ["dill"]),
        ("from joblib import load\nx = joblib.load(p)\n", ["joblib.load"]),
        ("a = np.load(p)\n", ["np.load without allow_pickle=False"]),
        ("a = np.load(p, allow_pickle=True)\n", ["allow_pickle=True", "np.load without allow_pickle=False"]),
        ("a = np.load(\n    p,\n    allow_pickle=False,\n)\n", []),
        ("m = AutoModel.from_pretrained(p, trust_remote_code = True)\n", ["trust_remote_code=True"]),
        ("m = AutoModel.from_pretrained(p, trust_remote_code=trust)\n", []),
        ("c = yaml.load(fh)\n", ["yaml.load without SafeLoader"]),
        ("c = yaml.load(fh, Loader=yaml.SafeLoader)\nd = yaml.safe_load(fh)\n", []),
        ('"""Never torch.load( or pickle.loads here."""\n# dill is not used; np.load(p) neither\n', []),
    ],
)
def test_scanner_finds_what_it_should(snippet, hits):
    """The scan above is only worth something if it catches each pattern (and not documentation)."""
    assert [f.split(": ", 1)[1] for f in findings(snippet)] == sorted(hits)


def test_scanner_names_file_and_line():
    assert findings("x = 1\n\ny = torch.load(p)\n", "src/x.py") == ["src/x.py:3: torch.load"]


CONFIGS = sorted(p for d in ("configs", "tests/configs") for p in (ROOT / d).glob("*.yaml"))


def test_default_config_validates(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()))
    assert all(m["trust_remote_code"] is False for m in cfg["models"].values())


# Overlays and what they are laid over, as `make study`, the README and tests/test_reruns.py use them.
UNDER = {
    "study": ["config.yaml"],
    "study-replicate": ["config.yaml"],
    "study-schedule": ["config.yaml"],
    "study-constant": ["config.yaml", "configs/study-schedule.yaml"],
    "reruns": ["tests/configs/smoke.yaml"],
}


def layered(path: Path) -> dict:
    """The config a shipped file stands for: itself, or for an overlay (UNDER) the files below it with the
    overlay merged over them, as Snakemake merges configfiles."""
    from snakemake.utils import update_config

    if path.stem not in UNDER:
        return yaml.safe_load(path.read_text())
    cfg: dict = {}
    for layer in [*(ROOT / f for f in UNDER[path.stem]), path]:
        update_config(cfg, yaml.safe_load(layer.read_text()))
    return cfg


def test_every_overlay_is_known():
    overlays = {p.stem for p in CONFIGS if "models" not in yaml.safe_load(p.read_text())}
    assert overlays <= set(UNDER), f"say what {sorted(overlays - set(UNDER))} is laid over in UNDER"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_shipped_config_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # results_dir and local model paths are relative to the workflow root
    cfg = validate_config(layered(path))
    assert all(m["trust_remote_code"] is False or m.get("revision") for m in cfg["models"].values())
