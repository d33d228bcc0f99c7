"""What a run reports: stage states, the markdown report and epochs table artifacts, the terminal summary."""

from __future__ import annotations

import sys
from typing import Any, Optional


def state_names(*futures_or_states) -> list[str]:
    """The state names (``Completed``, ``Cached``...) of futures or states."""
    names = []
    for f in futures_or_states:
        state = getattr(f, "state", f)
        names.append(state.name)
    return names


def epochs_table(epochs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("epoch", "step", "train_ppl", "val_ppl", "train_bits", "val_bits", "tokens_per_s", "grad_norm", "lr",
            "elapsed_s")
    return [{k: (round(e[k], 4) if isinstance(e.get(k), float) else e.get(k)) for k in keys} for e in epochs]


def _fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _unit(level: str) -> str:
    return "word" if level == "word" else "char"


def markdown_report(dataset: dict[str, Any], run: dict[str, Any], evaluation: dict[str, Any],
                    epochs: list[dict[str, Any]]) -> str:
    lines = [
        "# rnnlm training report", "",
        "| metric | value |", "|---|---|",
        f"| dataset | `{dataset['dataset_id']}` ({dataset['level']} level) |",
        f"| tokens (train / val / test) | {dataset['num_tokens']:,} ({dataset['splits']['train']:,} / {dataset['splits']['val']:,} / {dataset['splits']['test']:,}) |",
        f"| vocabulary | {dataset['vocab_size']:,} |",
        f"| epochs | {run.get('epochs')} ({'finished' if run.get('finished') else 'stopped early (max_minutes)'}) |",
        f"| training throughput | {_fmt(run.get('tokens_per_s'), ',.0f')} tokens/s on {run.get('device')} x {run.get('world_size')} |",
        f"| training time | {_fmt(run.get('wall_s'), '.1f')} s |",
        f"| train perplexity (last epoch) | {_fmt(run.get('train_ppl'))} |",
        f"| validation perplexity | {_fmt(evaluation.get('val_ppl'))} |",
        f"| test perplexity | {_fmt(evaluation.get('test_ppl'))} |",
        f"| validation / test bits per {_unit(dataset['level'])} | {_fmt(evaluation.get('val_bits'))} / {_fmt(evaluation.get('test_bits'))} |",
        f"| model | `{run['model_uri']}` |", "",
        "## Samples", "",
    ]
    for s in evaluation.get("samples", []):
        lines += [f"**{s['prefix']}**", "", "```", s["text"], "```", ""]
    if epochs:
        lines += ["## Per-epoch metrics", "", "| epoch | train ppl | val ppl | val bits | tokens/s | lr |",
                  "|---|---|---|---|---|---|"]
        for e in epochs[-20:]:
            lines.append(f"| {e['epoch']} | {_fmt(e.get('train_ppl'))} | {_fmt(e.get('val_ppl'))} | {_fmt(e.get('val_bits'))} | {_fmt(e.get('tokens_per_s'), ',.0f')} | {_fmt(e.get('lr'), '.3g')} |")
        if len(epochs) > 20:
            lines.append(f"\n(last 20 of {len(epochs)} epochs; all in the `rnnlm-epochs` table artifact)")
    return "\n".join(lines)


def sweep_rows(trials: list[dict[str, Any]]) -> list[str]:
    """One line per trial: id, status, validation / test perplexity, the values it sets."""
    return [f"{t['id']:<12} {t['status']:<20} {_fmt(t.get('val_ppl')):>9} {_fmt(t.get('test_ppl')):>9}  "
            + ", ".join(f"{k}={v}" for k, v in t["overrides"].items())
            + (f"  ({t['error']})" if t.get("error") else "") for t in trials]


def sweep_markdown(trials: list[dict[str, Any]]) -> str:
    lines = ["# rnnlm sweep", "", "| trial | status | val ppl | test ppl | values |", "|---|---|---|---|---|"]
    for t in trials:
        values = ", ".join(f"`{k}={v}`" for k, v in t["overrides"].items())
        status = t["status"] + (f": {t['error']}" if t.get("error") else "")
        lines.append(f"| {t['id']} | {status} | {_fmt(t.get('val_ppl'))} | {_fmt(t.get('test_ppl'))} | {values} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the terminal summary


def make_summary(result: dict[str, Any], wall_s: float) -> dict[str, Any]:
    ds, run, ev = result["dataset"], result["run"], result["evaluation"]
    stages = result["stages"]
    states = [s for names in stages.values() for s in names]
    return {
        "flow_run_id": result["flow_run_id"],
        "tokens": ds["num_tokens"], "splits": ds["splits"], "vocab_size": ds["vocab_size"], "level": ds["level"],
        "dataset_uri": ds["uri"],
        "epochs": run["epochs"], "finished": run["finished"], "tokens_per_s": run["tokens_per_s"],
        "train_wall_s": run["wall_s"], "val_ppl": ev["val_ppl"], "test_ppl": ev["test_ppl"],
        "val_bits": ev.get("val_bits"), "test_bits": ev.get("test_bits"),
        "run_dir": run["run_dir"], "model_uri": run["model_uri"],
        "samples": [s["text"] for s in ev["samples"]],
        "stages": stages, "cached_stages": sum(s == "Cached" for s in states), "total_stages": len(states),
        "registered": result.get("registered"),
        "sweep": result.get("sweep"),
        "wall_s": wall_s,
    }


def prefect_ui_hint(flow_run_id: Optional[str]) -> str:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL

    path = f"/runs/flow-run/{flow_run_id}" if flow_run_id else ""
    if PREFECT_API_URL.value():
        ui = PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix("/api")
        return f"open {ui}{path}"
    return (f"PREFECT_HOME={PREFECT_HOME.value()} prefect server start   "
            f"# then open http://127.0.0.1:4200{path}")


def print_report(s: dict[str, Any], file=sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p("")
    p("=" * 72)
    p("rnnlm run: done" + (f" ({s['cached_stages']}/{s['total_stages']} stages from cache)" if s["cached_stages"] else ""))
    p(f"  tokens            {s['tokens']:,} ({s['level']}; train {s['splits']['train']:,}, val {s['splits']['val']:,}, test {s['splits']['test']:,})")
    p(f"  vocabulary        {s['vocab_size']:,}")
    p(f"  epochs            {s['epochs']}{'' if s['finished'] else ' (stopped at max_minutes)'}")
    p(f"  training          {_fmt(s['tokens_per_s'], ',.0f')} tokens/s, {_fmt(s['train_wall_s'], '.1f')} s")
    p(f"  perplexity        validation {_fmt(s['val_ppl'])}, test {_fmt(s['test_ppl'])}")
    p(f"  bits per {_unit(s['level'])}     validation {_fmt(s.get('val_bits'))}, test {_fmt(s.get('test_bits'))}")
    p(f"  model             {s['model_uri']}")
    for i, text in enumerate(s["samples"], 1):
        p(f"  sample {i}          {text!r}")
    p(f"  wall time         {s['wall_s']:.1f} s")
    p(f"  Prefect UI        {s['prefect_ui']}")
    if s.get("sweep"):
        p(f"  sweep             {len(s['sweep']['trials'])} trials, best {s['sweep']['best']} "
          f"(trial, status, val ppl, test ppl, values):")
        for row in sweep_rows(s["sweep"]["trials"]):
            p(f"    {row}")
    for line in registration_lines(s.get("registered")):
        p(line)
    p("=" * 72)


def registration_lines(reg: Optional[dict[str, Any]]) -> list[str]:
    """The summary's registry lines: the version (or "nothing new to register" when this training
    run was registered before), the gate's decision (its "not comparable" reason when that is it)."""
    if not (reg and reg.get("registered")):
        return []
    gate = reg["gate"]
    role = "champion" if gate["promoted"] else f"challenger; champion stays version {gate['champion_version']}"
    if reg.get("new_version", True):
        lines = [f"  registered        {reg['name']} version {reg['version']} ({role})"]
    else:
        lines = [f"  registered        nothing new to register (version {reg['version']} unchanged; {role})"]
    # the gate's reason starts "not comparable: ..." when that was the outcome
    lines.append(f"  gate              {gate['reason']}" + (" (decided before)" if gate.get("decided_before") else ""))
    lines.append(f"  MLflow UI         mlflow ui --backend-store-uri {reg['tracking_uri']} --host 127.0.0.1 --port 5000"
                 if reg["tracking_uri"].startswith("sqlite") else f"  MLflow UI         open {reg['tracking_uri']}")
    lines.append(f"  consume           mlflow.pyfunc.load_model('models:/{reg['name']}@champion')")
    return lines
