"""Import Megatron-Core's dataset modules safely on CPU and GPU machines.

`megatron.core`'s package import needs the CPU compatibility layer on machines without CUDA (it is a
no-op with CUDA). The GPT dataset index builder needs Megatron's compiled C++ helpers
(`megatron.core.datasets.helpers_cpp`): the megatron-core 0.19.2 wheels ship them prebuilt for their
platform, and the wheel has no Makefile or build toolchain hook, so there is nothing to compile at first
use; when they are missing (e.g. a source checkout of Megatron-LM) we fail early with the fix instead of
deep inside index building.
"""

from __future__ import annotations

import types


def megatron_datasets() -> types.SimpleNamespace:
    """The Megatron-Core dataset classes we use, imported once the runtime is CPU-safe."""
    from dsv4_train.mcore import cpu_compat

    cpu_compat.apply()
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401  (compiled extension)
    except ImportError as error:
        raise RuntimeError(
            f"Megatron-Core's compiled dataset helpers (megatron.core.datasets.helpers_cpp) are missing "
            f"({error}). Install the megatron-core==0.19.2 wheel (it ships them prebuilt), or build them "
            f"from a Megatron-LM checkout with `make -C megatron/core/datasets`."
        ) from None
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    return types.SimpleNamespace(
        BlendedMegatronDatasetBuilder=BlendedMegatronDatasetBuilder,
        GPTDataset=GPTDataset,
        GPTDatasetConfig=GPTDatasetConfig,
        MockGPTDataset=MockGPTDataset,
        DType=DType,
        IndexedDataset=IndexedDataset,
        IndexedDatasetBuilder=IndexedDatasetBuilder,
    )
