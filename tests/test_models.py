"""End-to-end tests of the five seed LMs (kernelsearch/models), at tiny sizes on the CPU."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from einops import rearrange

import kernelsearch
from kernelsearch.errors import UsageError
from kernelsearch.models import FAMILY_NAMES, ModelConfig, TrainConfig, build_model, resolve_model
from kernelsearch.models import cli as lm_cli
from kernelsearch.models import data as lm_data
from kernelsearch.models import train as lm_train
from kernelsearch.models.config import NATIVE_SPECS, load_model_config, models_dir, repo_root
from kernelsearch.models.memory_efficient import MemoryEfficientLM
from kernelsearch.models.talking_heads import calc_stream_loss
from kernelsearch.nn import Attention as AttentionModule

ROOT = repo_root()
SPECS = ROOT / "specs"
# the backend the model tests train with: the generated torch code
BACKEND = "torch"

# tiny models: every family trains a few hundred steps in seconds on two CPU cores
TINY = dict(dim=32, depth=2, heads=2, dim_head=16, max_seq_len=64)
TINY_FAMILY = {
    "mesh_tf": {},
    "cosine_sim": {},
    "memory_efficient": dict(ff_chunks=2),
    "local": dict(local_attn_window_size=16, use_dynamic_pos_bias=True, gate_values_per_head=True),
    "talking_heads": dict(num_streams=2),
}
TINY_TRAIN = dict(batch_size=8, seq_len=64, lr=3e-3, eval_batches=2, sample_len=16,
                  corpus_bytes=1_000_000)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models are dispatch-bound: one thread is as fast and does not fight other processes
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ helpers

def tiny_config(family: str, **model) -> ModelConfig:
    return ModelConfig(family=family, spec=str(SPECS / NATIVE_SPECS[family]),
                       model={**TINY, **TINY_FAMILY[family], **model},
                       train=TrainConfig(**TINY_TRAIN))


@pytest.fixture(scope="module")
def corpus():
    return lm_data.load_corpus(TINY_TRAIN["corpus_bytes"])


def batch(corpus, seed=0, b=4, n=32):
    return lm_data.get_batch(corpus.train, b, n, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- data

def test_corpus_is_deterministic_and_split_by_file(corpus):
    again = lm_data.load_corpus.__wrapped__(TINY_TRAIN["corpus_bytes"])
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.train.dtype == torch.uint8 and corpus.n_files > 10
    assert 0 < corpus.val.numel() < corpus.train.numel()
    files = lm_data.stdlib_files()
    assert [r for r, _ in files] == sorted(r for r, _ in files)
    assert not any("site-packages" in r for r, _ in files)
    text = lm_data.decode(corpus.train[:2000])
    assert "import" in text or "def " in text
    b1 = lm_data.get_batch(corpus.train, 3, 20, torch.Generator().manual_seed(5))
    b2 = lm_data.get_batch(corpus.train, 3, 20, torch.Generator().manual_seed(5))
    assert b1.shape == (3, 21) and torch.equal(b1, b2) and int(b1.max()) < 256


# ------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_forward_backward_shapes(family, corpus):
    torch.manual_seed(0)
    model = build_model(tiny_config(family), backend=BACKEND)
    x = batch(corpus)
    logits = model(x[:, :-1])
    assert logits.shape == (4, 32, 256)
    loss, parts = model.loss(x)
    assert math.isfinite(float(loss.detach())) and 4.0 < float(parts["ce"]) < 8.0   # ~ln 256 at init
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_causal(family, corpus):
    """Changing a later token never changes earlier logits (the model is an LM)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(family), backend=BACKEND).eval()
    x = batch(corpus)[:, :40]
    y = x.clone()
    y[:, 30:] = (y[:, 30:] + 7) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :30], model(y)[:, :30])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_loss_falls(family, corpus):
    cfg = tiny_config(family)
    model = lm_train.make_model(cfg, BACKEND, seed=0)
    opt = lm_train.make_optimizer(model, cfg.train.lr)
    losses = lm_train.train_steps(model, opt, corpus, cfg, 60,
                                  generator=torch.Generator().manual_seed(0), progress=False)
    start, end = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert end < 0.7 * start, (family, start, end)
    val = lm_train.evaluate(model, corpus, cfg)
    assert val < 0.75 * start


