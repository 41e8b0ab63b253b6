"""The README's "Use it in your model" section runs as written: every python block, the pytest one
as a user's test file under the plugin."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Use it in your model"


def section_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"README.md lost its {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_three_examples():
    blocks = section_blocks()
    assert len(blocks) == 3
    assert "assert_matches_reference" in blocks[0] and "kernelsearch.nn.Attention" in blocks[1]
    assert "integrations.transformers import register" in blocks[2]


def test_pytest_example_runs_under_the_plugin(tmp_path):
    block = section_blocks()[0]
    filename = re.match(r"# (test_\w+\.py)", block).group(1)
    (tmp_path / filename).write_text(block)
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "kernelsearch.pytest_plugin", "-p", "no:cacheprovider",
                          "-q", "--kernelsearch-backend=reference,torch", str(tmp_path / filename)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout


def test_nn_example_runs():
    exec(compile(section_blocks()[1], "README.md (nn.Attention)", "exec"), {})


def test_transformers_example_runs(capsys):
    pytest.importorskip("transformers")
    exec(compile(section_blocks()[2], "README.md (transformers)", "exec"), {})
    assert "torch.Size([1, 16])" in capsys.readouterr().out
