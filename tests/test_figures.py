"""Figures keep one colour per merge method: resample1 in Fig. 3 is resample1 in Fig. 4 and the K-sweep,
whichever other methods a figure shows. Cheap: matplotlib (Agg) on a few points, nothing written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from ordermerge.analysis import figures, subsets
from ordermerge.merging import registry


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw, instead of saving them."""
    figs = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: figs.append(fig))
    return figs


def colours_by_method(fig) -> dict[str, tuple]:
    """'merged: <method> ...' legend label -> its line's colour, over every axis of a figure."""
    out = {}
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels):
            if label.startswith("merged: "):
                line = handle.lines[0] if hasattr(handle, "lines") else handle  # an errorbar's container
                out[label.split()[1]] = to_rgba(line.get_color())
    return out


def test_each_method_has_one_colour_in_every_figure(drawn):
    rng = np.random.default_rng(0)
    positions = np.array([rng.permutation(20) for _ in range(3)])
    losses = rng.random((3, 20))
    figures.plot_fig3(
        positions, losses, {m: rng.random(20) for m in ("average", "resample1", "select")}, 0, 4, "fig3", None
    )
    figures.plot_fig4(
        {"single": {1: [1.0, 1.2], 2: [0.9, 1.0]}, "resample1": {1: [1.1], 2: [0.95]}, "dare": {1: [1.3], 2: [1.0]}},
        "val",
        "fig4",
        None,
    )
    sweep = pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "method": ["select", "resample1", "resample1"],
            "subset_size": [2, 2, 4],
            "val_loss": [2.0, 2.2, 1.9],
            "exact_match": np.nan,
        }
    )
    single = pd.DataFrame(
        {
            "model": "m",
            "task": "t",
            "scheme": "shuffle",
            "precision": "fp32",
            "run": [0, 1],
            "val_loss": [1.0, 2.0],
            "exact_match": np.nan,
        }
    )
    subsets.plot_ksweep(subsets.ksweep_table(sweep, single), single, "ksweep", None)
    fig3, fig4, ksweep = map(colours_by_method, drawn)
    assert set(fig3) == {"average", "resample1", "select"} and set(fig4) == {"resample1", "dare"}
    assert fig3["resample1"] == fig4["resample1"] == ksweep["resample1"] == to_rgba(figures.method_colour("resample1"))
    assert fig3["select"] == ksweep["select"]
    # every key the registry knows has its own colour, none of them the single runs' black or gray
    colours = [to_rgba(figures.method_colour(k)) for k in registry.method_keys()]
    assert len(set(colours)) == len(colours)
    assert not {to_rgba("black"), to_rgba("tab:gray")} & set(colours)