@pytest.mark.parametrize("variant", [dict(use_dynamic_pos_bias=False),
                                     dict(use_dynamic_pos_bias=False, use_xpos=True),
                                     dict(qk_rmsnorm=True, gate_values_per_head=False)])
def test_local_variants(variant, corpus):
    torch.manual_seed(0)
    model = build_model(tiny_config("local", **variant), backend=BACKEND)
    p = model.resolved_attn_params
    assert p["rotary"] is (not model.dynamic_pos_bias)
    assert p["xpos"] is bool(variant.get("use_xpos")) and p["window_size"] == 16
    if variant.get("qk_rmsnorm"):       # fused into the spec; the scales are the layer's learned inputs
        assert p["qk_rmsnorm"] is True and p["scale"] == 8.0
        learned = model.layers[0][0].learned
        assert {n: tuple(t.shape) for n, t in learned.items()} == {"q_scale": (16,), "k_scale": (16,)}
    else:
        assert "qk_rmsnorm" not in p and len(model.layers[0][0].learned) == 0
    loss, _ = model.loss(batch(corpus))
    loss.backward()
    assert math.isfinite(float(loss.detach()))


def test_local_table_covers_every_distance():
    torch.manual_seed(0)
    model = build_model(tiny_config("local"), backend=BACKEND)
    table = model.dynamic_pos_bias(48)
    assert table.shape == (2, 48)


def test_seed_params_only_with_the_native_spec():
    torch.manual_seed(0)
    mesh = build_model(tiny_config("mesh_tf"), backend=BACKEND)
    assert mesh.resolved_attn_params == {"causal": True, "scale": 1.0}
    th = build_model(tiny_config("talking_heads"), backend=BACKEND)
    assert th.resolved_attn_params["scale"] == 4.0 and th.resolved_attn_params["num_streams"] == 2
    foreign = ModelConfig(family="mesh_tf", spec=str(SPECS / "cosine_sim.yaml"), model=TINY)
    assert build_model(foreign, backend=BACKEND).resolved_attn_params == {"causal": True}


