"""Release-faithful mixed precision: which tensors stay fp32 in a bf16 model.

DeepSeek's release keeps the mHC parameters (`fn`, `base`, `scale` of every hyper-connection and of
the head), the attention sinks, the compressors' position biases (`ape`) and the router's noaux_tc
expert bias in fp32; everything else is bf16 (with fp32 main weights in the optimizer). Megatron's
`Float16Module` casts a whole module to bf16, so the fp32 ones are saved before wrapping and put back
after, bit for bit. Their maths already run in fp32 (`.float()` at each use), so only storage, the
gradient buffer dtype and the optimizer group (fp32 params are stepped in place) change.
"""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import torch

KEEP_FP32_ATTR = "keep_fp32"  # set on the kept parameters (the optimizer groups them apart)

# (module class name, tensor attribute): the fp32 tensors of the release.
RELEASE_FP32 = {
    "HyperConnection": ("fn", "base", "scale"),
    "HyperHead": ("fn", "base", "scale"),
    "HybridAttention": ("attn_sink",),
    "Compressor": ("ape",),
    "ScoredRouter": ("expert_bias",),
}


def release_fp32_tensors(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(qualified name, parameter or buffer) of every tensor the release keeps in fp32."""
    for module_name, module in model.named_modules():
        for attr in RELEASE_FP32.get(type(module).__name__, ()):
            tensor = getattr(module, attr, None)
            if isinstance(tensor, torch.Tensor):
                yield (f"{module_name}.{attr}" if module_name else attr), tensor


def wrap_keeping_fp32(model: torch.nn.Module, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    """`wrap(model)` (e.g. Megatron's Float16Module), with the release's fp32 tensors restored after."""
    saved = [(tensor, tensor.detach().clone()) for _, tensor in release_fp32_tensors(model) if tensor.dtype == torch.float32]
    wrapped = wrap(model)
    for tensor, fp32 in saved:
        tensor.data = fp32
        if isinstance(tensor, torch.nn.Parameter):
            setattr(tensor, KEEP_FP32_ATTR, True)
    return wrapped
