"""Dropless sparse MoE experts kernel ("dropless"), registered with transformers' experts interface.

Sorts token slots by expert, gathers the tokens once, runs each expert's GEMMs on a contiguous slice (no
padding, no token dropped), and scatters the weighted results back with one index_add. The backward pass is
written by hand: it recomputes the SwiGLU from the saved gate/up activations, never copies expert weights,
and gives empty experts zero gradients. Part of the remote-code bundle: imports only torch and transformers.
"""

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


def _expert_slices(counts: list[int], num_experts: int):
    start = 0
    for expert in range(num_experts):
        end = start + counts[expert]
        if end > start:
            yield expert, start, end
        start = end


def _silu_and_grad(gate):
    sig = torch.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


class DroplessExpertsFunction(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)) with e = index[t, j], for SwiGLU experts."""

    @staticmethod
    def forward(ctx, hidden_TH, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn):
        num_experts = gate_up_proj.shape[0]
        intermediate = down_proj.shape[-1]
        order_S, token_S, counts_E = sort_slots_by_expert(top_k_index, num_experts)
        counts = counts_E.tolist()
        kept = sum(counts[:num_experts])
        order_S, token_S = order_S[:kept], token_S[:kept]
        acc_dtype = torch.promote_types(hidden_TH.dtype, torch.float32)
        weights_S = top_k_weights.reshape(-1)[order_S].to(acc_dtype)

        x_SH = hidden_TH[token_S]
        gate_up_S2I = x_SH.new_empty(kept, 2 * intermediate)
        for expert, start, end in _expert_slices(counts, num_experts):
            torch.mm(x_SH[start:end], gate_up_proj[expert].t(), out=gate_up_S2I[start:end])
        gate_SI, up_SI = gate_up_S2I.split(intermediate, dim=-1)
        act_SI = act_fn(gate_SI) * up_SI

        y_SH = x_SH  # the gathered tokens are not needed any more: reuse their buffer for the output
        for expert, start, end in _expert_slices(counts, num_experts):
            torch.mm(act_SI[start:end], down_proj[expert].t(), out=y_SH[start:end])
        out_TH = torch.zeros(hidden_TH.shape, dtype=acc_dtype, device=hidden_TH.device)
        out_TH.index_add_(0, token_S, y_SH.to(acc_dtype).mul_(weights_S.unsqueeze(-1)))

        ctx.save_for_backward(hidden_TH, order_S, token_S, weights_S, gate_up_S2I, gate_up_proj, down_proj)
        ctx.counts = counts
        ctx.act_fn = act_fn
        ctx.weights_shape, ctx.weights_dtype = top_k_weights.shape, top_k_weights.dtype
        return out_TH.to(hidden_TH.dtype)

    @staticmethod
    def backward(ctx, grad_out_TH):
        hidden_TH, order_S, token_S, weights_S, gate_up_S2I, gate_up_proj, down_proj = ctx.saved_tensors
        counts, act_fn = ctx.counts, ctx.act_fn
        num_experts, intermediate = gate_up_proj.shape[0], down_proj.shape[-1]
        dtype = hidden_TH.dtype
        kept = token_S.shape[0]

        grad_y_SH = grad_out_TH.to(dtype)[token_S]
        # d(out)/d(act) before the routing weight: grad_y @ down_e, one GEMM per expert slice.
        grad_act_unweighted_SI = grad_y_SH.new_empty(kept, intermediate)
        for expert, start, end in _expert_slices(counts, num_experts):
            torch.mm(grad_y_SH[start:end], down_proj[expert], out=grad_act_unweighted_SI[start:end])

        gate_SI, up_SI = gate_up_S2I.split(intermediate, dim=-1)
        if act_fn.__class__.__name__ == "SiLUActivation" or act_fn is F.silu:
            act_gate_SI, act_gate_grad_SI = _silu_and_grad(gate_SI)
        else:
            with torch.enable_grad():
                gate_leaf = gate_SI.detach().requires_grad_()
                act_gate_SI = act_fn(gate_leaf)
                (act_gate_grad_SI,) = torch.autograd.grad(act_gate_SI.sum(), gate_leaf)
            act_gate_SI = act_gate_SI.detach()
        act_SI = act_gate_SI * up_SI

        acc_dtype = weights_S.dtype
        grad_weights_S = (grad_act_unweighted_SI.to(acc_dtype) * act_SI.to(acc_dtype)).sum(-1)
        weights_col = weights_S.unsqueeze(-1)
        grad_act_SI = (grad_act_unweighted_SI.to(acc_dtype) * weights_col).to(dtype)

        grad_gate_up_proj = grad_down_proj = grad_hidden_TH = grad_top_k_weights = None
        if ctx.needs_input_grad[4]:
            weighted_act_SI = (act_SI.to(acc_dtype) * weights_col).to(dtype)
            grad_down_proj = torch.zeros_like(down_proj)
            for expert, start, end in _expert_slices(counts, num_experts):
                torch.mm(grad_y_SH[start:end].t(), weighted_act_SI[start:end], out=grad_down_proj[expert])

        grad_gate_up_S2I = torch.cat([grad_act_SI * up_SI * act_gate_grad_SI, grad_act_SI * act_gate_SI], dim=-1)
        if ctx.needs_input_grad[0]:
            grad_x_SH = grad_y_SH  # grad_y is not needed once grad_down_proj is done: reuse its buffer
            for expert, start, end in _expert_slices(counts, num_experts):
                torch.mm(grad_gate_up_S2I[start:end], gate_up_proj[expert], out=grad_x_SH[start:end])
            grad_hidden_TH = torch.zeros_like(hidden_TH).index_add_(0, token_S, grad_x_SH)
        if ctx.needs_input_grad[3]:
            x_SH = hidden_TH[token_S]
            grad_gate_up_proj = torch.zeros_like(gate_up_proj)
            for expert, start, end in _expert_slices(counts, num_experts):
                torch.mm(grad_gate_up_S2I[start:end].t(), x_SH[start:end], out=grad_gate_up_proj[expert])
        if ctx.needs_input_grad[2]:
            grad_flat = torch.zeros(ctx.weights_shape.numel(), dtype=acc_dtype, device=weights_S.device)
            grad_flat[order_S] = grad_weights_S
            grad_top_k_weights = grad_flat.view(ctx.weights_shape).to(ctx.weights_dtype)
        return grad_hidden_TH, None, grad_top_k_weights, grad_gate_up_proj, grad_down_proj, None


def dropless_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts-interface entry point: `self` is an experts module with fused `gate_up_proj [E, 2I, H]` and
    `down_proj [E, H, I]` (transformers v5 layout, no bias). Slots whose index is `num_experts` are skipped."""
    if getattr(self, "has_bias", False) or getattr(self, "is_transposed", False) or not getattr(self, "has_gate", True):
        raise NotImplementedError(
            f"experts_implementation='dropless' supports gated, non-transposed experts without bias; "
            f"{type(self).__name__} is not one. Use experts_implementation='grouped_mm' for it."
        )
    return DroplessExpertsFunction.apply(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn
    )


def register_dropless_experts():
    """Make 'dropless' a valid `experts_implementation` for every transformers MoE model in this process."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("dropless", dropless_experts_forward)


register_dropless_experts()
