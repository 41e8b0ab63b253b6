"""The autotuner: correctness guard, time limits, resume after kill -9, shared storage, records, CLI.

Most tests drive the *fake* target (`tests/tune_fake.py`: the Triton knobs, a synthetic
cost model, a real float64 correctness check), so they are fast and deterministic on a CPU;
`test_torch_backend_tune_then_load` runs the real torch backend end to end.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernelsearch.errors import UsageError
from kernelsearch.runtime import config_store as records
from kernelsearch.tune.space import Constraint, Knob, SearchSpace, config_key, fix_choices
from tests.pg_fixture import postgres_url  # noqa: F401  (fixture)
from tests.tune_fake import FakeTarget, fake_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ks_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERNELSEARCH_RECORDS", raising=False)
    records.clear_cache()
    yield tmp_path / "home"
    records.clear_cache()


def _tune(**kw):
    from kernelsearch.tune.study import TuneOptions, tune

    kw["adapter"] = FakeTarget(kw.pop("fake", None) or {})
    kw.setdefault("progress", False)
    kw.setdefault("retime_repeats", 2)
    out = io.StringIO()
    res = tune(TuneOptions(spec=None, out=out, **kw))
    return res, out.getvalue()


def _study(storage_url: str, fake: dict, sizes=None):
    """Load the fake study from a storage URL (what the workers wrote)."""
    import optuna

    from kernelsearch.tune.storage import open_storage, parse_storage

    st = open_storage(parse_storage(storage_url))
    names = optuna.study.get_all_study_names(storage=st)
    sha = fake_spec(fake).sha256[:16]
    names = [n for n in names if f"|{sha}|" in n]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=st)


def _counted(study):
    return [t for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and (t.user_attrs.get("ks") or {}).get("counted")]


def _fake_cmd(fake: dict, *args: str) -> list[str]:
    """`kernelsearch tune` with the fake target, in another process."""
    return [sys.executable, "-m", "tests.tune_fake", "--fake", json.dumps(fake), "tune", "--no-progress", *args]


def _env(home: Path) -> dict:
    env = dict(os.environ)
    env["KERNELSEARCH_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------------------------------
# Search space, tolerances, records (no processes)
# ---------------------------------------------------------------------------------------

def test_space_conditional_knobs_canonical_and_constraints():
    space = SearchSpace(
        [Knob("lowering", ("materialized", "chunked"), "materialized"),
         Knob("CHUNK_N", (16, 24, 64), 64, when=("lowering", ("chunked",))),
         Knob("compile", (False, True), False)],
        [Constraint("CHUNK_N % 16 == 0", lambda c: c.get("CHUNK_N", 16) % 16 == 0, "CHUNK_N={CHUNK_N} not /16")])
    assert space.default() == {"lowering": "materialized", "compile": False}
    # an inactive knob does not make a different config
    assert space.key({"lowering": "materialized", "CHUNK_N": 16, "compile": False}) == space.key(space.default())
    assert space.violations({"lowering": "chunked", "CHUNK_N": 24, "compile": True}) == ["CHUNK_N=24 not /16"]
    valid = space.enumerate()
    assert valid[0] == space.default()
    assert len(valid) == 2 + 2 * 2  # materialized x compile + chunked x {16, 64} x compile
    assert len({config_key(c) for c in valid}) == len(valid)
    only = fix_choices(space, {"compile": [False]})
    assert only.size() == 3
    with pytest.raises(ValueError):
        fix_choices(space, {"compile": ["maybe"]})


def test_cpu_space_has_no_threads_knob():
    import kernelsearch

    from kernelsearch.tune.space import torch_space

    spec = kernelsearch.load("specs/softmax.yaml", backend="reference").spec
    # the runtime cannot apply a thread count per call (see the docstring of tune/space.py)
    assert "threads" not in torch_space(spec, {"B": 1, "H": 4, "I": 512, "J": 512, "D": 64}).names


def test_cpu_space_keeps_compiled_chunked_configs_at_long_sequences():
    """The compiled chunked lowering compiles one step function, not its unrolled loops: no
    chunking is dropped for compile time at N = 8192."""
    import kernelsearch

    from kernelsearch.tune.space import torch_space

    spec = kernelsearch.load("specs/softmax.yaml", backend="reference").spec
    small = torch_space(spec, {"B": 1, "H": 4, "I": 512, "J": 512, "D": 64})
    assert len(small.enumerate()) == 36   # materialized 2 + chunked 28 + sdpa 2 + flex 2 (x compile)
    big = torch_space(spec, {"B": 1, "H": 4, "I": 8192, "J": 8192, "D": 64})
    compiled = [c for c in big.enumerate() if c["compile"] and c["lowering"] == "chunked"]
    eager = [c for c in big.enumerate() if not c["compile"] and c["lowering"] == "chunked"]
    assert len(compiled) == len(eager) > 0
    assert not big.violations({"lowering": "chunked", "CHUNK_N": 32, "CHUNK_M": 128, "compile": True})


def test_triton_space_from_spec_tune_section():
    import kernelsearch

    from kernelsearch.tune.space import triton_space

    spec = kernelsearch.load("specs/cosine_sim.yaml", backend="reference").spec
    fwd = triton_space(spec, {"B": 1, "H": 1, "I": 48, "J": 1000, "D": 64}, "fwd")
    assert fwd.names == ["lowering", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages"]
    assert all(c["BLOCK_M"] <= 64 for c in fwd.enumerate() if c["lowering"] == "triton")  # next_pow2(48) = 64
    both = triton_space(spec, {"B": 1, "H": 1, "I": 256, "J": 256, "D": 64}, "fwd+bwd")
    assert {"BLOCK_M_BWD", "BLOCK_N_BWD", "num_warps_bwd", "num_stages_bwd"} <= set(both.names)


def test_tolerances_reject_wrong_accept_rounding():
    import torch

    from kernelsearch.tune.check import compare_outputs

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4, 64, 32, generator=g, dtype=torch.float64)
    lowp = ref.to(torch.float16)
    ok = compare_outputs({"out": lowp}, {"out": ref}, {"out": lowp}, torch.float16, "cuda")
    assert ok.ok, ok.message
    wrong = lowp.clone()
    wrong[0, 0, -1] += 0.25  # one row off: a skipped key block
    bad = compare_outputs({"out": wrong}, {"out": ref}, {"out": lowp}, torch.float16, "cuda")
    assert not bad.ok and "rel. error" in bad.message
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    assert not compare_outputs({"out": ref}, {"out": nan}, None, torch.float64, "cpu").ok


def test_records_lookup_buckets_neighbours(ks_home):
    assert records.shape_bucket({"B": 2, "H": 8, "I": 1000, "J": 1024, "D": 64}) == "D64-I1024-J1024-BH16"
    dev = records.device_name("cpu")
    b1 = records.shape_bucket({"B": 1, "H": 4, "I": 512, "J": 512, "D": 64})
    b2 = records.shape_bucket({"B": 1, "H": 4, "I": 1024, "J": 1024, "D": 64})
    assert records.lookup("abc", "torch", dev, b1, "float32") is None
    records.record("abc", "torch", dev, b1, "float32", "fwd", {"lowering": "chunked", "CHUNK_N": 128},
                   top=[{"lowering": "materialized"}])
    assert records.lookup("abc", "torch", dev, b1, "float32") == {"lowering": "chunked", "CHUNK_N": 128}
    assert records.lookup("abc", "torch", dev, b1, "float16") is None
    nb = records.neighbours("abc", "torch", dev, b2, "float32", "fwd")
    assert nb and nb[0][0] == b1 and nb[0][1][0] == {"lowering": "chunked", "CHUNK_N": 128}

    class Spec:
        sha256 = "abc"

    import torch

    sizes = {"b": 1, "h": 4, "i": 500, "j": 512, "d": 64}
    assert records.lookup_for_call(Spec, "torch", sizes, torch.float32, torch.device("cpu")) == \
        {"lowering": "chunked", "CHUNK_N": 128}
    # a fwd+bwd record is found for forward calls when there is no fwd one, and vice versa
    records.record("abc", "torch", dev, b2, "float32", "fwd+bwd", {"lowering": "materialized"})
    assert records.lookup("abc", "torch", dev, b2, "float32") == {"lowering": "materialized"}


def _record_for(graph, config: dict, present=()) -> None:
    """Record `config` for the 128-query CPU bucket of `graph`'s spec, tuned with its params."""
    records.record(graph.spec.sha256, "torch", records.device_name("cpu"), records.shape_bucket(_SIZES), "float32",
                   "fwd", config, params_tag=records.params_tag(graph.params, present))


