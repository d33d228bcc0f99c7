"""The docs cannot drift from the code: every command in README.md, docs/*.md and
deployments/README.md runs, and every relative link points at a file (and heading) that exists.

The convention (docs/development.md): a fenced block with the info string ``bash`` is a command a
reader would copy, and this test runs it; a ``bash`` block that cannot run here carries
``<!-- not run: REASON -->`` on the line right above its fence; every other block names what it
is (``text``, ``yaml``, ``python``, ...). The pages run in order (README first) in one working
directory, as a reader following them would, on tiny settings: the one substitution is TINY below.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import Processes, clean_env, free_port, wait_http

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deployments" / "README.md"]
README_MAX_LINES = 250

# The substitution, in plain sight: these `rnnlm` commands get these overrides appended (the last
# --set wins), so the documented runs train a small model on a slice of the corpus for one epoch.
TINY = {
    "run": ["data.splits.max_tokens=20000", "model.hidden_size=32", "model.embed_size=16", "train.epochs=1",
            "train.max_minutes=null"],
    "train": ["data.splits.max_tokens=20000", "model.hidden_size=32", "model.embed_size=16", "train.epochs=1",
              "train.max_minutes=null"],
}
# What the reader brings: the docs' "your own corpus" is this file in the working directory.
READER_FILES = {"my-corpus.txt": REPO / "pipeline" / "data" / "timemachine.txt"}
# Info strings that hide what a block is: a command is `bash`, anything else says what it is.
VAGUE_INFO = {"", "sh", "shell", "console", "zsh"}
# The commands the docs must show running (the brief of tests/test_docs.py: help-level to run).
MUST_RUN = {"presets", "prepare", "train", "run", "generate"}

FENCE = re.compile(r"^(`{3,})\s*([^`\s]*)")
NOT_RUN = re.compile(r"^<!--\s*not run\b:?(.*?)-->\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    info: str
    text: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse(page: Path, text: str | None = None) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown page, and what breaks the convention in it."""
    lines = (page.read_text(encoding="utf-8") if text is None else text).split("\n")
    blocks, problems, i = [], [], 0
    name = page.name if text is not None else str(page.relative_to(REPO))
    while i < len(lines):
        marker = NOT_RUN.match(lines[i].strip())
        fence = FENCE.match(lines[i])
        if marker:
            reason = marker.group(1).strip()
            following = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if not reason:
                problems.append(f"{name}:{i + 1}: a not-run marker without a reason")
            if not following or following.group(2) != "bash":
                problems.append(f"{name}:{i + 1}: a not-run marker not right above a ```bash block")
        if fence:
            ticks, info = fence.group(1), fence.group(2)
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
            if end is None:
                problems.append(f"{name}:{i + 1}: a fenced block that is never closed")
                break
            prev = NOT_RUN.match(lines[i - 1].strip()) if i else None
            if info in VAGUE_INFO:
                problems.append(f"{name}:{i + 1}: a fenced block marked {info or 'with nothing'!r}: "
                                "use bash for commands, text (or yaml, python, ...) for the rest")
            blocks.append(Block(page, i + 1, info, "\n".join(lines[i + 1:end]),
                                prev.group(1).strip() if prev else None))
            i = end
        i += 1
    return blocks, problems


