"""bench/bench_torch.py's plumbing at a tiny size: every variant gets rows, outputs agree, no crash.

The benchmark runs in a subprocess (it resets torch.compile's caches and sets thread counts, which
must not leak into other tests); the numbers themselves are not checked, only the table.
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_torch.py"
VARIANTS = ["softmax", "cosine_sim", "memory_efficient", "local", "talking_heads"]


def run_bench(tmp_path, *args):
    out = tmp_path / "table.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "64", "--repeats", "1", "--warmup", "0",
                             "--out", str(out), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    measurements = text.split("\n| goal")[0]      # the goals table follows the measurements
    rows = [line for line in measurements.splitlines()
            if line.startswith("| ") and not line.startswith(("| variant", "| ---"))]
    return text, [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]


def assert_clean(text, rows):
    assert rows, text
    assert "MISMATCH in" not in text and "failed" not in text, text
    assert not any("MISMATCH" in row[-1] for row in rows), text


def test_quick_plumbing_all_variants_eager_and_sdpa(tmp_path):
    text, rows = run_bench(tmp_path, "--impls", "sdpa,eager-materialized,eager-chunked")
    assert_clean(text, rows)
    assert "date:" in text and "command: `python bench/bench_torch.py" in text
    assert {row[0] for row in rows} == set(VARIANTS)
    for row in rows:
        variant, n, impl, median, ratio = row[:5]
        assert n == "64"
        assert float(median) > 0, row
        assert float(row[6]) <= 1e-4, row                 # max abs diff vs the float64 reference
        if variant in ("softmax", "cosine_sim", "memory_efficient"):
            assert ratio.endswith("x"), row               # SDPA ran: a ratio
        if variant == "talking_heads":
            assert ratio == "n/a (no baseline)", row
    impls = {(row[0], row[2]) for row in rows}
    assert ("memory_efficient", "SDPA") in impls and ("local", "SDPA") not in impls
    assert ("talking_heads", "torch eager chunked (CHUNK_N=512, CHUNK_M=0)") in impls


def test_quick_plumbing_compiled_flex(tmp_path):
    # the most involved baseline: compiled flex with a window block mask, a score_mod gathering the
    # position-bias table and rotary applied outside; compiling it is most of this test's time
    text, rows = run_bench(tmp_path, "--variants", "local", "--impls", "flex,eager-chunked")
    assert_clean(text, rows)
    assert [row[2] for row in rows] == ["flex (compiled)", "torch eager chunked (CHUNK_N=512, CHUNK_M=0)"]
    assert all(row[4].endswith("x") for row in rows)
    assert "first call (compile)" in rows[0][-1]
