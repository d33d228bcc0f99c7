"""What a training's MLflow run records besides its metrics: flat params, the code version,
samples and its artifact files (the perplexity plot among them)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import subprocess
from typing import Any

from pipeline import storage
from pipeline.code_version import SOURCE_ROOT as PROJECT_DIR


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
        points = [(e.get("epochs", e["epoch"]), e[key]) for e in epochs if isinstance(e.get(key), (int, float))]
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


def generate_samples(lm, dataset, prefixes: list[str] | None) -> list[str]:
    """Greedy and seeded-sampling continuations (100 tokens) of each prefix; by default the
    first 10 tokens of the validation split."""
    if prefixes is None:
        from pipeline.model.generate import join_tokens

        val = dataset.split("val")
        first = [lm.vocab_tokens[i] for i in val[:10]] if len(val) else lm.vocab_tokens[1:2]
        prefixes = [join_tokens(first, lm.level)]
    samples = []
    for prefix in prefixes:
        samples.append(lm.generate(prefix, 100))
        samples.append(lm.generate(prefix, 100, temperature=1.0, seed=0))
    return samples


def run_files(run_dir: str, lm, manifest: dict[str, Any], result: dict[str, Any], epochs: list[dict[str, Any]],
              samples: list[str], title: str) -> dict[str, bytes]:
    """The run's artifacts by file name: plot, samples, vocabulary, manifest, lm.json, result, metrics."""
    files = {
        "perplexity.png": plot_perplexity(epochs, title),
        "samples.txt": ("\n\n".join(samples) + "\n").encode("utf-8"),
        "vocab.json": json.dumps(lm.vocab_tokens, ensure_ascii=False, indent=0).encode("utf-8"),
        "manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"),
        "lm.json": json.dumps(lm.meta, indent=2, sort_keys=True).encode("utf-8"),
        "result.json": json.dumps(result, indent=2, sort_keys=True).encode("utf-8"),
    }
    metrics_file = storage.join(run_dir, "metrics.jsonl")
    if storage.exists(metrics_file):
        files["metrics.jsonl"] = storage.read_bytes(metrics_file)
    return files
