"""The reliability counts in docs/reliability.md are generated from the tests (tests/reliability_counts.py)."""

from __future__ import annotations

import reliability_counts as rc


def test_reliability_page_block_is_current():
    found = rc.BLOCK.search(rc.PAGE.read_text())
    assert found, f"{rc.PAGE} has no block between {rc.BEGIN!r} and {rc.END!r}"
    expected = rc.render(rc.counts())
    assert found.group(0) == expected, (
        "docs/reliability.md's counts are stale; regenerate them with "
        "`python tests/reliability_counts.py --write` and commit docs/reliability.md"
    )


def test_counts_follow_the_test_modules(monkeypatch):
    """A case added to a test module changes the rendered block (the counts are not typed)."""
    test_faults = rc.load_test_module("test_faults")

    before = rc.render(rc.counts())
    monkeypatch.setattr(test_faults, "FAULT_TRIALS", [*test_faults.FAULT_TRIALS, ("merge", 99)])
    after = rc.render(rc.counts())
    assert before != after and f"| {len(test_faults.FAULT_TRIALS)} |" in after
