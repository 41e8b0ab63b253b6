"""The generated code of every spec equals its golden file (tests/golden.py regenerates them)."""
import pytest

from .golden import GOLDEN, SPECS, golden_texts


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.stem)
def test_generated_code_matches_golden(spec_path):
    for name, text in golden_texts(spec_path).items():
        path = GOLDEN / name
        assert path.exists(), f"tests/golden/{name} is missing: run `python tests/golden.py`"
        assert path.read_text() == text, \
            f"generated code of {spec_path.name} changed ({name}): review it, then run `python tests/golden.py`"


def test_no_stray_golden_files():
    expected = {name for spec_path in SPECS for name in golden_texts(spec_path)}
    assert {p.name for p in GOLDEN.glob("*.expected")} == expected
