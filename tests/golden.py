"""Golden files: the generated code of every spec, reviewed in diffs.

For every spec in specs/ (default params, every optional input present) tests/golden/ holds
what `kernelsearch show` prints for it:

    <variant>.torch.expected          the torch lowerings
    <variant>.triton.expected         the Triton inference kernels (forward)
    <variant>.triton_train.expected   the Triton training kernels (forward saving lse, dq, dkdv)

tests/test_golden.py fails when generated code changes; regenerate them with one command,

    python tests/golden.py

and review the diff with the change that caused it.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def golden_texts(spec_path: Path) -> dict:
    """{golden file name: text} of one spec."""
    from kernelsearch.codegen.show_cli import files_for
    from kernelsearch.spec import load_spec
    spec = load_spec(spec_path.relative_to(ROOT))
    present = frozenset(spec.optional_inputs)
    texts = {}
    for backend in ("torch", "triton"):
        for file in files_for(spec, {}, present, backend):
            kind = file.module[len(spec.name) + 1:].rsplit("_", 1)[0]     # torch | triton | triton_train
            texts[f"{spec.name}.{kind}.expected"] = file.source
    return texts


def main() -> int:
    sys.path.insert(0, str(ROOT))
    GOLDEN.mkdir(exist_ok=True)
    wanted = {}
    for spec_path in SPECS:
        wanted.update(golden_texts(spec_path))
    for stale in set(p.name for p in GOLDEN.glob("*.expected")) - set(wanted):
        (GOLDEN / stale).unlink()
        print(f"removed tests/golden/{stale}")
    for name, text in sorted(wanted.items()):
        path = GOLDEN / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote tests/golden/{name}")
    return 0


if __name__ == "__main__":
    import os
    os.chdir(ROOT)
    sys.exit(main())
