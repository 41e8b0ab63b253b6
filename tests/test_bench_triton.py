"""bench/bench_triton.py's plumbing on the CPU: --dry-run runs the forward and the forward+backward
paths of every implementation at a tiny size in Triton's interpreter and checks outputs and gradients
against the float64 reference; without a GPU the real benchmark refuses (exit code 2).

The benchmark runs in a subprocess (it sets TRITON_INTERPRET before importing triton and resets
torch.compile's caches); no timing is checked or produced. The table's ratio columns are checked on
hand-made rows (synthetic milliseconds, not measurements).
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_triton.py"


def run_script(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_forward_and_backward_softmax(tmp_path):
    out = tmp_path / "table.md"
    result = run_script("--dry-run", "--variants", "softmax", "--sizes", "32", "--causal", "true",
                        "--direction", "both", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dry run ok" in result.stdout
    text = out.read_text()
    assert "date:" in text and "device: CPU (dry run)" in text
    assert "command: `python bench/bench_triton.py --dry-run --variants softmax" in text
    assert "14*B*H*D*kept" in text                       # the fwd+bwd FLOP convention is stated
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| softmax")]
    cells = {(r[4], r[5]): r[6] for r in rows}           # (pass, implementation) -> check
    for direction in ("fwd", "fwd+bwd"):
        for label in ("kernelsearch triton", "sdpa (flash)"):
            assert cells[(direction, label)].startswith("ok"), (direction, label, cells)
        assert "grads" in cells[("fwd+bwd", "kernelsearch triton")]
    assert cells[("fwd", "flex (eager)")].startswith("ok"), cells
    # FlexAttention has no backward on the CPU: an n/a cell, not a crash (on a GPU it is timed)
    assert cells[("fwd+bwd", "flex (eager)")].startswith(("ok", "n/a")), cells
    assert "TFLOP/s" not in result.stdout and " ms " not in result.stdout     # no timings quoted


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_gpu():
    result = run_script("--sizes", "64", "--variants", "softmax", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA GPU" in result.stderr and "--dry-run" in result.stderr


def test_table_ratios_on_synthetic_rows():
    spec = importlib.util.spec_from_file_location("bench_triton_module", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench          # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    case = bench.Case("softmax", 1024, 64, True, batch=16, heads=16)
    rows = [bench.Row(case, "fwd+bwd", bench.KERNELSEARCH, ms=1.0),
            bench.Row(case, "fwd+bwd", "sdpa (flash)", ms=2.0),
            bench.Row(case, "fwd+bwd", "flex (compiled)", status="oom")]
    lines = bench.table(rows, dry_run=False).splitlines()[2:]
    ks, sdpa, flex = ([c.strip() for c in line.strip("|").split("|")] for line in lines)
    flops = 14 * 16 * 16 * 64 * (1024 * 1025 // 2)
    assert ks[6:] == ["1.000", f"{flops / 1e9:.1f}", "2.00x", "n/a", "2.00x"]
    assert sdpa[6:] == ["2.000", f"{flops / 2e9:.1f}", "1.00x", "n/a", ""]
    assert flex[6:] == ["oom", "n/a", "n/a", "n/a", ""]