_SIZES = {"B": 1, "H": 2, "I": 128, "J": 128, "D": 32}
_CALL = {k.lower(): v for k, v in _SIZES.items()}


def test_records_only_match_the_params_they_were_tuned_with(ks_home):
    import torch

    from kernelsearch.compiler import compile_graph
    from kernelsearch.spec import load_spec

    spec = load_spec(str(ROOT / "specs/cosine_sim.yaml"))
    cpu = torch.device("cpu")

    def lookup(graph_or_spec, **kw):
        return records.lookup_for_call(graph_or_spec, "torch", _CALL, torch.float32, cpu, **kw)

    default, not_causal, scale10 = (compile_graph(spec, p, frozenset()) for p in ({}, {"causal": False},
                                                                                    {"scale": 10.0}))
    tuned = {"lowering": "chunked", "CHUNK_N": 32, "compile": False}
    _record_for(default, tuned)
    assert lookup(default) == tuned
    assert lookup(compile_graph(spec, {"causal": True, "scale": 8}, frozenset())) == tuned  # the same params
    assert lookup(spec) == tuned  # a spec alone means its defaults (callers that pass graph.spec)
    assert lookup(not_causal) is None and lookup(scale10) is None
    assert lookup(spec, params=not_causal.params) is None
    _record_for(not_causal, {"lowering": "materialized", "compile": False})
    assert lookup(not_causal) == {"lowering": "materialized", "compile": False}
    assert lookup(default) == tuned and lookup(scale10) is None
    # warm starts only come from records with the same params
    dev, far = records.device_name("cpu"), records.shape_bucket({**_SIZES, "I": 4096, "J": 4096})
    assert [cs[0] for _, cs in records.neighbours(spec.sha256, "torch", dev, far, "float32", "fwd",
                                                  params_tag=records.params_tag(scale10.params))] == []
    assert records.neighbours(spec.sha256, "torch", dev, far, "float32", "fwd",
                              params_tag=records.params_tag(default.params))[0][1][0] == tuned


