"""The documents are part of the contract: the README stays a short entry (the manual is the site in docs/), the
site builds with `mkdocs build --strict` (a broken link or a page missing from the nav fails), and the commands
the pages mark as runnable run.

Two marks, each an HTML comment on the line before a fenced block:
- `<!-- runs -->`: every command line runs as written (from a scratch folder, `python` being this interpreter);
- `<!-- composes -->`: every `python train.py ...` line (not `-m`) composes and validates as train.py would
  (through Hydra's compose API, in this process: the machine's own device is not asked for, so `hardware=gpu`
  lines are checked too), without training.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from exp.config import expand_shorthand, validate

from ..conftest import ROOT, compose_train

PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"<!-- (runs|composes) -->\n```[a-z]*\n(.*?)\n```", re.S)


def marked_commands() -> list[tuple[str, str, str]]:
    """(page, mark, command) for every command line in a marked block of README.md and docs/*.md."""
    found = []
    for page in [ROOT / "README.md", *PAGES]:
        for mark, body in BLOCK.findall(page.read_text()):
            for line in body.splitlines():
                command = line.split("  #", 1)[0].strip()
                if command and not command.startswith("#"):
                    found.append((page.name, mark, command))
    return found


def test_readme_is_a_short_entry_to_the_site():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260, len(lines)
    text = "\n".join(lines)
    for page in PAGES:  # every page is reachable from the README
        if page.name == "index.md":  # the site's own front page
            continue
        assert f"docs/{page.name}" in text, page.name


@pytest.mark.skipif(shutil.which("mkdocs", path=os.path.dirname(sys.executable)) is None, reason="no mkdocs")
def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable))
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_some_commands_are_marked():
    marks = {mark for _, mark, _ in marked_commands()}
    assert marks == {"runs", "composes"}, marks


@pytest.mark.parametrize("page, mark, command", marked_commands(), ids=lambda v: v if len(v) < 60 else v[:60])
def test_marked_command_runs(page, mark, command, tmp_path):
    args = shlex.split(command)
    assert args[0] == "python", f"{page}: a marked command starts with python: {command}"
    if mark == "composes":
        assert args[1] == "train.py" and "-m" not in args, f"{page}: <!-- composes --> is for train.py runs"
        overrides = [expand_shorthand(a) for a in args[2:]]  # as train.py's job runner spells them
        validate(compose_train(*overrides, run_dir=tmp_path / "run"), node=False)
        return
    if len(args) > 1 and args[1] == "train.py":
        args[1] = str(ROOT / "train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command_line = [sys.executable, *args[1:]]
    proc = subprocess.run(command_line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{page}: {command}\n{proc.stderr[-2000:]}"
