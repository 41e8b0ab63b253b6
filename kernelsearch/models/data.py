"""The training corpus: the Python standard library's own source, read at run time, as bytes.

Every machine that runs kernelsearch has a Python standard library, so nothing is downloaded.

- Files: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]``, excluding ``site-packages``
  (installed third-party code differs between machines) and ``__pycache__``, sorted by their
  path relative to the stdlib root; taken in that order until ``max_bytes`` is reached.
- Tokens: raw bytes, vocabulary 256, files joined by one ``\\x00`` byte (a separator that does
  not occur in source text).
- Split: by whole file, deterministic — a file goes to validation when the CRC-32 of its relative
  path (``/``-separated) is ``< val_fraction`` of the 32-bit range. The same Python version gives
  the same corpus on every machine; other versions give a similar, not identical, one.
- Batches: uniformly random windows of ``seq_len + 1`` bytes drawn with a seeded
  ``torch.Generator`` (inputs are the first ``seq_len``, targets the last ``seq_len``).
"""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

VOCAB_SIZE = 256
SEPARATOR = b"\x00"
DEFAULT_MAX_BYTES = 8_000_000


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of every stdlib ``.py`` file, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if "site-packages" in rel.parts or "dist-packages" in rel.parts or "__pycache__" in rel.parts:
            continue
        if p.is_file():
            out.append((rel.as_posix(), p))
    out.sort(key=lambda t: t[0])
    return out


def is_validation(relpath: str, val_fraction: float) -> bool:
    return zlib.crc32(relpath.encode()) < val_fraction * 2**32


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor     # uint8 [n_train]
    val: torch.Tensor       # uint8 [n_val]
    n_files: int

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {name!r}")
        return self.train if name == "train" else self.val


@lru_cache(maxsize=4)
def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = 0.05) -> Corpus:
    files = stdlib_files()
    if not files:
        raise RuntimeError(f"no .py files found under {stdlib_root()}")
    train, val, total, n = [], [], 0, 0
    for rel, path in files:
        data = path.read_bytes()
        (val if is_validation(rel, val_fraction) else train).append(data)
        total += len(data) + 1
        n += 1
        if total >= max_bytes:
            break
    if not val:             # a tiny corpus: keep the split non-empty, still deterministic
        val.append(train.pop())
    def tensor(chunks):
        return torch.frombuffer(bytearray(SEPARATOR.join(chunks)), dtype=torch.uint8)
    return Corpus(train=tensor(train), val=tensor(val), n_files=n)


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Random windows of ``seq_len + 1`` tokens: a long tensor [batch_size, seq_len + 1]."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"corpus split of {data.numel()} bytes is too short for seq_len={seq_len}")
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    return data[idx].long().to(device)


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