@pytest.mark.parametrize("overrides", [{}, {"causal": False}])
def test_load_uses_records_of_its_own_params(ks_home, overrides):
    import torch

    import kernelsearch
    from kernelsearch.compiler import compile_graph
    from kernelsearch.spec import load_spec

    tuned = {"lowering": "chunked", "CHUNK_N": 32, "compile": False}
    _record_for(compile_graph(load_spec(str(ROOT / "specs/cosine_sim.yaml")), {}, frozenset()), tuned)
    attn = kernelsearch.load("specs/cosine_sim.yaml", backend="torch", **overrides)
    attn(*(torch.randn(1, 2, 128, 32) for _ in range(3)))
    used = {k: attn.last_config.get(k) for k in tuned}   # last_config also names the defaulted CHUNK_M
    if not overrides:
        assert used == tuned
    else:
        assert used != tuned, "a config tuned with other params was used"


def test_records_and_optional_inputs(ks_home):
    import torch

    from kernelsearch.compiler import compile_graph
    from kernelsearch.spec import load_spec

    spec = load_spec(str(ROOT / "specs/cosine_sim.yaml"))
    plain, masked = (compile_graph(spec, {}, frozenset(p)) for p in ((), ("mask",)))
    with_mask = {"lowering": "chunked", "CHUNK_N": 64, "compile": False}
    _record_for(masked, with_mask, present=("mask",))

    def lookup(graph):
        return records.lookup_for_call(graph, "torch", _CALL, torch.float32, torch.device("cpu"))

    assert lookup(masked) == with_mask
    assert lookup(plain) is None  # timed with a mask: not a record for calls without one
    # a record timed without optional inputs serves calls with them (its config was checked with them)
    _record_for(plain, {"lowering": "materialized", "compile": False})
    assert lookup(plain) == {"lowering": "materialized", "compile": False}
    assert lookup(masked) == with_mask
    assert lookup(compile_graph(spec, {}, frozenset(["attn_bias"]))) == {"lowering": "materialized", "compile": False}


def test_records_without_params_tag_are_ignored(ks_home):
    import torch

    from kernelsearch.spec import load_spec

    spec = load_spec(str(ROOT / "specs/cosine_sim.yaml"))
    dev, bucket = records.device_name("cpu"), records.shape_bucket(_SIZES)
    old_key = "|".join((spec.sha256, "torch", dev, bucket, "float32", "fwd"))  # format 1: no params tag
    old = {"config": {"lowering": "chunked", "CHUNK_N": 32}, "spec_sha256": spec.sha256, "backend": "torch",
           "device": dev, "bucket": bucket, "dtype": "float32", "direction": "fwd"}
    path = records.records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "records": {old_key: old}}))
    records.clear_cache()
    assert records.lookup_for_call(spec, "torch", _CALL, torch.float32, torch.device("cpu")) is None
    assert records.lookup(spec.sha256, "torch", dev, bucket, "float32") is None
    assert records.neighbours(spec.sha256, "torch", dev, records.shape_bucket({**_SIZES, "I": 512}),
                              "float32", "fwd") == []
    records.record(spec.sha256, "torch", dev, bucket, "float32", "fwd", {"lowering": "materialized"},
                   params_tag=records.params_tag({"x": 1}))
    kept = json.loads(path.read_text())
    assert kept["format"] == 2 and old_key in kept["records"] and len(kept["records"]) == 2


