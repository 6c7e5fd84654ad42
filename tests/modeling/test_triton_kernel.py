"""Tests of the "dropless_triton" experts kernel against the eager loop, run by Triton's interpreter on CPU.

The interpreter executes the same kernel source the GPU compiles (block loads, masks, tl.dot), so block tables,
gathers, scatters, masks and strides are checked here; GPU speed is not. On a CUDA machine the last test runs the
compiled kernels.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is part of the test extras")
# Without CUDA the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before any import.
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

from llama_moe.modeling import LlamaMoEForCausalLM  # noqa: E402
from llama_moe.modeling.triton_moe import BLOCK_ROWS, _RowBlocks  # noqa: E402
from tests.conftest import tiny_moe_config  # noqa: E402
from tests.modeling.test_dropless_kernel import _check_block, _check_experts, _config  # noqa: E402

# (num_experts, top_k, hidden, expert width, tokens): widths and hidden sizes that are not tile multiples, and a
# row count that spans several blocks of one expert.
SHAPES = {
    "coarse-8x2": (8, 2, 40, 24, 40),
    "fine-16x4": (16, 4, 32, 8, 48),
    "top1-4x1": (4, 1, 24, 40, 3 * BLOCK_ROWS + 5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_triton_experts_match_eager(shape, dtype):
    _check_experts(shape, dtype, impls=("dropless_triton",))


def test_triton_experts_without_tokens_and_dropped_slots():
    # Experts 2.. get no token (zero weight gradients); capacity-dropped slots contribute nothing.
    _check_experts(SHAPES["coarse-8x2"], torch.float32, impls=("dropless_triton",), only=[0, 1])
    _check_experts(SHAPES["coarse-8x2"], torch.float32, impls=("dropless_triton",), dropped=7)


def test_triton_block_with_capacity_matches_eager():
    num_experts, top_k, hidden, width, tokens = SHAPES["coarse-8x2"]
    config = _config(num_experts, top_k, hidden, width, capacity_factor=0.5)
    _check_block(config, torch.float32, tokens, impls=("dropless_triton",))


def test_block_table_covers_every_slot_once():
    torch.manual_seed(0)
    num_experts, tokens, top_k = 5, 2 * BLOCK_ROWS + 7, 2
    index_TK = torch.randint(0, num_experts + 1, (tokens, top_k))  # value num_experts = a dropped slot
    blocks = _RowBlocks(index_TK, num_experts)
    covered = torch.zeros(tokens * top_k, dtype=torch.int64)
    for expert, start, end in zip(blocks.block_expert.tolist(), blocks.block_start.tolist(), blocks.block_end.tolist()):
        rows = torch.arange(start, min(start + BLOCK_ROWS, end))
        covered[rows] += 1
        sorted_experts = index_TK.reshape(-1)[blocks.order_S[rows]]
        assert (sorted_experts == expert).all(), "a block mixes experts"
    assert (covered == 1).all(), "every sorted slot belongs to exactly one block"
    assert blocks.num_blocks == -(-tokens * top_k // BLOCK_ROWS) + num_experts + 1


def test_model_generates_the_same_with_triton_and_dropless():
    torch.manual_seed(0)
    model = LlamaMoEForCausalLM(tiny_moe_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    reference = model(ids).logits
    model.set_experts_implementation("dropless_triton")
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-5)


def test_triton_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = LlamaMoEForCausalLM(tiny_moe_config())
    model.set_experts_implementation("dropless_triton")
    with pytest.raises(ValueError, match="runs on CUDA devices"):
        model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_triton_experts_match_eager(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    for shape in SHAPES.values():
        _check_experts(shape, dtype, device="cuda", impls=("dropless_triton",))
    _check_experts(SHAPES["coarse-8x2"], dtype, device="cuda", impls=("dropless_triton",), dropped=7)
