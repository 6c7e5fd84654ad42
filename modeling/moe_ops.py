"""The operations both dropless kernels share (dropless_moe.py on any device, triton_moe.py on CUDA): sorting token
slots by expert, the SwiGLU backward that recomputes the activation, the named input-gradient flags and the
layout check. Part of the remote-code bundle: imports only torch.

Shape suffixes, as in torchtitan (`hidden_TH` is [tokens, hidden]), in this file, dropless_moe.py, triton_moe.py
and the router code of modeling_llama_moe.py:
    T  tokens                          H  hidden size
    E  experts (E1: E + 1, the last bin counting the slots a capacity limit dropped, expert index E)
    K  slots per token (top-k), so T x K slots in all
    S  slots, (token, expert) pairs: in routing order, or sorted by expert once the kernel has sorted them
    R  a block of sorted slots (one expert's, or a block of rows of it)
    I  an expert's intermediate width; 2I its gate and up rows together (the fused `gate_up_proj`)
    1  a dimension of size 1 that broadcasts (weights_S1)
    M, N, P, Q, and K in the GEMM helpers (a_SK @ weight_EKN -> out_SN): the sizes of a generic matrix product
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


def sort_slots_by_expert(top_k_index: torch.Tensor, num_experts: int):
    """Order the (token, slot) pairs by expert.

    Returns the flat slot order `order_S`, the token each sorted slot belongs to `token_S`, and the number of
    slots per expert `counts_E` (length num_experts + 1: the last bin counts capacity-dropped slots, whose
    index is the sentinel `num_experts`; they sort to the tail and are never computed).
    """
    top_k = top_k_index.shape[-1]
    expert_S = top_k_index.reshape(-1)
    # A stable sort keeps tokens in their original order inside each expert (deterministic results).
    order_S = torch.argsort(expert_S, stable=True)
    token_S = torch.div(order_S, top_k, rounding_mode="floor")
    counts_E = torch.bincount(expert_S, minlength=num_experts + 1)
    return order_S, token_S, counts_E


def scale_rows_(rows_SN: torch.Tensor, weights_S1: torch.Tensor) -> torch.Tensor:
    """rows * weights, in place when the rows already have the accumulation dtype."""
    if rows_SN.dtype == weights_S1.dtype:
        return rows_SN.mul_(weights_S1)
    return (rows_SN * weights_S1).to(rows_SN.dtype)


def is_silu(act_fn) -> bool:
    return act_fn is F.silu or act_fn.__class__.__name__ == "SiLUActivation"


class InputGrads(NamedTuple):
    """Which inputs of a kernel's forward (hidden, index, weights, gate_up, down, act_fn) want a gradient: its
    ctx.needs_input_grad, by name."""

    hidden: bool
    index: bool
    weights: bool
    gate_up: bool
    down: bool
    act_fn: bool


def swiglu_backward(
    grad_act_RI, gate_up_R2I, weights_R1, act_fn, grad_gate_up_R2I, want_weights_grad, use_weighted_act
):
    """From d(out)/d(act) before the routing weight, for a block of rows: fills grad_gate_up_R2I (d/d(gate, up)
    after the routing weight), hands act * weight to `use_weighted_act` (the down-projection weight gradient) while
    it still exists, and returns d/d(routing weight) per row when asked. SwiGLU is recomputed, not stored."""
    intermediate = grad_act_RI.shape[1]
    gate_RI, up_RI = gate_up_R2I.split(intermediate, dim=-1)
    silu = is_silu(act_fn)
    if silu:
        act_gate_RI = F.silu(gate_RI)
    else:
        with torch.enable_grad():
            gate_leaf = gate_RI.detach().requires_grad_()
            act_gate_RI = act_fn(gate_leaf)
            (act_gate_grad_RI,) = torch.autograd.grad(act_gate_RI.sum(), gate_leaf)
        act_gate_RI = act_gate_RI.detach()
    # The up half of the gradient buffer holds act until grad_up overwrites it (one rows x I less at peak).
    grad_gate_RI, grad_up_RI = grad_gate_up_R2I.split(intermediate, dim=-1)
    act_RI = torch.mul(act_gate_RI, up_RI, out=grad_up_RI)
    grad_weights_R = None
    if want_weights_grad:
        grad_weights_R = torch.linalg.vecdot(grad_act_RI.to(weights_R1.dtype), act_RI.to(weights_R1.dtype))
    if use_weighted_act is not None:
        use_weighted_act(scale_rows_(act_RI, weights_R1))
    del act_RI
    grad_act_RI = scale_rows_(grad_act_RI, weights_R1)
    torch.mul(grad_act_RI, act_gate_RI, out=grad_up_RI)
    torch.mul(grad_act_RI, up_RI, out=grad_gate_RI)
    if silu:  # one fused pass: grad * silu'(gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate_RI, gate_RI, grad_input=grad_gate_RI)
    else:
        grad_gate_RI.mul_(act_gate_grad_RI)
    return grad_weights_R


def check_experts_layout(experts, implementation: str) -> None:
    """Our kernels take transformers v5's fused SwiGLU layout only; name the module and the fallback otherwise."""
    unsupported = (
        getattr(experts, "has_bias", False)
        or getattr(experts, "is_transposed", False)
        or not getattr(experts, "has_gate", True)
        or not getattr(experts, "is_concatenated", True)
        or getattr(experts, "has_post_expert_norm", False)
    )
    if unsupported:
        raise NotImplementedError(
            f"experts_implementation={implementation!r} supports gated, concatenated, non-transposed experts without "
            f"bias or post-expert norm; {type(experts).__name__} is not one. Use experts_implementation='grouped_mm' "
            "for it."
        )