def test_study_names_differ_by_params_and_optional_inputs(ks_home):
    from kernelsearch.tune.study import TuneOptions, resolve

    def resolved(**kw):
        return resolve(TuneOptions(spec="specs/cosine_sim.yaml", target="cpu", shape=_SIZES, **kw))

    default = resolved()
    assert resolved(params={"causal": True, "scale": 8.0}).study_name == default.study_name
    names = {default.study_name, resolved(params={"causal": False}).study_name,
             resolved(params={"scale": 10.0}).study_name, resolved(optional_inputs=True).study_name}
    assert len(names) == 4
    assert default.params == {"scale": 8.0, "groups": 1, "causal": True} and default.present == ()
    assert resolved(optional_inputs=True).present == ("attn_bias", "mask")


# ---------------------------------------------------------------------------------------
# Trials: wrong results, hangs, crashes, compile errors, out of resources
# ---------------------------------------------------------------------------------------

def test_wrong_config_is_rejected_and_never_wins(ks_home):
    # num_stages=2 configs (the default among them) are wrong -- and twice as fast, to tempt.
    fake = {"wrong": [{"num_stages": 2}]}
    res, out = _tune(fake=fake, trials=8, seed=3, sampler="tpe")
    from kernelsearch.tune.storage import default_storage_path

    study = _study(f"sqlite:///{default_storage_path()}", fake)
    trials = _counted(study)
    assert len(trials) == 8
    wrong = [t for t in trials if (t.user_attrs["ks"]).get("kind") == "wrong_result"]
    assert wrong, "the default config is wrong and must have been rejected"
    assert all(t.state.name == "FAIL" and "rel. error" in t.user_attrs["ks"]["reason"] for t in wrong)
    assert all(t.params["num_stages"] == 2 for t in wrong)
    assert all(t.params["num_stages"] != 2 for t in trials if t.state.name == "COMPLETE")
    assert res.winner is not None and res.winner["num_stages"] != 2
    assert "the default config failed (wrong_result)" in out
    # the winner is recorded where the runtime looks
    sizes = {"B": 1, "H": 2, "I": 64, "J": 64, "D": 16}
    got = records.lookup(fake_spec(fake).sha256, "fake", records.device_name("cpu"), records.shape_bucket(sizes),
                         "float32", "fwd")
    assert got == res.winner
    assert f"config = {{'BLOCK_M': {res.winner['BLOCK_M']!r}" in out  # pasteable literal


def test_hang_crash_compile_error_out_of_resources_are_failed_trials(ks_home):
    # A 9-config grid (BLOCK_M = BLOCK_N = 64) in which the default hangs, one config kills its
    # process, one does not compile and num_stages=4 exceeds the (fake) shared memory.
    fake = {"hang": [{"num_warps": 4, "num_stages": 2}], "crash": [{"num_warps": 2, "num_stages": 2}],
            "compile_error": [{"num_warps": 8, "num_stages": 2}], "smem_limit": 64 * 64 * 3}
    t0 = time.monotonic()
    res, out = _tune(fake=fake, sampler="grid", seed=0, trial_timeout=3.0,
                     only={"BLOCK_M": [64], "BLOCK_N": [64], "num_stages": [2, 3, 4]})
    wall = time.monotonic() - t0
    from kernelsearch.tune.storage import default_storage_path

    trials = _counted(_study(f"sqlite:///{default_storage_path()}", fake))
    assert len(trials) == 9
    by = {(t.params["num_warps"], t.params["num_stages"]): t.user_attrs["ks"] for t in trials}
    assert by[(4, 2)]["kind"] == "timeout" and "no result after 3 s" in by[(4, 2)]["reason"]
    assert by[(2, 2)]["kind"] == "crash" and "SIGSEGV" in by[(2, 2)]["reason"]
    assert by[(8, 2)]["kind"] == "compile_error"
    assert all(by[(w, 4)]["kind"] == "out_of_resources" and "shared memory" in by[(w, 4)]["reason"]
               for w in (2, 4, 8))
    assert all(by[(w, 3)]["status"] == "ok" for w in (2, 4, 8))
    assert res.winner is not None and res.winner["num_stages"] == 3
    assert "every valid config has been evaluated" in out
    assert wall < 120


# ---------------------------------------------------------------------------------------
# Resume after kill -9; several workers on one storage
# ---------------------------------------------------------------------------------------

