"""What a failed trial means: the config's fault (a failed trial with its reason) or a bug.

Expected failures are properties of a config on this machine, and become failed trials:

    infeasible        a static check of the backend refused it
    compile_error     the kernel compiler refused it (Triton, Inductor)
    out_of_resources  shared memory, registers or device memory do not suffice
    wrong_result      its output or gradients did not match the float64 reference
    bad_timing        the timer measured something that is not a time
    timeout           no result within the trial's time limit (detected by the parent)
    crash             the trial process died (segfault, OOM killer; detected by the parent)

A backend names the exception types that mean one of these (`expected_errors`), so nothing is
classified by its class name or message. Anything else raised while a trial runs is an
*internal error*: a bug in kernelsearch (a code generator, a backend, the tuner), not an unlucky
config. It is recorded with its whole traceback, shown loudly as it happens, and counted apart
in the summary; it never enters the table of configs as if the config were bad.
"""
from __future__ import annotations

import traceback
from typing import Mapping

__all__ = ["TrialFailure", "EXPECTED_KINDS", "INTERNAL_ERROR", "classify", "failure_outcome"]

EXPECTED_KINDS = ("infeasible", "compile_error", "out_of_resources", "wrong_result", "bad_timing", "timeout",
                  "crash")
INTERNAL_ERROR = "internal_error"


class TrialFailure(Exception):
    """An expected failure of a config, raised by a backend adapter or the evaluator."""

    def __init__(self, kind: str, message: str):
        if kind not in EXPECTED_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected one of {EXPECTED_KINDS}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def classify(error: BaseException, expected: Mapping[type, str]) -> str:
    """The failure kind of an exception raised while evaluating a config: its `TrialFailure`
    kind, the kind its backend declared for its type, else `INTERNAL_ERROR`."""
    if isinstance(error, TrialFailure):
        return error.kind
    for error_type, kind in expected.items():
        if isinstance(error, error_type):
            return kind
    return INTERNAL_ERROR


def failure_outcome(error: BaseException, expected: Mapping[type, str]) -> dict:
    """The outcome fields of a failed evaluation; an internal error keeps its whole traceback."""
    kind = classify(error, expected)
    if isinstance(error, TrialFailure):
        return {"status": "fail", "kind": kind, "reason": error.message}
    out = {"status": "fail", "kind": kind, "reason": f"{type(error).__name__}: {error}"[:4000]}
    if kind == INTERNAL_ERROR:
        out["traceback"] = "".join(traceback.format_exception(error))[-8000:]
    return out