def without_code(text: str) -> str:
    """The page with fenced blocks and inline code removed: links in code are not links."""
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    headings = re.findall(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    broken = []
    for target in LINK.findall(without_code(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
            broken.append(f"{page.relative_to(root)}: {target} (no such heading in {dest.name})")
    return broken


# ------------------------------------------------------------------------------- the checks


def test_the_pages_exist_and_readme_is_a_front_door():
    names = {p.name for p in PAGES}
    assert {"data.md", "training.md", "gpu.md", "flows.md", "registry.md", "failures.md", "benchmarks.md"} <= names
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    first, _ = parse(REPO / "README.md")
    top = first[0].text.splitlines()
    assert top[0].startswith("make run") and top[1].startswith("make test")
    test_command = top[1].split("#")[0].strip()
    assert test_command in (REPO / ".ci" / "run").read_text(), "CI runs README's test command"


def test_every_block_follows_the_convention():
    problems = [p for page in PAGES for p in parse(page)[1]]
    assert not problems, "\n".join(problems)


def test_the_convention_check_catches_what_it_should():
    bad = "\n".join(["```", "ls", "```", "<!-- not run -->", "```bash", "make run", "```",
                     "<!-- not run: a reason -->", "", "```bash", "x", "```", "```sh", "y", "```", "```bash", "z"])
    _, problems = parse(Path("bad.md"), bad)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "a fenced block marked 'with nothing': use bash for commands, text (or yaml, python, ...) for the rest",
        "a not-run marker without a reason",
        "a not-run marker not right above a ```bash block",
        "a fenced block marked 'sh': use bash for commands, text (or yaml, python, ...) for the rest",
        "a fenced block that is never closed"]
    good = "<!-- not run: needs a GPU -->\n```bash\nnvidia-smi\n```\n```bash\nrnnlm presets\n```"
    blocks, _ = parse(Path("good.md"), good)
    assert [(b.not_run, b.text) for b in blocks] == [("needs a GPU", "nvidia-smi"), (None, "rnnlm presets")]


def test_relative_links_point_at_files_and_headings_that_exist(tmp_path):
    broken = [b for page in PAGES for b in broken_links(page)]
    assert not broken, "\n".join(broken)
    planted = tmp_path / "page.md"
    planted.write_text("# Title\n[ok](#title) [gone](missing.md) [no heading](#nowhere) `[code](x.md)`\n")
    assert [b.split(": ", 1)[1] for b in broken_links(planted, tmp_path)] == [
        "missing.md (no such file)", "#nowhere (no such heading in page.md)"]


def runnable_blocks() -> list[Block]:
    return [b for page in PAGES for b in parse(page)[0] if b.info == "bash" and b.not_run is None]


@pytest.fixture
def prefect_api(tmp_path, request) -> str:
    """One Prefect server for every documented `rnnlm run` (each would otherwise start and stop
    a temporary one: half a minute each); stopped by PID at the end."""
    from flows import servers

    procs = Processes(tmp_path / "server-logs")
    request.addfinalizer(procs.stop_all)
    port = free_port()
    env = servers.server_env(home=str(tmp_path / "prefect-home"), base=clean_env(PREFECT_LOGGING_LEVEL="WARNING"))
    server = procs.start("prefect-server", servers.server_command("127.0.0.1", port), env)
    api = f"http://127.0.0.1:{port}/api"
    wait_http(f"{api}/health", server, procs, "prefect-server")
    return api


@pytest.fixture
def workspace(tmp_path, prefect_api) -> tuple[Path, dict[str, str]]:
    """An empty working directory holding what the reader brings, and the environment of a shell
    after `source .venv/bin/activate` (no storage root, no tracking server set), with the TINY
    wrapper as `rnnlm` and the shared Prefect server."""
    work, wrapper = tmp_path / "work", tmp_path / "bin"
    work.mkdir(), wrapper.mkdir()
    for name, source in READER_FILES.items():
        shutil.copy(source, work / name)
    real = Path(sys.executable).with_name("rnnlm")
    (wrapper / "rnnlm").write_text(
        f"#!{sys.executable}\n"
        "# tests/test_docs.py: the documented command, with TINY's overrides for its subcommand\n"
        "import os, sys\n"
        f"TINY = {TINY!r}\n"
        "args = sys.argv[1:]\n"
        "command = next((a for a in args if not a.startswith('-')), None)\n"
        "extra = [w for kv in TINY.get(command, ()) for w in ('--set', kv)]\n"
        f"os.execv({str(real)!r}, [{str(real)!r}, *args, *extra])\n")
    (wrapper / "rnnlm").chmod(0o755)
    env = clean_env(PATH=os.pathsep.join([str(wrapper), str(real.parent), os.environ.get("PATH", "")]),
                    VIRTUAL_ENV=str(real.parent.parent), PREFECT_API_URL=prefect_api, RNNLM_NUM_THREADS="1",
                    PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return work, env


@pytest.mark.slow
def test_every_documented_command_runs(workspace):
    work, env = workspace
    blocks = runnable_blocks()
    ran, seconds = set(), {}
    for block in blocks:
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (f"{block.where}: the block exited {proc.returncode}\n{block.text}\n"
                                      f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
        seconds[block.where] = time.perf_counter() - start
        ran |= set(re.findall(r"^\s*rnnlm\s+(?:-\S+\s+)*([a-z]+)", block.text, flags=re.M))
    print("\n".join(f"{where}: {s:.1f} s" for where, s in seconds.items()))  # shown with -rP: what to shrink
    assert MUST_RUN <= ran, f"the docs show no runnable `rnnlm {sorted(MUST_RUN - ran)}`"
    assert (work / ".rnnlm" / "mlflow.db").is_file()  # the tour's runs really registered