def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"kernelsearch.tune.trial" in cmd and str(pid).encode() in cmd:
                out.append(int(d))
    return out


def test_resume_after_kill_9_loses_nothing(ks_home, tmp_path):
    import optuna
    from optuna.trial import TrialState

    fake = {"sleep_s": 2.0}  # a wide window in which a trial is in flight
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    cmd = _fake_cmd(fake, "--trials", "5", "--storage", url, "--seed", "5")
    proc = subprocess.Popen(cmd, env=_env(ks_home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def mid_trial():
            if not db.exists():
                return None
            try:
                st = _study(url, fake)
            except Exception:
                return None
            done = _counted(st)
            running = [t for t in st.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.user_attrs.get("ks_run")]
            return (st, done, running) if len(done) >= 2 and running else None

        _wait_for(mid_trial, 120, "two finished trials and one in flight")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the trial's child process notices its parent died and exits
    _wait_for(lambda: not _children_of(proc.pid), 10, "the orphaned trial process to exit")
    killed = _study(url, fake)  # what the storage held when the tuner died
    before = {t.number: (t.state, t.value, dict(t.params)) for t in _counted(killed)}
    assert len(before) >= 2
    in_flight = [t for t in killed.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.user_attrs.get("ks_run")]
    assert len(in_flight) == 1, "the tuner was killed between trials; the window should be wide"
    lost = in_flight[0]

    res, _ = _tune(fake=fake, trials=5, storage=url, seed=5, top_k=1)
    study = _study(url, fake)
    after = {t.number: t for t in study.get_trials(deepcopy=False)}
    for n, (state, value, params) in before.items():  # nothing finished is lost or changed
        assert after[n].state == state and after[n].value == value and dict(after[n].params) == params
    stale = after[lost.number]
    assert stale.state == TrialState.FAIL and stale.user_attrs["ks"]["kind"] == "stale"
    assert not stale.user_attrs["ks"]["counted"]
    retried = [t for t in after.values() if t.user_attrs.get("ks_retry_of") == lost.number]
    assert retried and retried[0].state == TrialState.COMPLETE and dict(retried[0].params) == dict(lost.params)
    counted = _counted(study)
    assert len(counted) == 5
    assert len({t.user_attrs["ks_run"]["key"] for t in counted}) == 5
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert res.winner is not None


def _two_workers(url: str, home: Path, barrier: Path, threads: int = 1, n: int = 8):
    from optuna.trial import TrialState

    # the trial processes wait for each other, so that both tuner processes take part
    fake = {"sleep_s": 0.5, "barrier": {"dir": str(barrier), "n": threads + 1}}
    # one tuner in a subprocess, one in this process (it has torch imported already: cheaper)
    proc = subprocess.Popen(_fake_cmd(fake, "--trials", str(n), "--storage", url,
                                      "--seed", "12"),
                            env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        res, here = _tune(fake=fake, trials=n, storage=url, seed=11, workers=threads)
    finally:
        out, _ = proc.communicate(timeout=240)
    outs = [here, out]
    assert proc.returncode == 0, out[-3000:]
    study = _study(url, fake)
    counted = _counted(study)
    assert len(counted) == n, [o[-1500:] for o in outs]
    keys = [t.user_attrs["ks_run"]["key"] for t in counted]
    assert len(set(keys)) == n, "a config was evaluated twice"
    workers = {t.user_attrs["ks_run"]["worker"]["pid"] for t in counted}
    assert len(workers) == 2 and os.getpid() in workers, "both processes should have contributed"
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def test_two_workers_share_a_journal_file(ks_home, tmp_path):
    # one process with two worker threads, one with one
    _two_workers(f"journal:{tmp_path / 'tune.journal'}", ks_home, tmp_path / "barrier", threads=2)


def test_two_workers_share_postgresql(ks_home, postgres_url, tmp_path):  # noqa: F811
    _two_workers(postgres_url, ks_home, tmp_path / "barrier")


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def _run_cli(argv: list[str]) -> int:
    import argparse

    from kernelsearch.tune.cli import register

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    args = ap.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("argv, needle", [
    (["tune", "specs/no_such_spec.yaml"], "spec file not found"),
    (["tune"], "missing SPEC"),
    (["tune", "specs/cosine_sim.yaml", "--trials", "0"], "--trials 0"),
    (["tune", "specs/cosine_sim.yaml", "--storage", "mongodb://x/y"], "unsupported scheme"),
    (["tune", "specs/cosine_sim.yaml", "--storage", "not-a-url"], "not a storage URL"),
    (["tune", "specs/cosine_sim.yaml", "--storage", "/no/such/dir/t.db"], "does not exist"),
    (["tune", "specs/cosine_sim.yaml", "--shape", "1,2,3"], "B,H,I,J,D"),
    (["tune", "specs/cosine_sim.yaml", "--dtype", "int7"], "--dtype"),
    (["tune", "specs/cosine_sim.yaml", "--only", "nope=1"], "unknown knob"),
    (["report", "specs/no_such_spec.yaml"], "spec file not found"),
])
def test_cli_bad_input_is_a_usage_error(ks_home, argv, needle):
    with pytest.raises(UsageError) as e:
        _run_cli(argv)
    assert needle in str(e.value)


def test_cli_unreachable_postgres_is_a_usage_error(ks_home):
    with pytest.raises(UsageError) as e:
        _run_cli(["tune", "specs/cosine_sim.yaml", "--storage", "postgresql://nobody@127.0.0.1:1/none",
                  "--trials", "1"])
    assert "cannot open storage" in str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["tune", "specs/no_such_spec.yaml"], "spec file not found"),
    (["tune", "specs/cosine_sim.yaml", "--trials", "0"], "--trials 0"),
    (["tune", "specs/cosine_sim.yaml", "--storage", "mongodb://x/y"], "unsupported scheme"),
])
def test_top_level_cli_exit_code_2(ks_home, capsys, argv, needle):
    from kernelsearch import cli

    if "tune" not in cli.build_parser().format_help():
        pytest.skip("the top-level CLI does not register `tune` yet")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------
