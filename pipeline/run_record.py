"""What a training's MLflow run records besides its metrics: flat params, the code version, a plot."""

from __future__ import annotations

import importlib.metadata
import io
import json
import subprocess
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c.0.d": 2}``."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = json.dumps(obj) if isinstance(obj, (list, tuple)) else obj
    return out


def code_version() -> tuple[str, str]:
    """(version, source): the git commit of the project checkout, else the package version."""
    if (PROJECT_DIR / ".git").exists():
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
            if len(sha) == 40:
                return sha, "git"
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return importlib.metadata.version("rnnlm"), "package"
    except importlib.metadata.PackageNotFoundError:
        return "unknown", "none"


def plot_perplexity(epochs: list[dict[str, Any]], title: str = "") -> bytes:
    """PNG of train/val perplexity against epoch (d2l's Animator plot), without pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in (("train_ppl", "-"), ("val_ppl", "--")):
        points = [(e["epoch"], e[key]) for e in epochs if isinstance(e.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), style, marker="o" if len(points) < 20 else None, label=key.replace("_ppl", ""))
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
