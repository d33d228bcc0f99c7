"""One command that checks the GPU path, for the few minutes a GPU is at hand.

    bench/gpu_check.sh [--device cuda|cpu] [--ptb-dir DIR] [--out DIR]

Parts, each in its own process under its own time limit; the report is rewritten after every
part, so a part that fails or runs out of time leaves the others' results:

* ``preflight``: the Python packages ``pipeline`` needs; one line naming any that are missing.
* ``gpu_tests``: ``pytest -m gpu`` (tests/test_gpu.py; the 2-GPU NCCL tests skip on one GPU).
* ``trainer``: bench/train_throughput.py's trainer section, the trainer over a plain PyTorch loop
  on the d2l models (target >= 1.0 on every row).
* ``graphs``: its graphs section, the trainer with ``train.cuda_graphs: true`` over the plain
  loop on the same models (target >= 1.3 on the d2l rows).
* ``softmax``: its softmax section, adaptive over full softmax at 10k/50k/100k/150k/250k words
  (where ``softmax: auto``'s GPU crossover lies).
* ``syncs``: bench/cuda_syncs.py, the host's waits for the device and the launches per training
  step (torch.profiler), eager and with ``train.cuda_graphs``, and the line of code behind each
  synchronizing operation torch flags.
* ``ptb`` (with ``--ptb-dir``, a directory holding ptb.train.txt, ptb.valid.txt, ptb.test.txt):
  ``ptb-word-medium`` and ``ptb-word-medium-tied`` side by side on the one GPU for
  ``--ptb-minutes`` each, then their test perplexity.

The parts run in that order inside ``--budget-min`` (7.5 minutes; the PTB part's own minutes come
on top): each gets its own limit or what is left of the budget, whichever is less, and a part
that cannot start with ``MIN_PART_S`` left is reported "skipped (budget)". ``--parts`` runs some of
them again, a rerun of one that failed, say, in a GPU lease's last minutes.

Runs on ``pipeline`` alone (no Prefect, no MLflow, nothing installed): the script puts the
checkout on PYTHONPATH. ``--device cpu`` is a smoke mode of under a minute (tiny settings, no PTB,
no GPU tests). Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` and ends with one JSON line:
``gpu_tests``, ``trainer_ratio_min``, ``graphs_ratio_min``, ``waits_per_step`` (eager, graphs),
``adaptive_speedup`` (by vocabulary), ``adaptive_speedup_50k``, ``adaptive_speedup_250k``,
``adaptive_from`` (the smallest vocabulary measured from which the adaptive head is the faster at
every larger size: the GPU's value for ``ADAPTIVE_FROM`` in pipeline/model/models.py, null when
it is faster at none), ``ptb_medium_test_ppl``, ``ptb_medium_tied_test_ppl`` (null when not run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "numpy", "pyarrow", "fsspec", "pydantic", "yaml", "psutil", "filelock", "pytest")
PTB_PRESETS = {"ptb_medium": "ptb-word-medium", "ptb_medium_tied": "ptb-word-medium-tied"}
PARTS = ("gpu_tests", "trainer", "graphs", "softmax", "syncs", "ptb")  # in the order they run: the most wanted first
# Seconds each part may take on a GPU (the PTB part: its minutes and this); all but PTB fit --budget-min.
LIMITS_S = {"gpu_tests": 150, "trainer": 75, "graphs": 75, "softmax": 90, "syncs": 60, "ptb_extra": 50}
MIN_PART_S = 20  # a part is not started with less than this left of the budget
SOFTMAX_VOCABS = "10000,50000,100000,150000,250000"


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], limit_s: float) -> tuple[int | None, str]:
    """(exit code, output); exit code None when the part ran out of time (its whole process
    group is killed then: a part's own children, trainers say, do not outlive it)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out
    return proc.returncode, out


def last_json(output: str) -> dict | None:
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


class Report:
    def __init__(self, out: Path, device: str):
        self.out, self.parts = out, {}
        self.summary = {"device": device, "gpu_tests": None, "trainer_ratio_min": None, "graphs_ratio_min": None,
                        "waits_per_step": None, "adaptive_speedup": None, "adaptive_speedup_50k": None,
                        "adaptive_speedup_250k": None, "adaptive_from": None,
                        "ptb_medium_test_ppl": None, "ptb_medium_tied_test_ppl": None}
        out.mkdir(parents=True, exist_ok=True)

    def part(self, name: str, status: str, seconds: float, **figures) -> None:
        self.parts[name] = {"status": status, "seconds": round(seconds, 1), **figures}
        print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
        self.write()

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps({**self.summary, "parts": self.parts}, indent=1) + "\n")
        lines = ["# GPU check", "", f"device: {self.summary['device']}", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.summary.items() if k != "device"]
        lines += ["", "| part | status | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {p['status']} | {p['seconds']} |" for k, p in self.parts.items()]
        for k, p in self.parts.items():
            rows = p.get("rows")
            if rows:
                keys = list(rows[0])
                lines += ["", f"## {k}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(str(r.get(c)) for c in keys) + " |" for r in rows]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def preflight(report: Report, device: str) -> bool:
    t0 = time.monotonic()
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"gpu_check: missing Python packages: {', '.join(missing)} (install them, or carry wheels: "
              f"see bench/gpu_check.sh)", file=sys.stderr)
        report.part("preflight", f"missing {', '.join(missing)}", time.monotonic() - t0)
        return False
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        report.part("preflight", "no CUDA device", time.monotonic() - t0)
        return False
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    import pydantic

    report.part("preflight", "ok", time.monotonic() - t0, torch=torch.__version__, gpu=gpu,
                cores=os.cpu_count(), python=sys.version.split()[0], pydantic=pydantic.VERSION)
    return True