# The real torch backend, end to end: tune, then load uses the winner
# ---------------------------------------------------------------------------------------

def test_torch_backend_tune_then_load(ks_home):
    import torch

    import kernelsearch

    sizes = {"B": 1, "H": 2, "I": 128, "J": 128, "D": 32}
    res, out = _tune_spec("specs/cosine_sim.yaml", sizes)
    assert res.counts["complete"] == 3 and res.winner is not None
    attn = kernelsearch.load("specs/cosine_sim.yaml", backend="torch")
    q, k, v = (torch.randn(1, 2, 128, 32) for _ in range(3))
    attn(q, k, v)
    assert attn.last_config == res.winner
    assert "kernelsearch.load('specs/cosine_sim.yaml', backend='torch', config=config)" in out


def _tune_spec(spec: str, sizes: dict):
    from kernelsearch.tune.study import TuneOptions, tune

    out = io.StringIO()
    res = tune(TuneOptions(spec=spec, target="cpu", shape=sizes, sampler="grid", progress=False, seed=0,
                           only={"compile": [False], "CHUNK_N": [32, 64], "CHUNK_M": [0],
                                 "lowering": ["materialized", "chunked"]},
                           retime_repeats=2, out=out))
    return res, out.getvalue()


# ---------------------------------------------------------------------------------------
# The CUDA target's pipeline, rehearsed in Triton's interpreter (no GPU: TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------

def _tune_triton(monkeypatch, spec: str, sizes: dict, only: dict, direction: str = "fwd"):
    from kernelsearch.tune.study import TuneOptions, tune

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the trial processes inherit it
    out = io.StringIO()
    res = tune(TuneOptions(spec=spec, target="cuda", shape=sizes, dtype="float16", direction=direction,
                           sampler="grid", progress=False, seed=0, only=only, retime_repeats=1, out=out))
    return res, out.getvalue()


def _trials(res):
    import optuna

    from kernelsearch.tune.storage import open_storage, parse_storage

    study = optuna.load_study(study_name=res.study_name, storage=open_storage(parse_storage(res.storage)))
    return [t.user_attrs["ks"] for t in _counted(study)]


def test_cuda_target_in_the_interpreter_prunes_by_shared_memory_then_load_uses_the_winner(ks_home, monkeypatch):
    """Space from the spec, AOT check for sm_90 at the tuned head dim (D=256: a 4-stage
    16x128 pipeline needs > 227 KiB), checks, timing, record; then `load` uses the record."""
    import torch

    import kernelsearch
    from kernelsearch.inputs import random_inputs

    sizes = {"B": 1, "H": 1, "I": 33, "J": 128, "D": 256}
    res, out = _tune_triton(monkeypatch, "specs/softmax.yaml", sizes,
                            {"lowering": ["triton"], "BLOCK_M": [16, 32], "BLOCK_N": [128], "num_warps": [4],
                             "num_stages": [1, 4]})
    assert "Triton's CPU interpreter" in out
    trials = _trials(res)
    assert len(trials) == 4
    ok = [t for t in trials if t["status"] == "ok"]
    pruned = [t for t in trials if t["status"] == "fail"]
    assert {t["config"]["num_stages"] for t in ok} == {1} and len(ok) == 2
    assert {t["config"]["num_stages"] for t in pruned} == {4}
    for t in pruned:   # dropped by the AOT check, before anything ran
        assert t["kind"] == "out_of_resources" and t["phase"] == "feasibility", t
        assert "shared memory" in t["reason"] and "sm_90" in t["reason"]
    for t in ok:
        assert t["check"]["ok"] and 0 < t["aot"]["shared"] <= 232448 and t["aot"]["arch"] == "sm_90"
    assert res.winner in [t["config"] for t in ok] and res.records_path

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    records.clear_cache()
    attn = kernelsearch.load("specs/softmax.yaml", backend="triton")
    x = random_inputs(attn.spec, sizes, dtype=torch.float16, device="cpu", seed=5)
    attn(**x)
    assert {k: attn.last_config[k] for k in res.winner} == res.winner


