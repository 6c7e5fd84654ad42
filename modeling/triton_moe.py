"""Dropless MoE experts in Triton ("dropless_triton"): gather fused into the first GEMM, scatter-with-weights into
the second, as ScatterMoE does; for CUDA devices (tested on CPU with Triton's interpreter, TRITON_INTERPRET=1).

Slots are sorted by expert as in the "dropless" kernel, but no gathered copy of the tokens is ever made: the first
GEMM reads each token row where it lies, the second writes each weighted expert output to its (token, slot) row,
and the k rows of a token are summed in float32 (no atomics: deterministic). The block table that maps program ids
to (expert, rows) is built on the device with a static upper bound, so there is no host sync. The SwiGLU sits
between the GEMMs (recomputed in backward, as in "dropless"). Part of the remote-code bundle: imports only torch,
its siblings and, where installed, triton (guarded: a checkpoint loads without it).
"""

import functools
import os

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .moe_ops import InputGrads, check_experts_layout, sort_slots_by_expert, swiglu_backward

# Imported on first use: the import takes about a second, most users never call this backend, and under
# TRITON_INTERPRET=1 triton must first be imported after that variable is set. Module globals, because the
# interpreter looks for `tl` among the kernels' globals.
triton = None
tl = None
_dot_accumulate = None  # a jit helper the kernels call; a global too, since the interpreter sees no closures

BLOCK_ROWS = 64  # rows (token slots) per program in the row-blocked kernels; also the block table's unit


def triton_available() -> bool:
    global triton, tl
    if triton is None:
        try:  # optional: a checkpoint must load where triton is not installed
            import triton as triton_module
            import triton.language as language
        except ImportError:
            return False
        triton, tl = triton_module, language
    return True