def gpu_tests(report: Report, limit_s: float) -> None:
    """``pytest -m gpu``; in the CPU smoke run they all skip, which still proves they import here."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]
    code, out = run(cmd, limit_s)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}
    status = "timed out" if code is None else ("ok" if code == 0 else f"exit {code}")
    report.summary["gpu_tests"] = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                                   "skipped": counts.get("skipped", 0), "exit": code}
    report.part("gpu_tests", status, time.monotonic() - t0, counts=counts, tail=out[-1500:] if code else "")


def throughput(report: Report, section: str, device: str, smoke: bool, limit_s: float) -> None:
    t0 = time.monotonic()
    cmd = [sys.executable, "bench/train_throughput.py", "--device", device, "--sections", section, "--ranks", "1"]
    if section in ("trainer", "graphs"):
        cmd += (["--cells", "rnn", "--layers", "1", "--steps", "20", "--repeats", "1"] if smoke
                else ["--models", "d2l", "--steps", "200", "--repeats", "2"])
    if section == "softmax":
        cmd += ["--softmax-vocabs", "10000" if smoke else SOFTMAX_VOCABS]
    code, out = run(cmd, limit_s)
    result = last_json(out) if code == 0 else None
    if result is None:
        status = "timed out" if code is None else f"exit {code}"
        report.part(section, status, time.monotonic() - t0, tail=out[-1500:])
        return
    if section == "trainer":
        report.summary["trainer_ratio_min"] = result.get("ratio_min")
        report.part(section, "ok", time.monotonic() - t0, rows=result.get("rows"))
    elif section == "graphs":
        report.summary["graphs_ratio_min"] = result.get("graphs_ratio_min")
        rows = result.get("graphs_rows")
        report.part(section, "ok" if rows else "skipped (needs CUDA)", time.monotonic() - t0, rows=rows)
    else:
        rows = result.get("softmax_rows") or []
        speedup = {r["vocab"]: r["speedup"] for r in rows}
        report.summary["adaptive_speedup"] = speedup
        report.summary["adaptive_speedup_50k"] = speedup.get(50_000)
        report.summary["adaptive_speedup_250k"] = speedup.get(250_000)
        report.summary["adaptive_from"] = adaptive_from(speedup)
        report.part(section, "ok", time.monotonic() - t0, rows=rows)


def adaptive_from(speedup: dict[int, float]) -> int | None:
    """The smallest vocabulary measured from which adaptive over full is >= 1 at every larger size."""
    found = None
    for vocab in sorted(speedup, reverse=True):
        if speedup[vocab] is None or speedup[vocab] < 1.0:
            break
        found = vocab
    return found


def syncs(report: Report, limit_s: float) -> None:
    """bench/cuda_syncs.py, eager and graphed: the host's waits and the launches per step."""
    t0 = time.monotonic()
    results, tails = {}, []
    for mode, extra in (("eager", []), ("graphs", ["--cuda-graphs"])):
        code, out = run([sys.executable, "bench/cuda_syncs.py", *extra], limit_s / 2)
        result = last_json(out) if code == 0 else None
        if result is None:
            tails.append(f"{mode}: " + ("timed out" if code is None else f"exit {code}") + "\n" + out[-1000:])
        results[mode] = result
    waits = {mode: r and r.get("waits_per_step") for mode, r in results.items()}
    report.summary["waits_per_step"] = waits
    status = "failed" if tails else ("skipped (needs CUDA)" if all(w is None for w in waits.values()) else "ok")
    report.part("syncs", status, time.monotonic() - t0, results=results, tail="\n".join(tails))