def test_cuda_target_in_the_interpreter_tunes_forward_and_backward(ks_home, monkeypatch):
    sizes = {"B": 1, "H": 2, "I": 17, "J": 33, "D": 16}
    only = {"lowering": ["triton"], "BLOCK_M": [16], "BLOCK_N": [16], "num_warps": [4], "num_stages": [1],
            "BLOCK_M_BWD": [16, 32], "BLOCK_N_BWD": [16], "num_warps_bwd": [4], "num_stages_bwd": [1]}
    res, out = _tune_triton(monkeypatch, "specs/cosine_sim.yaml", sizes, only, direction="fwd+bwd")
    trials = _trials(res)
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials), trials
    for t in trials:   # gradients were checked, and every kernel (forward, dq, dkdv) fitted
        assert t["check"]["ok"] and t["aot"]["shared"] > 0
    assert set(res.winner) == set(only) and "fwd+bwd" in res.study_name


def test_cuda_target_without_gpu_or_interpreter_is_a_usage_error(ks_home, monkeypatch):
    from kernelsearch.tune.study import TuneOptions, resolve

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UsageError, match="TRITON_INTERPRET=1"):
        resolve(TuneOptions(spec="specs/softmax.yaml", target="cuda"))


def test_cpu_workers_compile_side_by_side_but_time_alone(ks_home, tmp_path):
    """On the CPU, a config is never timed while another trial process builds, checks or times
    (target.CpuLock), so --workers does not make the timings lie; building still overlaps."""
    fake = {"measure": True, "sleep_s": 0.6, "barrier": {"dir": str(tmp_path / "barrier"), "n": 2}}
    res, out = _tune(fake=fake, trials=6, workers=2, seed=3, storage=f"journal:{tmp_path / 'tune.journal'}")
    assert res.counts["complete"] == 6, out
    study = _study(f"journal:{tmp_path / 'tune.journal'}", fake)
    spans = [(t.number, t.user_attrs["ks_run"]["worker"]["thread"], t.user_attrs["ks"]["spans"])
             for t in _counted(study)]
    assert len({w for _, w, _ in spans}) == 2

    def overlap(a, b):
        return a[0] < b[1] and b[0] < a[1]

    builds_overlapped = False
    for n1, w1, s1 in spans:
        assert set(s1) >= {"feasibility", "compile", "check", "time"}, s1
        for n2, w2, s2 in spans:
            if w1 == w2:
                continue
            for phase, span in s2.items():
                assert not overlap(s1["time"], span), f"trial {n1} was timed during trial {n2}'s {phase}"
            builds_overlapped |= overlap(s1["compile"], s2["compile"])
    assert builds_overlapped, "the workers should have built configs at the same time"


def test_only_after_a_full_run_is_a_study_of_its_own(ks_home, tmp_path):
    # Optuna cannot change a knob's choices within a study: --only used to make every ask fail
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    full, _ = _tune(trials=3, storage=storage, seed=1)
    narrow, out = _tune(trials=3, storage=storage, seed=1, only={"BLOCK_M": [32, 64]})
    assert full.study_name != narrow.study_name
    assert narrow.counts["complete"] == 3 and narrow.counts.get("uncounted", 0) <= 3, out
    assert narrow.winner["BLOCK_M"] in (32, 64)
    again, _ = _tune(trials=4, storage=storage, seed=1)   # the full study resumes where it was
    assert again.study_name == full.study_name and again.counts["counted"] == 4 and again.ran == 1


def test_a_sampler_that_always_fails_ends_the_study(ks_home, monkeypatch):
    from kernelsearch.tune.space import SearchSpace

    def broken(self, trial, every_knob=False):
        raise ValueError("no proposal")

    monkeypatch.setattr(SearchSpace, "suggest", broken)
    with pytest.raises(RuntimeError, match="failed 10 times in a row; last: ValueError: no proposal"):
        _tune(trials=3)


