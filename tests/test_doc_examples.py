"""The `generate` lines of README.md and docs/*.md, run as written, answer sensibly.

Every line of a ```bash or ```sh block that runs `edgellm generate` (as `.venv/bin/edgellm` or `edgellm`), and every
`... | edgellm chat` that pipes its turns on stdin, runs in a shell at the repository root with the venv's `edgellm`
first on PATH, against the real model. Each must exit 0, print an answer, and not end in a loop; a line that asks
for (or starts) a capital names it. Each process loads the model (seconds), so the lines run two at a time, one
torch thread each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgellm.model.sampling import detect_loop

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 300
GENERATE = re.compile(r"^(\.venv/bin/)?edgellm generate\b")
PIPED_CHAT = re.compile(r"\|\s*(\.venv/bin/)?edgellm chat\b")
# text in the line -> a word its answer must contain
ANSWERS = {"capital of France": "Paris", "of Italy": "Rome"}
HINT = "edgellm: hint: the answer ends in a loop"


def example_lines(path: Path) -> list[str]:
    """The runnable `generate` and piped `chat` lines of the shell blocks of one Markdown file."""
    lines, shell = [], None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            shell = None if shell is not None else line[3:].strip() in ("bash", "sh")
            continue
        if shell and (GENERATE.match(line) or PIPED_CHAT.search(line)):
            lines.append(line)
    return lines


EXAMPLES = {f"{path.name}:{line}": line for path in DOCS for line in example_lines(path)}


def run_line(line: str, home: Path) -> subprocess.CompletedProcess:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "EDGELLM_HOME": str(home),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("EDGELLM_DEBUG", None)
    return subprocess.run(["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def runs(real_model_dir) -> dict[str, subprocess.CompletedProcess]:
    """Every example, run once, two at a time."""
    home = real_model_dir.parent.parent
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_line, line, home) for name, line in EXAMPLES.items()}
        return {name: future.result() for name, future in futures.items()}


def test_the_docs_show_generate_examples():
    readme = [name for name in EXAMPLES if name.startswith("README.md:")]
    assert len(readme) >= 4, sorted(EXAMPLES)
    assert any("--json" in name for name in readme) and any("--quant" in name for name in readme)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_doc_example_answers_sensibly(runs, name):
    line, proc = EXAMPLES[name], runs[name]
    assert proc.returncode == 0, proc.stderr
    assert HINT not in proc.stderr
    if "--json" in line:
        report = json.loads(proc.stdout)
        answer = report["text"]
        assert report["loop_detected"] is False
    else:
        answer = proc.stdout
    assert answer.strip(), proc.stderr
    assert not detect_loop(re.findall(r"\w+|[^\w\s]", answer), min_tokens=6), answer  # words, not tokens
    for asked, word in ANSWERS.items():
        if asked in line:
            assert word in answer, answer
