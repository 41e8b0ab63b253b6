"""Training, validation, sampling and checkpoints for the seed LMs.

A run is deterministic given (config, backend, seed, device): the model is initialised after
``torch.manual_seed(seed)``, training batches come from a generator seeded with ``seed``,
validation batches from one seeded with a fixed constant (the same windows for every run), and
the sampling prime and draws from one seeded with ``seed + 1``.

Checkpoints are ``torch.save`` dicts holding only plain data and tensors (``weights_only``
loadable): the model config, the state dict, the optimizer state, the step and the losses.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from . import data as _data
from .config import ModelConfig, build_model

CHECKPOINT_FORMAT = "kernelsearch-lm/1"
VAL_SEED = 1234
PRIME_LEN = 32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_model(cfg: ModelConfig, backend: str = "auto", seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    return build_model(cfg, backend).to(device)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def train_steps(model, optimizer, corpus: _data.Corpus, cfg: ModelConfig, steps: int, *,
                generator: torch.Generator, device: str = "cpu", progress: bool | None = None,
                desc: str = "train") -> list[float]:
    """``steps`` optimizer steps on random training windows; returns each step's loss."""
    from tqdm.auto import tqdm
    t = cfg.train
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=(not progress) if progress is not None else None,
               dynamic_ncols=True, leave=False)
    for _ in bar:
        batch = _data.get_batch(corpus.train, t.batch_size, t.seq_len, generator, device)
        loss, parts = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip and t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(f"loss became {value} at step {len(losses)}")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    return losses


@torch.no_grad()
def evaluate(model, corpus: _data.Corpus, cfg: ModelConfig, device: str = "cpu",
             split: str = "val") -> float:
    """Mean cross entropy (nats/byte) over ``eval_batches`` fixed windows of the split."""
    t = cfg.train
    g = torch.Generator().manual_seed(VAL_SEED)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(t.eval_batches):
        batch = _data.get_batch(corpus.split(split), t.batch_size, t.seq_len, g, device)
        total += float(model.loss(batch)[1]["ce"])
    model.train(was_training)
    return total / max(1, t.eval_batches)


def sample_text(model, corpus: _data.Corpus, cfg: ModelConfig, seed: int = 0,
                device: str = "cpu", length: int | None = None) -> tuple[str, str]:
    """(prime, continuation): a validation prime and ``sample_len`` top-k sampled bytes."""
    t = cfg.train
    g = torch.Generator().manual_seed(seed + 1)
    prime = _data.get_batch(corpus.val, 1, PRIME_LEN - 1, g, "cpu")
    out = model.generate(prime.to(device), t.sample_len if length is None else length,
                         temperature=t.temperature, filter_thres=t.filter_thres,
                         generator=torch.Generator(device=device).manual_seed(seed + 1))
    return _data.decode(prime[0]), _data.decode(out[0].cpu())


def save_checkpoint(path, model, cfg: ModelConfig, optimizer=None, step: int = 0,
                    losses: list[float] | None = None, backend: str = "auto") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "backend": backend,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "losses": list(losses or []),
    }, path)


def load_checkpoint(path, backend: str | None = None, device: str = "cpu"):
    """-> (model, config, checkpoint dict). ``backend`` None: the one it was trained with."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the user's to fix
        raise UsageError(f"checkpoint {str(path)!r} cannot be read: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not a kernelsearch LM checkpoint")
    cfg = ModelConfig.from_dict(ckpt["config"])
    model = build_model(cfg, backend or ckpt.get("backend", "auto")).to(device)
    model.load_state_dict(ckpt["state_dict"])
    return model, cfg, ckpt


@dataclass
class RunResult:
    losses: list[float]
    val_loss: float
    sample: str
    prime: str
    family: str
    spec: str
    backend: str
    device: str
    steps: int
    seconds: float
    tokens_per_s: float
    initial_val_loss: float | None = None
    checkpoint: str | None = None
    attn_params: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"losses": self.losses, "val_loss": self.val_loss, "sample": self.sample,
                "prime": self.prime, "family": self.family, "spec": self.spec,
                "backend": self.backend, "device": self.device, "steps": self.steps,
                "seconds": round(self.seconds, 3), "tokens_per_s": round(self.tokens_per_s, 1),
                "checkpoint": self.checkpoint, "attn_params": self.attn_params}


def run(cfg: ModelConfig, *, backend: str = "auto", seed: int = 0, device: str | None = None,
        checkpoint: str | None = None, resume: str | None = None,
        progress: bool | None = None) -> RunResult:
    """Train ``cfg.train.steps`` steps, validate, save + reload a checkpoint, sample."""
    device = device or default_device()
    t = cfg.train
    corpus = _data.load_corpus(t.corpus_bytes)
    start_step, prior = 0, []
    if resume:
        model, cfg_r, ckpt = load_checkpoint(resume, backend, device)
        if cfg_r.family != cfg.family:
            raise UsageError(f"checkpoint {resume} is a {cfg_r.family} model, not {cfg.family}")
        cfg_r.train = cfg.train
        cfg = cfg_r
        optimizer = make_optimizer(model, t.lr)
        if ckpt.get("optimizer"):
            optimizer.load_state_dict(ckpt["optimizer"])
        start_step, prior = int(ckpt.get("step", 0)), list(ckpt.get("losses", []))
    else:
        model = make_model(cfg, backend, seed, device)
        optimizer = make_optimizer(model, t.lr)
    if t.seq_len > model.max_seq_len:
        raise UsageError(f"seq_len {t.seq_len} exceeds the model's max_seq_len {model.max_seq_len}")
    generator = torch.Generator().manual_seed(seed + start_step)
    t0 = time.perf_counter()
    losses = train_steps(model, optimizer, corpus, cfg, t.steps, generator=generator,
                         device=device, progress=progress, desc=f"{cfg.family}/{backend}")
    seconds = time.perf_counter() - t0
    val_loss = evaluate(model, corpus, cfg, device)
    if checkpoint:
        save_checkpoint(checkpoint, model, cfg, optimizer, start_step + t.steps, prior + losses,
                        backend)
        model, _, _ = load_checkpoint(checkpoint, backend, device)   # sample from the reloaded one
    prime, sample = sample_text(model, corpus, cfg, seed, device)
    tokens = t.steps * t.batch_size * t.seq_len
    return RunResult(losses=losses, val_loss=val_loss, sample=sample, prime=prime,
                     family=cfg.family, spec=cfg.spec, device=device,
                     backend=model.attn.backend,
                     steps=start_step + t.steps, seconds=seconds,
                     tokens_per_s=tokens / seconds if seconds > 0 else float("nan"),
                     checkpoint=str(checkpoint) if checkpoint else None,
                     attn_params=dict(getattr(model, "resolved_attn_params", {})))


def plot_losses(path, losses: list[float], val_loss: float | None = None, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, label="train loss", linewidth=1)
    if val_loss is not None and losses:
        ax.axhline(val_loss, color="tab:orange", linestyle="--", label=f"val loss {val_loss:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / byte)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
