"""On a CUDA GPU: CUDA masks take the torch reference of unpad_metadata, which checks values as the CPU
path does (run by scripts/gpu_check.sh)."""
import pytest
import torch

from fastbert import ops

pytestmark = pytest.mark.gpu


def test_cuda_mask_holding_2_is_rejected_like_on_the_cpu():
    mask = torch.tensor([[1, 2, 0], [1, 1, 0]])
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="0 or 1"):
            ops.unpad_metadata(mask.to(device))
    indices, cu_seqlens, max_seqlen = ops.unpad_metadata(torch.tensor([[1, 1, 0], [1, 0, 0]], device="cuda"))
    assert indices.tolist() == [0, 1, 3] and cu_seqlens.tolist() == [0, 2, 3] and max_seqlen == 2
