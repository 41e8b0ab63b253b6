"""The five seed language models, assembled around any attention spec.

- ``mesh_tf`` (``mesh_tf.py``): seed 000, attention-tensorflow-mesh
- ``cosine_sim`` (``cosine_sim.py``): seed 001, flash-cosine-sim-attention
- ``memory_efficient`` (``memory_efficient.py``): seed 002, memory-efficient-attention-pytorch
- ``local`` (``local.py``): seed 003, local-attention
- ``talking_heads`` (``talking_heads.py``): seed 004, quartic-transformer (multi-stream)

Each model gets its attention from ``kernelsearch.load(spec, backend, **params)`` through
``models/attention.py:make_attention``; each layer's attention block is a
``kernelsearch.nn.Attention`` around it (the spec's learned inputs - talking-heads mixing
weights, qk-rmsnorm scales - are that module's parameters, in ``learned``; heads split and
merged with einops, as the seeds do). The model does only what the attention spec does not:
embeddings, projections, norms, gates, residuals, feed-forwards, the dynamic-position-bias MLP.

Model specs (``specs/models/<family>.yaml``) are described in ``models/config.py``; the corpus
in ``models/data.py``; training, checkpoints and sampling in ``models/train.py``; the
``kernelsearch lm`` command in ``models/cli.py`` (``register(subparsers)``).
"""
from .config import (FAMILY_NAMES, ModelConfig, TrainConfig, build_model, family_class,
                     load_model_config, resolve_model)

__all__ = ["FAMILY_NAMES", "ModelConfig", "TrainConfig", "build_model", "family_class",
           "load_model_config", "resolve_model"]