# where each family keeps a layer's attention block (the seeds' module layout)
ATTENTION_BLOCK = {
    "mesh_tf": lambda model, layer: model.layers[layer][1],
    "cosine_sim": lambda model, layer: model.layers[layer][0],
    "memory_efficient": lambda model, layer: model.net.blocks[layer].f.fn,
    "local": lambda model, layer: model.layers[layer][0],
    "talking_heads": lambda model, layer: model.layers[layer][0],
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_blocks_are_kernelsearch_nn_attention(family):
    """Every layer's attention block is a kernelsearch.nn.Attention on the model's spec and params,
    all layers share one compiled attention, and the spec's learned inputs are the block's parameters."""
    torch.manual_seed(0)
    model = build_model(tiny_config(family), backend=BACKEND)
    blocks = [ATTENTION_BLOCK[family](model, layer) for layer in range(TINY["depth"])]
    assert all(isinstance(block, AttentionModule) for block in blocks)
    assert model.attention_layers() == blocks                   # no other attention in the model
    attention = blocks[0].attention
    assert all(block.attention is attention for block in blocks)
    assert Path(attention.spec.path).name == NATIVE_SPECS[family]
    assert attention.overrides == model.resolved_attn_params and attention.backend == BACKEND
    assert (blocks[0].heads, blocks[0].dim_head) == (TINY["heads"], TINY["dim_head"])
    learned = {"talking_heads": ["pre_mix", "post_mix"]}.get(family, [])
    assert all(list(block.learned.keys()) == learned for block in blocks)
    state = model.state_dict()
    for layer, block in enumerate(blocks):
        for name, weight in block.learned.items():
            assert torch.equal(weight, torch.eye(4))             # [(s h), (s h)] identity, s = 2, h = 2
            assert torch.equal(state[f"layers.{layer}.0.learned.{name}"], weight)


# ------------------------------------------------------------------------------- reversibility

def _pair(**kw):
    torch.manual_seed(0)
    cfg = tiny_config("memory_efficient", **kw)
    rev = build_model(cfg, backend=BACKEND)
    cfg.model["reversible"] = False
    plain = build_model(cfg, backend=BACKEND)
    plain.load_state_dict(rev.state_dict())
    return rev, plain


def test_reversible_gradients_equal_plain_stack(corpus):
    rev, plain = _pair(depth=3)
    x = batch(corpus)
    l_rev, _ = rev.loss(x)
    l_plain, _ = plain.loss(x)
    l_rev.backward()
    l_plain.backward()
    torch.testing.assert_close(l_rev, l_plain)
    for (name, a), b in zip(rev.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    # torch.autograd.grad sees the parameters too (they are inputs of the Function)
    g = torch.autograd.grad(rev.loss(x)[0], [rev.net.blocks[0].f.fn.to_q.weight])[0]
    torch.testing.assert_close(g, plain.net.blocks[0].f.fn.to_q.weight.grad, rtol=1e-4, atol=1e-5)


def saved_activation_bytes(model, x) -> int:
    """Bytes of the distinct tensors autograd keeps for backward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(x)
    loss.backward()
    return sum(seen.values())


def test_reversible_stack_saves_activation_memory(corpus):
    x = batch(corpus, b=4, n=64)
    shallow = [saved_activation_bytes(m, x) for m in _pair(depth=2)]
    deep = [saved_activation_bytes(m, x) for m in _pair(depth=6)]
    rev_growth, plain_growth = deep[0] - shallow[0], deep[1] - shallow[1]
    assert plain_growth > 0
    assert rev_growth <= 0.05 * plain_growth, (shallow, deep)   # depth costs the reversible stack ~nothing
    assert deep[0] < 0.5 * deep[1]


def test_chunked_feed_forward_is_the_same_function(corpus):
    torch.manual_seed(0)
    a = build_model(tiny_config("memory_efficient", ff_chunks=1), backend=BACKEND)
    b = build_model(tiny_config("memory_efficient", ff_chunks=4), backend=BACKEND)
    b.load_state_dict(a.state_dict())
    x = batch(corpus)[:, :-1]
    torch.testing.assert_close(a(x), b(x))


# ------------------------------------------------------------------------------- talking heads

def test_stream_diversity_loss_through_the_attention(corpus):
    torch.manual_seed(0)
    model = build_model(tiny_config("talking_heads", stream_diversity_weight=0.5), backend=BACKEND)
    layer = model.layers[0][0]
    pre_mix = layer.learned["pre_mix"]
    with torch.no_grad():
        pre_mix.add_(0.1 * torch.randn_like(pre_mix))
    x = model.emb(batch(corpus)[:, :20])
    xn = layer.rmsnorm(x)
    q, k, _ = rearrange(layer.to_qkv(xn), "b n (qkv h d) -> qkv b h n d", qkv=3, h=2)
    p = layer.probabilities(q, k)
    # by hand: (q * sqrt(d))·k, mix logits across the (s h) heads of a sample, causal softmax
    s, h, n = 2, 2, 20
    sim = torch.einsum("bhid,bhjd->bhij", q * 4.0, k).reshape(-1, s * h, n, n)
    sim = torch.einsum("oc,bcij->boij", pre_mix, sim).reshape(-1, h, n, n)
    sim = sim.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.finfo(sim.dtype).max)
    torch.testing.assert_close(p, sim.softmax(-1), rtol=1e-4, atol=1e-5)
    logits, aux = model.forward_with_aux(batch(corpus)[:, :20])
    assert aux is not None and float(aux.detach()) < 0
    aux.backward()
    assert pre_mix.grad is not None and pre_mix.grad.abs().sum() > 0


def test_calc_stream_loss_matches_definition():
    torch.manual_seed(0)
    attn = torch.randn(2 * 3, 2, 5, 7).softmax(-1)            # b=2, s=3, h=2
    a = attn.reshape(2, 3, 2, 5, 7)
    ref = []
    for h0 in range(2):
        for h1 in range(2):
            for h2 in range(2):
                m = (a[:, 0, h0] + a[:, 1, h1] + a[:, 2, h2]) / 3
                ref.append((m * m.log()).sum(-1))
    torch.testing.assert_close(calc_stream_loss(attn, 3), torch.stack(ref, 1))


# -------------------------------------------------------------------------- sampling, checkpoints

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sampling(family, corpus):
    torch.manual_seed(0)
    model = build_model(tiny_config(family), backend=BACKEND)
    prime = batch(corpus, n=60)[:2, :60]
    # 8 tokens after 60: past max_seq_len (64), the context window slides
    out = model.generate(prime, 8, generator=torch.Generator().manual_seed(3))
    again = model.generate(prime, 8, generator=torch.Generator().manual_seed(3))
    assert out.shape == (2, 8) and out.dtype == torch.long
    assert torch.equal(out, again) and int(out.min()) >= 0 and int(out.max()) < 256
    assert model.training      # generate restores the mode


@pytest.mark.parametrize("family", ["local", "talking_heads"])
def test_checkpoint_round_trip(family, corpus, tmp_path):
    cfg = tiny_config(family)
    model = lm_train.make_model(cfg, BACKEND, seed=0)
    opt = lm_train.make_optimizer(model, cfg.train.lr)
    losses = lm_train.train_steps(model, opt, corpus, cfg, 3,
                                  generator=torch.Generator().manual_seed(0), progress=False)
    path = tmp_path / "lm.pt"
    lm_train.save_checkpoint(path, model, cfg, opt, 3, losses, BACKEND)
    again, cfg2, ckpt = lm_train.load_checkpoint(path)
    assert cfg2.to_dict() == cfg.to_dict() and ckpt["step"] == 3 and ckpt["losses"] == losses
    x = batch(corpus)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x), rtol=0, atol=0)
    # training continues identically from the checkpoint
    opt2 = lm_train.make_optimizer(again, cfg.train.lr)
    opt2.load_state_dict(ckpt["optimizer"])
    a = lm_train.train_steps(model, opt, corpus, cfg, 2, generator=torch.Generator().manual_seed(9), progress=False)
    b = lm_train.train_steps(again, opt2, corpus, cfg, 2, generator=torch.Generator().manual_seed(9), progress=False)
    assert a == b


@pytest.mark.parametrize("family,extra", [("talking_heads", {}),
                                          ("local", dict(qk_rmsnorm=True, use_dynamic_pos_bias=False))])
def test_checkpoints_with_the_learned_inputs_outside_learned_still_load(family, extra, corpus, tmp_path):
    """Before the layers were kernelsearch.nn.Attention modules, their learned inputs were their own
    parameters (``layers.0.0.pre_mix``, now ``layers.0.0.learned.pre_mix``): such a checkpoint loads,
    in the same parameter order, so its optimizer state resumes training identically."""
    cfg = tiny_config(family, **extra)
    model = lm_train.make_model(cfg, BACKEND, seed=0)
    opt = lm_train.make_optimizer(model, cfg.train.lr)
    losses = lm_train.train_steps(model, opt, corpus, cfg, 2, generator=torch.Generator().manual_seed(0),
                                  progress=False)
    path = tmp_path / "old.pt"
    lm_train.save_checkpoint(path, model, cfg, opt, 2, losses, BACKEND)
    ckpt = torch.load(path, weights_only=True)
    old = {key.replace(".learned.", "."): t for key, t in ckpt["state_dict"].items()}
    assert len(set(old) - set(ckpt["state_dict"])) == 2 * TINY["depth"]     # two learned inputs per layer
    torch.save({**ckpt, "state_dict": old}, path)
    again, _, ckpt = lm_train.load_checkpoint(path)
    x = batch(corpus)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    opt2 = lm_train.make_optimizer(again, cfg.train.lr)
    opt2.load_state_dict(ckpt["optimizer"])
    a = lm_train.train_steps(model, opt, corpus, cfg, 2, generator=torch.Generator().manual_seed(9), progress=False)
    b = lm_train.train_steps(again, opt2, corpus, cfg, 2, generator=torch.Generator().manual_seed(9), progress=False)
    assert a == b


def test_bad_checkpoint_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        lm_train.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UsageError):
        lm_train.load_checkpoint(tmp_path / "junk.pt")


# ----------------------------------------------------------------------- backends step by step

def _steps(family, backend, n_steps, corpus, dtype=torch.float32):
    cfg = tiny_config(family)
    cfg.train.batch_size, cfg.train.seq_len = 2, 32
    model = lm_train.make_model(cfg, backend, seed=0).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return lm_train.train_steps(model, opt, corpus, cfg, n_steps,
                                generator=torch.Generator().manual_seed(0), progress=False)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_torch_and_reference_backends_agree_step_by_step(family, corpus):
    ref = _steps(family, "reference", 4, corpus)
    tor = _steps(family, "torch", 4, corpus)
    assert len(set(ref)) == len(ref)       # the steps really move the model
    torch.testing.assert_close(torch.tensor(tor), torch.tensor(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mesh_tf", "local", "talking_heads"])
def test_chunked_torch_lowering_agrees_step_by_step(family, corpus, monkeypatch):
    """The online-softmax (chunked) lowering trains like the reference too (2 key chunks)."""
    from kernelsearch.models import attention as lm_attention
    real = lm_attention.make_attention

    def chunked(spec, backend="auto", **params):
        if backend != "torch":
            return real(spec, backend, **params)
        return kernelsearch.load(str(spec), backend="torch",
                                 config={"lowering": "chunked", "CHUNK_N": 16, "CHUNK_M": 16}, **params)
    monkeypatch.setattr(lm_attention, "make_attention", chunked)
    ref = _steps(family, "reference", 3, corpus)
    tor = _steps(family, "torch", 3, corpus)
    torch.testing.assert_close(torch.tensor(tor), torch.tensor(ref), rtol=1e-4, atol=1e-5)


def _has_triton_backend() -> bool:
    try:
        from kernelsearch.backends import triton_backend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_triton_backend(), reason="no triton backend")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_triton_and_reference_backends_agree_step_by_step(family, corpus, monkeypatch):
    """Training through the triton kernels (Triton's interpreter on the CPU): same losses, step by step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = tiny_config(family, max_seq_len=32)
    cfg.train.batch_size, cfg.train.seq_len = 1, 32
    losses = {}
    for backend in ("reference", "triton"):
        model = lm_train.make_model(cfg, backend, seed=0, device=device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        losses[backend] = lm_train.train_steps(model, opt, corpus, cfg, 2, device=device,
                                               generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]),
                               rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not _has_triton_backend(), reason="no triton backend")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_triton_forward_matches_reference(family, corpus, monkeypatch):
    """Inference through the triton kernels: same logits as the reference (tiny, no grad)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = tiny_config(family, max_seq_len=32)
    x = batch(corpus, b=1, n=32)[:, :-1].to(device)
    logits = {}
    for backend in ("reference", "triton"):
        model = lm_train.make_model(cfg, backend, seed=0, device=device).eval()
        with torch.no_grad():
            logits[backend] = model(x)
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------- model specs and CLI

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_model_specs_load(family):
    cfg = load_model_config(models_dir() / f"{family}.yaml")
    assert cfg.family == family and Path(cfg.spec).name == NATIVE_SPECS[family]
    assert Path(cfg.spec).is_file()
    assert resolve_model(None, SPECS / NATIVE_SPECS[family]).family == family


def test_model_spec_errors(tmp_path):
    bad = tmp_path / "m.yaml"
    for text, match in [("family: gpt5\n", "family"), ("family: local\nmodel: {dimm: 3}\n", "dimm"),
                        ("family: local\ntrain: {stepz: 3}\n", "stepz"), ("[1, 2\n", "YAML"),
                        ("family: local\nextra: 1\n", "extra")]:
        bad.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_model_config(bad)
    with pytest.raises(UsageError, match="neither"):
        resolve_model("nonsense", SPECS / "softmax.yaml")
    with pytest.raises(UsageError, match="not found"):
        resolve_model("mesh_tf", tmp_path / "missing.yaml")


def _cli(argv):
    parser = argparse.ArgumentParser(prog="kernelsearch")
    lm_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def _tiny_model_yaml(tmp_path, family="local"):
    path = tmp_path / f"{family}.yaml"
    model = {**TINY, **TINY_FAMILY[family]}
    path.write_text(json.dumps({"family": family, "attention": {"spec": str(SPECS / NATIVE_SPECS[family])},
                                "model": model, "train": TINY_TRAIN}))
    return path


def test_cli_json_plot_checkpoint(tmp_path, capsys):
    m = _tiny_model_yaml(tmp_path)
    rc = _cli(["lm", str(SPECS / "local.yaml"), "--model", str(m), "--steps", "3", "--backend",
               BACKEND, "--json", "--plot", str(tmp_path / "loss.png"),
               "--checkpoint", str(tmp_path / "lm.pt"), "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["losses"]) == 3 and math.isfinite(out["val_loss"]) and isinstance(out["sample"], str)
    assert len(out["sample"].encode("utf-8", "surrogatepass")) >= 1
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "lm.pt").is_file()
    rc = _cli(["lm", str(SPECS / "local.yaml"), "--model", str(m), "--steps", "2", "--backend",
               BACKEND, "--resume", str(tmp_path / "lm.pt"), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "val loss" in text and "sample" in text


@pytest.mark.parametrize("argv,match", [
    (["--steps", "-1"], "--steps"),
    (["--model", "nonsense"], "neither"),
    (["--seq-len", "0"], "--seq-len"),
])
def test_cli_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        _cli(["lm", str(SPECS / "local.yaml"), *argv])


def test_cli_missing_spec(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        _cli(["lm", str(tmp_path / "nope.yaml"), "--model", "mesh_tf"])


# --------------------------------------------------- against the upstream libraries (optional)
# Run when the seed libraries are importable (e.g. `pip install local-attention==1.9.1
# memory-efficient-attention-pytorch==0.1.6 quartic-transformer==0.0.18 einx==0.3.0 einops
# frozendict` into a scratch directory on PYTHONPATH); skipped otherwise. Same weights in both,
# float64, our models on the reference backend: logits (and gradients) must agree.

def _upstream(module: str):
    import importlib
    import importlib.util
    try:
        if module == "quartic_transformer.multi_stream_transformer":
            # the package __init__ pulls in unrelated dependencies; load the one file
            pkg = importlib.util.find_spec("quartic_transformer")
            if pkg is None:
                raise ImportError(module)
            path = Path(pkg.submodule_search_locations[0]) / "multi_stream_transformer.py"
            spec = importlib.util.spec_from_file_location("_upstream_mst", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"upstream {module} not importable: {type(e).__name__}: {e}")


def _load_from_upstream(mine, upstream, rename):
    ours = dict(mine.named_parameters())
    state = {}
    for name, p in upstream.named_parameters():
        new = rename(name)
        assert new in ours, (name, new)
        state[new] = p.detach().reshape(ours[new].shape)
    assert set(state) == set(ours), set(ours) - set(state)
    mine.load_state_dict(state, strict=False)


def _local_rename(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers" and parts[2] == "0" and parts[3] in ("q_scale", "k_scale"):
        return ".".join(parts[:3] + ["learned", parts[3]])           # the spec's learned inputs
    if parts[0] == "layers" and parts[2] == "0" and parts[3] == "to_v_gate":
        return ".".join(parts[:4] + parts[5:])                     # to_v_gate.0.w -> to_v_gate.w
    if parts[0] == "layers" and parts[2] == "1" and parts[3] == "4":
        return ".".join(parts[:3] + ["3"] + parts[4:])              # no Dropout in our FF
    return name


@pytest.mark.parametrize("variant", [
    dict(use_dynamic_pos_bias=True, gate_values_per_head=True),
    dict(use_dynamic_pos_bias=False, use_xpos=True),
    dict(use_dynamic_pos_bias=False, qk_rmsnorm=True, gate_values_per_head=True),
])
@pytest.mark.parametrize("n", [64, 50])
def test_local_lm_matches_upstream(variant, n):
    up = _upstream("local_attention")
    torch.manual_seed(0)
    # upstream's position-bias MLP is float32 only
    dtype, tol = (torch.float32, 2e-5) if variant.get("use_dynamic_pos_bias") else (torch.float64, 1e-7)
    theirs = up.LocalTransformer(num_tokens=256, max_seq_len=64, dim=32, depth=2, causal=True,
                                 local_attn_window_size=16, dim_head=16, heads=2, **variant).to(dtype)
    mine = build_model(tiny_config("local", **{"gate_values_per_head": False, **variant}),
                       backend="reference").to(dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))    # move q_scale/k_scale etc. off their init
    _load_from_upstream(mine, theirs, _local_rename)
    x = torch.randint(0, 256, (2, n))
    torch.testing.assert_close(mine(x), theirs(x), rtol=tol, atol=tol)


def _memeff_rename(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        return ".".join(["net", "blocks", parts[1], "f" if parts[2] == "0" else "g"] + parts[3:])
    return name


def test_memory_efficient_lm_matches_upstream_with_gradients():
    up = _upstream("memory_efficient_attention_pytorch.transformer")
    torch.manual_seed(0)
    # upstream's flash attention is float32 only
    theirs = up.Transformer(num_tokens=256, max_seq_len=64, dim=32, depth=3, causal=True,
                            dim_head=16, heads=2, ff_chunks=2, q_bucket_size=8, k_bucket_size=8)
    mine = build_model(tiny_config("memory_efficient", depth=3), backend="reference")
    _load_from_upstream(mine, theirs, _memeff_rename)
    x = torch.randint(0, 256, (2, 33))
    torch.testing.assert_close(mine(x[:, :-1]), theirs(x[:, :-1]), rtol=2e-5, atol=2e-5)
    mine.loss(x)[0].backward()
    torch.nn.functional.cross_entropy(theirs(x[:, :-1]).transpose(1, 2), x[:, 1:]).backward()
    ours = dict(mine.named_parameters())
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours[_memeff_rename(name)].grad, p.grad, rtol=1e-4, atol=1e-6)


def _quartic_rename(name: str) -> str:
    table = {"to_qkv.0.weight": "to_qkv.weight", "to_gates.0.weight": "to_gates.weight",
             "to_gates.0.bias": "to_gates.bias", "pre_talking_heads.weight": "learned.pre_mix",
             "post_talking_heads.weight": "learned.post_mix", "to_out.1.weight": "to_out.weight",
             "1.4.weight": "1.3.weight"}
    if name.startswith("to_logits.1"):
        return "final_norm.scale"
    if name.startswith("to_logits.2"):
        return "to_logits.weight"
    for old, new in table.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def test_talking_heads_lm_matches_upstream():
    up = _upstream("quartic_transformer.multi_stream_transformer")
    torch.manual_seed(0)
    theirs = up.MultiStreamTransformer(dim=32, num_tokens=256, depth=2, num_streams=2, dim_head=16,
                                       heads=2, max_seq_len=64, separate_stream_emb=False).double()
    for attn, _ in theirs.layers:
        attn.causal = True           # upstream's LM never sets it; ours is an LM
    x = torch.randint(0, 256, (2, 20))
    theirs(x)                        # einx norms create their parameters on the first call
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))     # non-identity mixing, non-unit norms
    mine = build_model(tiny_config("talking_heads", stream_diversity_weight=1.0),
                       backend="reference").double()
    _load_from_upstream(mine, theirs, _quartic_rename)
    torch.testing.assert_close(mine(x), theirs(x), rtol=1e-7, atol=1e-7)
    # the auxiliary loss, with upstream's entropy helper taking a real log
    up.log = lambda t, eps=1e-20: torch.log(t.clamp(min=eps))
    _, aux_theirs = theirs(x, stream_attn_diversity_loss=True)
    _, aux_mine = mine.forward_with_aux(x)
    torch.testing.assert_close(aux_mine, aux_theirs, rtol=1e-6, atol=1e-8)
