"""``kernelsearch lm``: train one of the five seed LMs around an attention spec.

Wire it in with ``kernelsearch.models.cli.register(subparsers)``; it sets ``func=run`` where
``run(args) -> int`` is the exit code. Bad input raises ``UsageError`` (exit code 2 at the top).
"""
from __future__ import annotations

import argparse
import json

from ..cli import non_negative_int, positive_float, positive_int
from ..errors import UsageError

BACKENDS = ("auto", "reference", "torch", "triton")

EPILOG = """\
examples:
  kernelsearch lm specs/local.yaml --steps 200
  kernelsearch lm specs/cosine_sim.yaml --model specs/models/cosine_sim.yaml --backend torch --json
  kernelsearch lm specs/softmax.yaml --model memory_efficient --plot loss.png --checkpoint lm.pt

The model family defaults to the one whose seed SPEC is (softmax.yaml -> mesh_tf,
cosine_sim.yaml -> cosine_sim, memory_efficient.yaml -> memory_efficient, local.yaml -> local,
talking_heads.yaml -> talking_heads; any other spec -> mesh_tf). Model hyperparameters and training
defaults come from specs/models/<family>.yaml or the file given to --model.
"""


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lm", help="train a seed language model around an attention spec",
        description="Train one of the five seed LMs on the Python standard library's source "
                    "(bytes), report validation loss and a top-k sample.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="SPEC", help="attention spec (YAML), e.g. specs/local.yaml")
    p.add_argument("--model", metavar="FAMILY|MODEL.yaml",
                   help="mesh_tf, cosine_sim, memory_efficient, local, talking_heads, or a model spec file")
    p.add_argument("--steps", type=non_negative_int("--steps"), help="training steps (default: the model spec's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="attention backend (default: auto = triton on a GPU, torch on a CPU)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), help="sequences per step")
    p.add_argument("--seq-len", type=positive_int("--seq-len"), help="bytes per sequence")
    p.add_argument("--lr", type=positive_float("--lr"), help="Adam learning rate")
    p.add_argument("--kv-heads", type=positive_int("--kv-heads"),
                   help="key/value heads, dividing the query heads (grouped-query attention; 1: multi-query); "
                        "families with a kv_heads hyperparameter (mesh_tf)")
    p.add_argument("--sample-len", type=non_negative_int("--sample-len"), help="bytes to sample after training")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and sampling (default 0)")
    p.add_argument("--json", action="store_true",
                   help='print {"losses": [...], "val_loss": ..., "sample": "...", ...} on stdout')
    p.add_argument("--plot", metavar="PATH", help="write the loss curve as a PNG")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="save a checkpoint after training (and sample from it, reloaded)")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from .config import resolve_model
    from . import train as _train

    cfg = resolve_model(args.model, args.spec)
    t = cfg.train
    for flag, attr in (("steps", "steps"), ("batch_size", "batch_size"), ("seq_len", "seq_len"),
                       ("lr", "lr"), ("sample_len", "sample_len")):
        if getattr(args, flag) is not None:
            setattr(t, attr, getattr(args, flag))
    if args.kv_heads is not None:
        from .config import family_hyperparameters
        if "kv_heads" not in family_hyperparameters(cfg.family):
            raise UsageError(f"--kv-heads: the {cfg.family} family has no grouped KV heads "
                             f"(the mesh_tf family has: --model mesh_tf)")
        cfg.model["kv_heads"] = args.kv_heads
    if cfg.model.get("max_seq_len") is not None and t.seq_len > cfg.model["max_seq_len"]:
        raise UsageError(f"--seq-len {t.seq_len} exceeds the model's max_seq_len {cfg.model['max_seq_len']}")
    device = args.device or _train.default_device()
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available")
    # the bar goes to stderr, only when it is a terminal (tqdm's choice), never with --quiet
    result = _train.run(cfg, backend=args.backend, seed=args.seed, device=device,
                        checkpoint=args.checkpoint, resume=args.resume,
                        progress=False if args.quiet else None)
    if args.plot:
        _train.plot_losses(args.plot, result.losses, result.val_loss,
                           title=f"{cfg.family} · {cfg.spec} · {result.backend}")
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    print(f"model     {cfg.family} around {cfg.spec} (backend {result.backend}, {device})")
    print(f"train     {len(result.losses)} steps in {result.seconds:.1f} s, "
          f"{result.tokens_per_s:,.0f} tokens/s; loss {first:.3f} -> {last:.3f}")
    print(f"val loss  {result.val_loss:.4f} nats/byte")
    if result.checkpoint:
        print(f"checkpoint {result.checkpoint} (saved and reloaded)")
    if args.plot:
        print(f"plot      {args.plot}")
    print("sample    (top-k, after a validation prime)")
    print(result.prime + result.sample)
    return 0