@pytest.mark.parametrize("sampler", ["tpe", "random", "gp"])
def test_every_sampler_searches_the_conditional_cpu_space(ks_home, sampler):
    """The CPU space is conditional (CHUNK_N, CHUNK_M only for the chunked lowering): each
    sampler proposes canonical configs, none is evaluated twice, the study reaches its budget."""
    import optuna

    from kernelsearch.tune.storage import open_storage, parse_storage
    from kernelsearch.tune.study import TuneOptions, tune

    res = tune(TuneOptions(spec="specs/softmax.yaml", target="cpu", shape={"B": 1, "H": 1, "I": 17, "J": 129, "D": 8},
                           sampler=sampler, trials=5, seed=4, progress=False, retime_repeats=1,
                           only={"compile": [False]}, out=io.StringIO()))
    study = optuna.load_study(study_name=res.study_name, storage=open_storage(parse_storage(res.storage)))
    configs = [t.user_attrs["ks"]["config"] for t in _counted(study)]
    assert len(configs) == 5 and res.counts["complete"] == 5
    assert len({config_key(c) for c in configs}) == 5
    for c in configs:
        assert ("CHUNK_N" in c) == (c["lowering"] == "chunked"), c
    assert res.winner in configs


# ---------------------------------------------------------------------------------------
# The error policy and the strategies
# ---------------------------------------------------------------------------------------

def test_an_internal_error_is_not_a_bad_config(ks_home):
    """A bug (an exception no backend declares expected) is shown loudly with its traceback and
    counted apart; the fake compiler's declared error stays a compile error."""
    fake = {"bug": [{"num_warps": 8}], "compile_error": [{"num_warps": 2}]}
    res, out = _tune(fake=fake, sampler="grid", seed=0,
                     only={"BLOCK_M": [64], "BLOCK_N": [64], "num_stages": [3]})
    from kernelsearch.tune.storage import default_storage_path

    by = {t.params["num_warps"]: t.user_attrs["ks"] for t in _counted(_study(f"sqlite:///{default_storage_path()}", fake))}
    assert by[8]["kind"] == "internal_error" and "KeyError" in by[8]["traceback"] and "fake bug" in by[8]["traceback"]
    assert by[2]["kind"] == "compile_error" and "traceback" not in by[2]
    assert res.counts["internal_error"] == 1 and res.counts["compile_error"] == 1
    assert "INTERNAL ERROR in trial" in out and "Traceback (most recent call last)" in out
    assert "1 INTERNAL ERROR(S): bugs in kernelsearch, not bad configs" in out
    assert res.winner == {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def test_policy_classifies_by_declared_types_only():
    from kernelsearch.tune.policy import INTERNAL_ERROR, TrialFailure, classify

    class CompilationError(Exception):   # a look-alike name is not a declared type
        pass

    assert classify(CompilationError("x"), {}) == INTERNAL_ERROR
    assert classify(TrialFailure("wrong_result", "x"), {}) == "wrong_result"
    assert classify(MemoryError(), {MemoryError: "out_of_resources"}) == "out_of_resources"
    with pytest.raises(ValueError):
        TrialFailure("exception", "not a kind")


def test_strategies_share_one_interface():
    from kernelsearch.tune.strategy import STRATEGIES, make_strategy

    space = SearchSpace([Knob("a", (1, 2, 3), 1), Knob("b", (1, 2), 1)])
    valid = space.enumerate()
    grid = make_strategy("grid", space, 0)
    assert grid.queued_before_ask(valid[2:], stuck=0) == (valid[2], {"ks_grid": True})
    assert grid.queued_after_rejection(valid[0], {config_key(valid[0])}) is None
    tpe = make_strategy("tpe", space, 0)
    assert tpe.queued_before_ask(valid[1:], stuck=0) is None
    config, attrs = tpe.queued_before_ask(valid[1:], stuck=3)
    assert config in valid[1:] and attrs == {"ks_fallback": True}
    near = tpe.queued_after_rejection({"a": 1, "b": 1}, {config_key({"a": 1, "b": 1})})
    assert near in ({"a": 2, "b": 1}, {"a": 1, "b": 2})
    assert set(STRATEGIES) == {"tpe", "random", "grid", "gp"}
    import inspect

    from kernelsearch.tune.study import _Study

    worker = inspect.getsource(_Study.worker)
    assert not any(f'"{name}"' in worker for name in STRATEGIES), "the worker loop names a sampler"
