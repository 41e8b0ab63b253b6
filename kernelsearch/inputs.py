"""Random inputs for a spec at given sizes: what tests, the tuner and benchmarks feed a kernel."""
from __future__ import annotations

import torch

from .spec import Spec


def input_shape(spec: Spec, name: str, sizes: dict, params: dict | None = None) -> list[int]:
    """The shape of input `name` at sizes {B, H, I, J, D, ...} (upper-case dim names)."""
    decl = spec.inputs[name]
    shape = []
    for dim in decl.shape:
        size = sizes.get(dim.upper())
        if size is None and dim == "n":           # a distance table: every |i - j| must be a row
            size = max(sizes["I"], sizes["J"])
        if size is None and dim.startswith("mix"):  # a head-mixing weight over streams * heads
            streams = (params or {}).get("num_streams", spec.params["num_streams"].default
                                         if "num_streams" in spec.params else 1)
            size = streams * sizes["H"]
        if size is None:
            size = sizes.get("D")
        shape.append(size)
    return shape


def random_inputs(spec: Spec, sizes: dict, dtype=torch.float32, device="cpu", seed: int = 0,
                  optional=True, params: dict | None = None) -> dict:
    """q, k, v and (when `optional` is True, or for the names it lists) the optional inputs.

    Masks keep about 80% of keys and always fully mask the last batch row's keys when B > 1,
    so that fully-masked rows are exercised; mixing weights are identity plus noise.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    wanted = set(spec.optional_inputs) if optional is True else set(optional or ())
    tensors = {}
    for name, decl in spec.inputs.items():
        if decl.optional and name not in wanted:
            continue
        shape = input_shape(spec, name, sizes, params)
        if decl.dtype == "bool":
            value = torch.rand(shape, generator=generator) < 0.8
            if "b" in decl.shape and shape[0] > 1:
                value[-1] = False
        elif decl.dtype == "int":
            value = torch.randint(0, 8, shape, generator=generator)
        elif name.endswith("mix") and len(shape) == 2 and shape[0] == shape[1]:
            value = torch.eye(shape[0]) + 0.3 * torch.randn(shape, generator=generator)
        else:
            value = torch.randn(shape, generator=generator)
        if value.is_floating_point():
            value = value.to(dtype)
        tensors[name] = value.to(device)
    return tensors
