"""pytest plugin (entry point ``pytest11``): ``--kernelsearch-backend`` and its fixture.

    # test_my_attention.py: run with  pytest --kernelsearch-backend=torch,triton
    from kernelsearch.testing import assert_matches_reference

    def test_cosine_sim(kernelsearch_backend):
        assert_matches_reference("specs/cosine_sim.yaml", backend=kernelsearch_backend, scale=10.0)

The option takes one backend or a comma-separated list (auto, reference, torch, triton;
default auto: triton on a GPU, torch on a CPU); a test that asks for ``kernelsearch_backend``
runs once per backend listed. Without a GPU, the fixture runs the triton backend in Triton's
interpreter (TRITON_INTERPRET=1 for that test only): slow, so keep shapes small there.
"""
from __future__ import annotations

import pytest

OPTION = "--kernelsearch-backend"
FIXTURE = "kernelsearch_backend"


def _choices() -> tuple[str, ...]:
    from .api import BACKENDS
    return ("auto", *BACKENDS)


def parse_backends(text: str | None) -> list[str]:
    """'torch,triton' -> ['torch', 'triton']; an unknown name is a pytest usage error."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        return ["auto"]       # without importing kernelsearch: the plugin loads in every pytest run
    unknown = [n for n in names if n not in _choices()]
    if unknown:
        raise pytest.UsageError(f"{OPTION}: unknown backend {', '.join(map(repr, unknown))}; "
                                f"choose from {', '.join(_choices())} (comma-separated for several)")
    return list(dict.fromkeys(names))


def pytest_addoption(parser):
    group = parser.getgroup("kernelsearch")
    group.addoption(OPTION, action="store", default=None, metavar="NAMES",
                    help=f"backend(s) the {FIXTURE} fixture gives, comma-separated: "
                         f"{', '.join(_choices())} (default: auto)")


def pytest_configure(config):
    parse_backends(config.getoption(OPTION))     # a typo fails the run before any test


def pytest_generate_tests(metafunc):
    if FIXTURE in metafunc.fixturenames:
        names = parse_backends(metafunc.config.getoption(OPTION))
        metafunc.parametrize(FIXTURE, names, indirect=True, ids=[f"kernelsearch-{n}" for n in names])


@pytest.fixture
def kernelsearch_backend(request, monkeypatch) -> str:
    """The backend name to hand to kernelsearch.load / assert_matches_reference."""
    name = request.param
    if name == "triton":
        import torch
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            from .backends.triton_backend import interpret_stdlib_jit_calls
            interpret_stdlib_jit_calls()
    return name