def _interpreting() -> bool:
    # As triton reads it (an import of triton here would count as a hard dependency of the remote code).
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _kernels():
    """Build the kernels on first use (triton.jit reads TRITON_INTERPRET when it decorates)."""
    global _dot_accumulate

    @triton.jit
    def _dot_accumulate(acc, a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b: full fp32 precision when IEEE; float32 tiles when UPCAST (see _upcast)."""
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:
            return acc + tl.dot(a, b, input_precision="ieee")
        return acc + tl.dot(a, b)

    @triton.jit
    def scatter2scatter(
        a_ptr,
        a_rows_ptr,
        w_ptr,
        y_ptr,
        y_rows_ptr,
        scale_ptr,
        block_expert_ptr,
        block_start_ptr,
        block_end_ptr,
        num_experts,
        K,
        N,
        stride_am,
        stride_we,
        stride_wk,
        stride_wn,
        stride_ym,
        GATHER: tl.constexpr,
        SCATTER: tl.constexpr,
        SCALE: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        """Y[y_row(r)] = scale[r] * A[a_row(r)] @ W[e] for the rows r of one block, all of expert e; W[e] is read
        through strides as a (K, N) matrix, so [E, N, K] and [E, K, N] weights both work without copies. Blocks of
        the sentinel expert (capacity-dropped slots) write zeros: every output row is written, none is garbage."""
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        start = tl.load(block_start_ptr + block)
        end = tl.load(block_end_ptr + block)
        rows = start + tl.arange(0, BM)
        row_mask = rows < end
        a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0) if GATHER else rows
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        col_mask = cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_stop = tl.where(expert < num_experts, K, 0)
        for k0 in range(0, k_stop, BK):
            ks = k0 + tl.arange(0, BK)
            k_mask = ks < K
            a = tl.load(
                a_ptr + a_rows[:, None].to(tl.int64) * stride_am + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc = _dot_accumulate(acc, a, w, IEEE, UPCAST)
        if SCALE:
            acc *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        y_rows = tl.load(y_rows_ptr + rows, mask=row_mask, other=0) if SCATTER else rows
        tl.store(
            y_ptr + y_rows[:, None].to(tl.int64) * stride_ym + cols[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=row_mask[:, None] & col_mask[None, :],
        )

    @triton.jit
    def group_weight_grad(
        a_ptr,
        a_rows_ptr,
        b_ptr,
        b_rows_ptr,
        g_ptr,
        expert_start_ptr,
        expert_end_ptr,
        P,
        Q,
        stride_am,
        stride_bm,
        stride_ge,
        GATHER_A: tl.constexpr,
        GATHER_B: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        BP: tl.constexpr,
        BQ: tl.constexpr,
        BR: tl.constexpr,
    ):
        """G[e] = A[rows of e]^T @ B[rows of e] ((P, Q) per expert), rows optionally gathered; an expert without
        rows gets zeros (its loop does not run)."""
        expert = tl.program_id(0)
        start = tl.load(expert_start_ptr + expert)
        end = tl.load(expert_end_ptr + expert)
        ps = tl.program_id(1) * BP + tl.arange(0, BP)
        qs = tl.program_id(2) * BQ + tl.arange(0, BQ)
        p_mask = ps < P
        q_mask = qs < Q
        acc = tl.zeros((BP, BQ), dtype=tl.float32)
        for r0 in range(start, end, BR):
            rows = r0 + tl.arange(0, BR)
            row_mask = rows < end
            a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0) if GATHER_A else rows
            b_rows = tl.load(b_rows_ptr + rows, mask=row_mask, other=0) if GATHER_B else rows
            a_t = tl.load(
                a_ptr + a_rows[None, :].to(tl.int64) * stride_am + ps[:, None],
                mask=p_mask[:, None] & row_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + b_rows[:, None].to(tl.int64) * stride_bm + qs[None, :],
                mask=row_mask[:, None] & q_mask[None, :],
                other=0.0,
            )
            acc = _dot_accumulate(acc, a_t, b, IEEE, UPCAST)
        tl.store(
            g_ptr + expert.to(tl.int64) * stride_ge + ps[:, None] * Q + qs[None, :],
            acc.to(g_ptr.dtype.element_ty),
            mask=p_mask[:, None] & q_mask[None, :],
        )

    return scatter2scatter, group_weight_grad


def _tile(size: int, largest: int) -> int:
    """Power-of-two tile edge, at least 16 (tl.dot's minimum) and at most `largest`."""
    return max(16, min(largest, triton.next_power_of_2(size)))


class _RowBlocks:
    """Expert row ranges of the sorted slots and the block table of the row-blocked kernels, built on the device.

    Block b covers sorted rows [block_start[b], block_end[b]) of expert block_expert[b], where expert E (the
    sentinel) holds the capacity-dropped slots and its blocks write zeros. There are at most
    ceil(slots / BLOCK_ROWS) + E + 1 real blocks and the table always has that many entries (the spare ones cover
    no row), so its size never depends on the routing and nothing is read back to the host."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int):
        num_tokens, top_k = top_k_index.shape
        self.order_S, self.token_S, counts_E1 = sort_slots_by_expert(top_k_index, num_experts)
        ends_E1 = torch.cumsum(counts_E1, 0)
        starts_E1 = ends_E1 - counts_E1
        blocks_E1 = (counts_E1 + BLOCK_ROWS - 1) // BLOCK_ROWS
        last_block_E1 = torch.cumsum(blocks_E1, 0)
        self.num_blocks = -(-num_tokens * top_k // BLOCK_ROWS) + num_experts + 1
        block = torch.arange(self.num_blocks, device=top_k_index.device)
        expert = torch.searchsorted(last_block_E1, block, right=True)
        real = expert <= num_experts
        expert = expert.clamp(max=num_experts)
        start = starts_E1[expert] + (block - (last_block_E1[expert] - blocks_E1[expert])) * BLOCK_ROWS
        self.block_expert = expert
        self.block_start = torch.where(real, start, 0)
        self.block_end = torch.where(real, ends_E1[expert], 0)
        self.expert_start, self.expert_end = starts_E1[:num_experts], ends_E1[:num_experts]
        self.num_experts = num_experts
        self.shape = (num_tokens, top_k)

    def gemm(self, a, w_EKN_strides, w, out_cols, k, *, a_rows=None, y=None, y_rows=None, scale=None):
        """y[y_rows[r] or r] = scale[r] * a[a_rows[r] or r] @ W_e (K=k, N=out_cols) over every block."""
        scatter2scatter, _ = _kernels()
        stride_we, stride_wk, stride_wn = w_EKN_strides
        bn, bk = _tile(out_cols, 128), _tile(k, 32)
        dummy = self.token_S
        grid = (self.num_blocks, triton.cdiv(out_cols, bn))
        scatter2scatter[grid](
            a,
            a_rows if a_rows is not None else dummy,
            w,
            y,
            y_rows if y_rows is not None else dummy,
            scale if scale is not None else a,
            self.block_expert,
            self.block_start,
            self.block_end,
            self.num_experts,
            k,
            out_cols,
            a.stride(0),
            stride_we,
            stride_wk,
            stride_wn,
            y.stride(0),
            GATHER=a_rows is not None,
            SCATTER=y_rows is not None,
            SCALE=scale is not None,
            IEEE=_ieee(a),
            UPCAST=_upcast(a),
            BM=BLOCK_ROWS,
            BN=bn,
            BK=bk,
        )
        return y

    def weight_grad(self, a, b, out_EPQ, *, a_rows=None, b_rows=None):
        """out[e] = a[rows of e]^T @ b[rows of e], rows optionally gathered."""
        _, group_weight_grad = _kernels()
        p, q = out_EPQ.shape[1], out_EPQ.shape[2]
        bp, bq = _tile(p, 64), _tile(q, 64)
        dummy = self.token_S
        grid = (self.num_experts, triton.cdiv(p, bp), triton.cdiv(q, bq))
        group_weight_grad[grid](
            a,
            a_rows if a_rows is not None else dummy,
            b,
            b_rows if b_rows is not None else dummy,
            out_EPQ,
            self.expert_start,
            self.expert_end,
            p,
            q,
            a.stride(0),
            b.stride(0),
            out_EPQ.stride(0),
            GATHER_A=a_rows is not None,
            GATHER_B=b_rows is not None,
            IEEE=_ieee(a),
            UPCAST=_upcast(a),
            BP=bp,
            BQ=bq,
            BR=32,
        )
        return out_EPQ

    def sum_slots(self, rows_SH: torch.Tensor) -> torch.Tensor:
        """[T*k, H] rows in (token, slot) order -> [T, H]: each token's k rows summed."""
        num_tokens, top_k = self.shape
        return rows_SH.view(num_tokens, top_k, rows_SH.shape[1]).sum(1)


def _ieee(tensor: torch.Tensor) -> bool:
    # fp32 GEMMs as torch runs them by default: full precision, no TF32 unless the user allowed it.
    return tensor.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _upcast(tensor: torch.Tensor) -> bool:
    # Triton's interpreter multiplies 16-bit float tiles wrongly (triton 3.9: tl.dot of bf16 gives ~1e10): it gets
    # float32 tiles of the same values. Compiled kernels keep 16-bit tiles (tensor cores, float32 accumulation).
    return tensor.dtype in (torch.bfloat16, torch.float16) and _interpreting()


def _slot_rows(blocks: _RowBlocks, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Float32 rows, one per (token, slot), for the k expert outputs of each token to be summed in."""
    num_tokens, top_k = blocks.shape
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.empty(num_tokens * top_k, cols, dtype=dtype, device=like.device)


class TritonExpertsFunction(torch.autograd.Function):
    """Same contract as DroplessExpertsFunction: out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t))."""

    @staticmethod
    def forward(ctx, hidden_TH, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn):
        num_experts, hidden, intermediate = gate_up_proj.shape[0], hidden_TH.shape[1], down_proj.shape[-1]
        hidden_TH = hidden_TH.contiguous()
        blocks = _RowBlocks(top_k_index, num_experts)
        slots = top_k_index.numel()
        # Gather fused into the first GEMM: gate_up[r] = x[token(r)] @ gate_up_proj[e]^T ([E, 2I, H] read as (H, 2I)).
        gate_up_S2I = hidden_TH.new_empty(slots, 2 * intermediate)
        blocks.gemm(
            hidden_TH,
            (gate_up_proj.stride(0), gate_up_proj.stride(2), gate_up_proj.stride(1)),
            gate_up_proj,
            2 * intermediate,
            hidden,
            a_rows=blocks.token_S,
            y=gate_up_S2I,
        )
        act_SI = act_fn(gate_up_S2I[:, :intermediate]) * gate_up_S2I[:, intermediate:]
        # Scatter with weights fused into the second: rows[(t, j)] = w[t, j] * act[r] @ down_proj[e]^T.
        acc_dtype = torch.promote_types(hidden_TH.dtype, torch.float32)
        weights_S = top_k_weights.reshape(-1)[blocks.order_S].to(acc_dtype)  # sorted order, reused in backward
        y_rows = _slot_rows(blocks, hidden, hidden_TH)
        blocks.gemm(
            act_SI,
            (down_proj.stride(0), down_proj.stride(2), down_proj.stride(1)),
            down_proj,
            hidden,
            intermediate,
            y=y_rows,
            y_rows=blocks.order_S,
            scale=weights_S,
        )
        ctx.save_for_backward(hidden_TH, top_k_weights, weights_S, gate_up_S2I, gate_up_proj, down_proj)
        ctx.blocks, ctx.act_fn = blocks, act_fn
        return blocks.sum_slots(y_rows).to(hidden_TH.dtype)

    @staticmethod
    def backward(ctx, grad_out_TH):
        hidden_TH, top_k_weights, weights_S, gate_up_S2I, gate_up_proj, down_proj = ctx.saved_tensors
        blocks, needs = ctx.blocks, InputGrads(*ctx.needs_input_grad)
        hidden, intermediate = hidden_TH.shape[1], down_proj.shape[-1]
        grad_out_TH = grad_out_TH.to(hidden_TH.dtype).contiguous()
        slots = gate_up_S2I.shape[0]
        acc_dtype = weights_S.dtype
        weights_S1 = weights_S.unsqueeze(-1)
        # d/d(act) before the routing weight: grad_out[token(r)] @ down_proj[e] (gathered, [E, H, I] as (H, I)).
        grad_act_SI = gate_up_S2I.new_empty(slots, intermediate)
        blocks.gemm(
            grad_out_TH,
            (down_proj.stride(0), down_proj.stride(1), down_proj.stride(2)),
            down_proj,
            intermediate,
            hidden,
            a_rows=blocks.token_S,
            y=grad_act_SI,
        )
        grad_down_proj = None

        def down_grad(weighted_act_SI):
            nonlocal grad_down_proj
            grad_down_proj = blocks.weight_grad(
                grad_out_TH, weighted_act_SI, down_proj.new_empty(down_proj.shape), a_rows=blocks.token_S
            )

        grad_gate_up_S2I = torch.empty_like(gate_up_S2I)
        grad_weights_S = swiglu_backward(
            grad_act_SI,
            gate_up_S2I,
            weights_S1,
            ctx.act_fn,
            grad_gate_up_S2I,
            needs.weights,
            down_grad if needs.down else None,
        )
        grad_hidden_TH = None
        if needs.hidden:  # d/d(x): grad_gate_up[r] @ gate_up_proj[e] ([E, 2I, H] as (2I, H)), scattered to (t, j) rows
            grad_rows = _slot_rows(blocks, hidden, hidden_TH)
            blocks.gemm(
                grad_gate_up_S2I,
                (gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2)),
                gate_up_proj,
                hidden,
                2 * intermediate,
                y=grad_rows,
                y_rows=blocks.order_S,
            )
            grad_hidden_TH = blocks.sum_slots(grad_rows).to(hidden_TH.dtype)
        grad_gate_up_proj = None
        if needs.gate_up:
            grad_gate_up_proj = blocks.weight_grad(
                grad_gate_up_S2I, hidden_TH, gate_up_proj.new_empty(gate_up_proj.shape), b_rows=blocks.token_S
            )
        grad_top_k_weights = None
        if needs.weights:
            grad_flat = torch.empty(top_k_weights.numel(), dtype=acc_dtype, device=grad_weights_S.device)
            grad_flat[blocks.order_S] = grad_weights_S  # dropped slots: zero rows, zero gradient
            grad_top_k_weights = grad_flat.view(top_k_weights.shape).to(top_k_weights.dtype)
        return grad_hidden_TH, None, grad_top_k_weights, grad_gate_up_proj, grad_down_proj, None


def triton_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts-interface entry point ("dropless_triton"), same contract as "dropless"; CUDA tensors only (or any
    device under Triton's interpreter)."""
    check_experts_layout(self, "dropless_triton")
    if not triton_available():
        raise ImportError(
            "experts_implementation='dropless_triton' needs the triton package (pip install triton, CUDA machines); "
            "experts_implementation='dropless' needs nothing extra."
        )
    if hidden_states.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"experts_implementation='dropless_triton' runs on CUDA devices; these tensors are on "
            f"{hidden_states.device.type}. Use experts_implementation='dropless' there (or TRITON_INTERPRET=1 to test)."
        )
    return TritonExpertsFunction.apply(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn
    )


def register_triton_experts():
    """Make 'dropless_triton' a valid `experts_implementation` for every transformers MoE model in this process
    (registered even without triton, so that using it names the missing package)."""
    ALL_EXPERTS_FUNCTIONS.register("dropless_triton", triton_experts_forward)


register_triton_experts()
