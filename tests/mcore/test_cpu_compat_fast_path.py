"""CudaToCpuMode's dispatch split (hot pass-through path vs rewriting path), CPU machines only."""

import pytest
import torch

from dsv4_train.mcore import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is applied only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def applied(megatron_world1):
    cpu_compat.apply()


def test_device_spellings_and_methods_land_on_cpu():
    # Every way Megatron names a CUDA device: keyword on factories and Tensor methods, positional
    # on Tensor.to, torch.device objects, bare ordinals.
    base = torch.ones(2)
    placed = [
        torch.empty(2, device=torch.device("cuda")),
        torch.tensor([1.0], device=0),
        torch.arange(3, device="cuda:0"),
        base.new_zeros(2, device="cuda"),
        base.to(torch.device("cuda", 0)),
        base.to("cuda", torch.float64),
        base.to(device="cuda", dtype=torch.float16),
        torch.zeros_like(base, device="cuda"),
    ]
    assert all(t.device.type == "cpu" for t in placed)
    assert placed[5].dtype == torch.float64 and placed[6].dtype == torch.float16
    assert base.pin_memory() is base and base.cuda() is base and base.is_pinned() is False
    assert torch.empty(2, pin_memory=False).device.type == "cpu"


def test_pass_through_calls_are_untouched():
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(torch.sum(x, dim=1, keepdim=True), torch.tensor([[3.0], [12.0]]))
    assert x.to(torch.float64).dtype == torch.float64  # Tensor.to without a device
    assert x.type(torch.int32).dtype == torch.int32  # Tensor.type with an argument converts
    assert x.new_empty(2).device.type == "cpu"
