"""Model specs: a small YAML file that picks an LM family and its hyperparameters.

    # specs/models/local.yaml
    family: local                    # mesh_tf | cosine_sim | memory_efficient | local | talking_heads
    attention:
      spec: ../local.yaml            # the attention spec, relative to this file
      params: {}                     # extra kernelsearch.load params (override the model's)
    model:                           # keyword arguments of the family's LM class
      dim: 128
      depth: 2
      local_attn_window_size: 32
      use_dynamic_pos_bias: true
    train:                           # defaults of `kernelsearch lm` (flags override them)
      steps: 300
      batch_size: 16
      seq_len: 128
      lr: 1.0e-3

Every section but ``family`` is optional. ``kernelsearch lm SPEC --model X`` takes X as a family
name (its file ``specs/models/<family>.yaml`` next to the specs, or the built-in defaults) or a
path to such a file; SPEC replaces ``attention.spec``, and when SPEC is a different file than
``attention.spec`` the file's ``attention.params`` are dropped (they were chosen for the other
spec). Unknown keys are errors. ``max_seq_len`` defaults to the training ``seq_len``.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import UsageError

FAMILY_NAMES = ("mesh_tf", "cosine_sim", "memory_efficient", "local", "talking_heads")
# the attention spec each family's seed library used (file names under specs/)
NATIVE_SPECS = {"mesh_tf": "softmax.yaml", "cosine_sim": "cosine_sim.yaml",
                "memory_efficient": "memory_efficient.yaml", "local": "local.yaml",
                "talking_heads": "talking_heads.yaml"}
SECTIONS = ("family", "attention", "model", "train")


def family_class(name: str):
    from . import cosine_sim, local, memory_efficient, mesh_tf, talking_heads
    classes = {"mesh_tf": mesh_tf.MeshTFLM, "cosine_sim": cosine_sim.CosineSimLM,
               "memory_efficient": memory_efficient.MemoryEfficientLM, "local": local.LocalLM,
               "talking_heads": talking_heads.TalkingHeadsLM}
    if name not in classes:
        raise UsageError(f"unknown model family {name!r}; choose one of {', '.join(FAMILY_NAMES)}")
    return classes[name]


def family_hyperparameters(name: str) -> dict:
    """The family's model hyperparameters and their defaults."""
    sig = inspect.signature(family_class(name).__init__)
    return {k: p.default for k, p in sig.parameters.items()
            if k not in ("self", "spec", "backend", "attn_params")}


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    grad_clip: float = 0.5
    eval_batches: int = 8
    sample_len: int = 200
    filter_thres: float = 0.9
    temperature: float = 1.0
    corpus_bytes: int = 8_000_000


@dataclass
class ModelConfig:
    family: str
    spec: str                                   # attention spec path
    attn_params: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str | None = None                   # the model YAML it came from

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)

    def model_kwargs(self) -> dict:
        kw = dict(self.model)
        kw.setdefault("max_seq_len", self.train.seq_len)
        return kw


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def models_dir() -> Path:
    return repo_root() / "specs" / "models"


def family_for_spec(spec: str | Path) -> str | None:
    name = Path(spec).name
    for fam, native in NATIVE_SPECS.items():
        if native == name:
            return fam
    return None


def _check_keys(what: str, given: dict, allowed, where: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise UsageError(f"{where}: unknown {what} {', '.join(map(repr, unknown))}; "
                         f"expected one of {', '.join(sorted(allowed))}")


def parse_model_config(data, where: str, base: Path | None = None) -> ModelConfig:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a model spec must be a mapping with a 'family' key")
    _check_keys("section", data, SECTIONS, where)
    family = data.get("family")
    if family not in FAMILY_NAMES:
        raise UsageError(f"{where}: 'family' must be one of {', '.join(FAMILY_NAMES)}, not {family!r}")
    attention = data.get("attention") or {}
    if not isinstance(attention, dict):
        raise UsageError(f"{where}: 'attention' must be a mapping with 'spec' and 'params'")
    _check_keys("attention key", attention, ("spec", "params"), where)
    spec = attention.get("spec")
    if spec is None:
        spec = str(repo_root() / "specs" / NATIVE_SPECS[family])
    elif base is not None and not Path(spec).is_absolute():
        spec = str((base / spec).resolve())
    params = attention.get("params") or {}
    model = data.get("model") or {}
    train = data.get("train") or {}
    for name, sec in (("attention.params", params), ("model", model), ("train", train)):
        if not isinstance(sec, dict):
            raise UsageError(f"{where}: '{name}' must be a mapping")
    _check_keys(f"{family} hyperparameter", model, family_hyperparameters(family), where)
    _check_keys("train setting", train, [f.name for f in fields(TrainConfig)], where)
    return ModelConfig(family=family, spec=str(spec), attn_params=dict(params), model=dict(model),
                       train=TrainConfig(**train), source=where)


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model spec {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {e}") from None
    return parse_model_config(data, str(path), base=path.parent)


def resolve_model(model: str | None, spec: str | Path | None) -> ModelConfig:
    """The config for ``kernelsearch lm SPEC --model MODEL``.

    MODEL: a family name, a model YAML path, or None (the family whose seed spec SPEC is;
    mesh_tf for any other spec). SPEC, when given, replaces the config's attention spec.
    """
    if model is None:
        model = family_for_spec(spec) if spec is not None else None
        model = model or "mesh_tf"
    if model in FAMILY_NAMES:
        path = models_dir() / f"{model}.yaml"
        cfg = load_model_config(path) if path.is_file() else \
            parse_model_config({"family": model}, f"<built-in {model}>")
    elif model.endswith((".yaml", ".yml")) or Path(model).exists():
        cfg = load_model_config(model)
    else:
        raise UsageError(f"--model {model!r} is neither a family ({', '.join(FAMILY_NAMES)}) "
                         f"nor a model spec file")
    if spec is not None:
        spec = Path(spec)
        if not spec.is_file():
            raise UsageError(f"attention spec {str(spec)!r} not found")
        if spec.resolve() != Path(cfg.spec).resolve():
            cfg.attn_params = {}
        cfg.spec = str(spec)
    return cfg


def build_model(cfg: ModelConfig, backend: str = "auto"):
    """The family's LM for this config; fixes ``cfg.model["max_seq_len"]`` if it was implied."""
    cls = family_class(cfg.family)
    cfg.model = cfg.model_kwargs()
    model = cls(spec=cfg.spec, backend=backend, attn_params=cfg.attn_params, **cfg.model)
    model.token_input_rules()       # a spec input the family cannot make is refused now, not mid-training
    return model