def ptb(report: Report, ptb_dir: Path | None, minutes: float, workdir: Path, device: str = "cuda",
        presets: dict[str, str] = PTB_PRESETS, limit_s: float | None = None) -> None:
    """Both presets side by side on the one device, each for ``minutes``; their test perplexity."""
    t0 = time.monotonic()
    overrides = [f"train.max_minutes={minutes}", f"train.device={device}"]
    overrides += [f"data.root_dir={ptb_dir}"] if ptb_dir else []
    code = f"""
import json, subprocess, sys, yaml
from pipeline.config_sources import load_run_config
from pipeline.data.prepare import prepare_dataset
presets = {presets!r}
store, work = {str(workdir / 'store')!r}, {str(workdir)!r}
import time
procs = {{}}
start = time.monotonic()
for key, name in presets.items():
    cfg = load_run_config(name, overrides={overrides!r})
    ds = prepare_dataset(cfg.data, store)
    path = f"{{work}}/{{key}}.yaml"
    with open(path, "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f)
    procs[key] = (subprocess.Popen([sys.executable, "-m", "pipeline.training.train", "--run-dir", f"{{work}}/{{key}}",
                                    "--dataset", ds.uri, "--config", path],
                                   stdout=subprocess.DEVNULL, stderr=open(f"{{work}}/{{key}}.log", "w")), ds)
from pipeline.model.lm import LanguageModel
out = {{}}
for key, (proc, ds) in procs.items():
    code = proc.wait()
    seconds = time.monotonic() - start
    if code:
        out[key] = {{"exit": code}}
        continue
    result = json.load(open(f"{{work}}/{{key}}/result.json"))
    lm = LanguageModel.from_dir(f"{{work}}/{{key}}", device={device!r})
    out[key] = {{"test_ppl": round(lm.perplexity(ds.split("test")), 2), "val_ppl": round(result["val_ppl"], 2),
                "epochs": result["epochs"], "seconds": round(seconds, 1),
                "tokens_per_s": round(result.get("tokens_per_s") or 0)}}
print(json.dumps(out))
"""
    rc, out = run([sys.executable, "-c", code], limit_s or minutes * 60 + LIMITS_S["ptb_extra"])
    result = last_json(out) if rc == 0 else None
    if result is None:
        report.part("ptb", "timed out" if rc is None else f"exit {rc}", time.monotonic() - t0, tail=out[-1500:])
        return
    for key in presets:
        report.summary[f"{key}_test_ppl"] = result.get(key, {}).get("test_ppl")
    report.part("ptb", "ok", time.monotonic() - t0, rows=[{"preset": presets[k], **v} for k, v in result.items()])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of under a minute")
    p.add_argument("--ptb-dir", type=Path, help="a directory holding ptb.train.txt, ptb.valid.txt, ptb.test.txt")
    p.add_argument("--ptb-minutes", type=float, default=2.5, help="training minutes of each PTB preset")
    p.add_argument("--budget-min", type=float, default=7.5, help="minutes for all parts but PTB's training")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)} to run")
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="where the JSON and markdown reports go")
    args = p.parse_args()
    parts = [part for part in args.parts.split(",") if part]
    if set(parts) - set(PARTS):
        p.error(f"--parts: unknown {', '.join(sorted(set(parts) - set(PARTS)))} (choose from {', '.join(PARTS)})")
    if args.budget_min <= 0:
        p.error(f"--budget-min must be positive, not {args.budget_min}")
    smoke = args.device == "cpu"
    report = Report(args.out, args.device)
    deadline = time.monotonic() + args.budget_min * 60
    if preflight(report, args.device):
        for part in (part for part in PARTS if part in parts):
            if part == "ptb":
                if args.ptb_dir and not smoke:  # its minutes come on top of the budget
                    extra = max(deadline - time.monotonic(), 0) + LIMITS_S["ptb_extra"]
                    ptb(report, args.ptb_dir.resolve(), args.ptb_minutes, args.out.resolve() / "ptb",
                        limit_s=args.ptb_minutes * 60 + extra)
                continue
            left = deadline - time.monotonic()
            if left < MIN_PART_S:
                report.part(part, "skipped (budget)", 0.0)
                continue
            limit = min(60 if smoke else LIMITS_S[part], left)
            if part == "gpu_tests":
                gpu_tests(report, limit)
            elif part == "syncs":
                syncs(report, limit)
            else:
                throughput(report, part, args.device, smoke, limit)
    report.write()
    print(json.dumps(report.summary))
    # A part the budget left out was not checked: that is no pass.
    passed = all(p["status"] == "ok" or p["status"] == "skipped (needs CUDA)" for p in report.parts.values())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
