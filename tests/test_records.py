"""The records file (runtime/config_store.py): atomic locked writes; a corrupt file is reported
once, moved aside and treated as empty; an invalid config in a record is reported and skipped."""
from __future__ import annotations

import json
import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch

import kernelsearch
from kernelsearch.compiler import compile_graph
from kernelsearch.runtime import config_store
from kernelsearch.runtime.config_store import RecordsWarning
from kernelsearch.spec import load_spec

SIZES = {"B": 1, "H": 2, "I": 128, "J": 128, "D": 32}
CALL = {k.lower(): v for k, v in SIZES.items()}


@pytest.fixture
def ks_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELSEARCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KERNELSEARCH_RECORDS", raising=False)
    config_store.clear_cache()
    config_store._REPORTED.clear()
    (tmp_path / "home").mkdir()
    yield tmp_path / "home"
    config_store.clear_cache()


def _record(config: dict, spec_path: str = "specs/softmax.yaml") -> None:
    graph = compile_graph(load_spec(spec_path), {}, frozenset())
    config_store.record(graph.spec.sha256, "torch", config_store.device_name("cpu"), config_store.shape_bucket(SIZES),
                        "float32", "fwd", config, params_tag=config_store.params_tag(graph.params))


def _untuned_default(spec_path: str = "specs/softmax.yaml") -> dict:
    """What load runs without a record: the backend's default for this graph and call."""
    from kernelsearch.backends import torch_backend
    return torch_backend.complete_config(None, CALL, compile_graph(load_spec(spec_path), {}, frozenset()))


def _call(spec_path: str = "specs/softmax.yaml"):
    attn = kernelsearch.load(spec_path, backend="torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 32, generator=g) for _ in range(3))   # float32: what the records are for
    want = kernelsearch.load(spec_path, backend="reference")(q.double(), k.double(), v.double())
    torch.testing.assert_close(attn(q, k, v).double(), want, rtol=1e-5, atol=1e-5)
    return attn


def _records_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RecordsWarning)]


CORRUPT = {
    "garbage": ("\x00\xffnot json at all", "is not UTF-8 text"),
    "text": ("hello", "is not valid JSON"),
    "truncated": ('{"format": 2, "records": {"a|b": {"config": {"lowering": "ch', "is not valid JSON"),
    "empty": ("", "is empty"),
    "a list": ("[1, 2]", "holds a JSON list at the top"),
    "records a list": ('{"records": [1]}', "its 'records' is a JSON list"),
    "record not an object": ('{"records": {"k": 1}}', "record 'k' is a JSON int"),
    "record without config": ('{"records": {"k": {"backend": "torch"}}}', "record 'k' has no 'config' object"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_records_file_is_reported_once_set_aside_and_read_as_empty(ks_home, case):
    text, why = CORRUPT[case]
    path = ks_home / "records.json"
    path.write_bytes(text.encode("latin-1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn = _call()                     # an untuned load works: the defaults
        config_store.clear_cache()
        _call()                            # and the file is not reported twice
    assert attn.last_config == _untuned_default()
    messages = _records_warnings(caught)
    assert len(messages) == 1 and str(path) in messages[0] and why in messages[0], messages
    aside = list(ks_home.glob("records.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == text.encode("latin-1")   # nothing lost
    assert f"moved aside to {aside[0]}" in messages[0]
    assert not path.exists()
    _record({"lowering": "chunked", "CHUNK_N": 64})   # a new file is started beside it
    assert _call().last_config["CHUNK_N"] == 64


def test_tune_does_not_overwrite_a_corrupt_file_silently(ks_home):
    path = ks_home / "records.json"
    path.write_text('{"format": 2, "records": {"x": {"config": {}}, "y": ')   # truncated: other records in it
    with pytest.warns(RecordsWarning, match="is not valid JSON"):
        _record({"lowering": "materialized"})
    aside = list(ks_home.glob("records.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().endswith('"y": ')
    assert list(json.loads(path.read_text())["records"].values())[0]["config"] == {"lowering": "materialized"}


def test_a_directory_named_records_json(ks_home):
    (ks_home / "records.json").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _call()
        config_store.clear_cache()
        _call()
    messages = _records_warnings(caught)
    assert len(messages) == 1 and "is a directory" in messages[0]
    with pytest.raises(kernelsearch.UsageError, match="records.json is a directory"):
        _record({"lowering": "materialized"})
    assert sorted(p.name for p in ks_home.iterdir()) == ["records.json", "records.json.lock"]   # no temp file


def test_tune_with_a_directory_named_records_json_is_a_usage_error_before_any_trial(ks_home, capsys):
    from kernelsearch import cli

    (ks_home / "records.json").mkdir()
    assert cli.main(["tune", "specs/softmax.yaml", "--target", "cpu", "--trials", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "records.json is a directory" in err and "Traceback" not in err
    assert not [p for p in ks_home.rglob("*") if p.name.startswith(".records-")]
    assert not (ks_home / "tune.db").exists()   # refused before the study was created


@pytest.mark.parametrize("config, needle", [({"lowering": "chunked", "CHUNK_N": -5}, "CHUNK_N=-5"),
                                            ({"lowering": "chunked", "CHUNK_NN": 64}, "unknown knob 'CHUNK_NN'"),
                                            ({"BLOCK_M": 64}, "unknown knob 'BLOCK_M'")])
def test_an_invalid_config_in_a_record_is_reported_and_skipped(ks_home, config, needle):
    """Issue 12: the same bad config in the records file silently changed what a plain load returned."""
    _record(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attn = _call()
        _call()
    assert attn.last_config == _untuned_default()
    messages = _records_warnings(caught)
    assert len(messages) == 1 and needle in messages[0] and "ignored" in messages[0], messages
    assert (ks_home / "records.json").exists()   # the file itself is fine: kept as it is


def _write_many(home: str, worker: int) -> None:
    import os

    os.environ["KERNELSEARCH_HOME"] = home
    for n in range(5):
        config_store.record(f"spec{worker}", "torch", "cpu:test", f"D{n}-I1-J1-BH1", "float32", "fwd",
                            {"lowering": "materialized"})


def test_concurrent_writers_lose_no_record(ks_home):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(ks_home), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    data = json.loads((ks_home / "records.json").read_text())
    assert len(data["records"]) == 20
    assert not [p for p in Path(ks_home).iterdir() if p.name.startswith(".records-")]
