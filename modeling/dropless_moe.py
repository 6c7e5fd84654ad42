"""Dropless sparse MoE experts kernel ("dropless"), registered with transformers' experts interface.

Sorts token slots by expert, gathers the tokens once, runs each expert's GEMMs on a contiguous slice (no padding,
no token dropped), and reduces the results back to tokens with one weighted gather-sum (embedding_bag: no second
copy of the tokens, no atomics, deterministic). The backward pass is written by hand: it recomputes the SwiGLU from
the saved gate/up projections (megablocks' memory-optimized MLP), never copies expert weights, and gives experts
without tokens zero gradients. Part of the remote-code bundle: imports only torch and transformers.
"""

import collections
import contextlib
import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from .moe_ops import (
    InputGrads,
    check_experts_layout,
    sort_slots_by_expert,
    swiglu_backward,
)


@dataclasses.dataclass
class DroplessSettings:
    """How "dropless" picks its CPU strategies. The process has one instance, `settings`: change a field for the
    whole process (`dropless_moe.settings.expert_parallel = False`) or for a block
    (`with dropless_moe.configured(few_slots=0): ...`). The measurements behind the defaults are in
    benchmarks/README.md ("What changed in modeling/dropless_moe.py", sessions 2 and 3). Expert parallelism sets
    torch's thread count to 1 for the whole process while the expert GEMMs run: set `expert_parallel = False` where
    other threads of the process run torch work at the same time."""

    gemm_backend: str | None = None  # "loop" (torch.mm per expert) or "grouped"; None: loop on CPU, grouped on CUDA
    expert_parallel: bool | None = None  # CPU, whole experts per thread; None: when the 3 thresholds below allow
    expert_parallel_min_experts: int = 4  # automatic: at least this many experts with tokens per thread, and
    expert_parallel_max_flops: float = 6e8  # a mean expert GEMM under this many FLOPs, or
    expert_parallel_max_imbalance: float = 0.03  # the busiest thread within this fraction of an even split
    grouped_below_rows_per_expert: int = 4  # CPU: one grouped_mm call below this many rows per expert (decoding)
    few_slots: int = 8  # up to this many routed slots without autograd: no sort, one GEMV pair per slot (decoding)
    short_row: int = 512  # few-slots down projections with rows this short: products + row sums, not MKL's GEMV
    short_row_max_elements: int = 1 << 20  # the largest float32 buffer those products use (4 MiB)


settings = DroplessSettings()


@contextlib.contextmanager
def configured(**changes):
    """Change fields of `settings` inside a `with` block (tests, benchmarks); unknown names raise."""
    previous = {name: getattr(settings, name) for name in changes}
    for name, value in changes.items():
        setattr(settings, name, value)
    try:
        yield settings
    finally:
        for name, value in previous.items():
            setattr(settings, name, value)


_WORKSPACE = threading.local()


def _workspace(name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) scratch buffer reused across calls on CPU, one per name, thread, dtype and device.

    Buffers of tens of megabytes come from mmap and pay one page fault per 4 KiB page at every call (about as long
    as the gather that fills them); reusing them avoids that. Only temporaries that never leave one forward or
    backward call live here, so nested or concurrent layers cannot see each other's data.
    """
    if like.device.type != "cpu":
        return like.new_empty(rows, cols)
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    # Tensors made under inference_mode may not be written outside it (and vice versa): keep separate buffers.
    key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = cache[key] = like.new_empty(rows * cols)
    return buffer[: rows * cols].view(rows, cols)


_POOL = {"executor": None, "workers": 0}


def _busiest_thread_rows(rows_per_expert: list[int], threads: int) -> int:
    """Rows of the busiest thread when every free thread takes the largest expert left (the queue's order)."""
    loads = [0] * threads
    for rows in sorted(rows_per_expert, reverse=True):
        loads[loads.index(min(loads))] += rows
    return max(loads)


def _expert_threads(device: torch.device, rows_per_expert: list[int], mean_gemm_flops: float) -> int:
    if device.type != "cpu" or settings.expert_parallel is False:
        return 1
    threads = torch.get_num_threads()
    active_experts = len(rows_per_expert)
    if threads <= 1:
        return 1
    if settings.expert_parallel is None:
        if active_experts < settings.expert_parallel_min_experts * threads:
            return 1
        if mean_gemm_flops > settings.expert_parallel_max_flops:
            even_split = sum(rows_per_expert) / threads
            limit = (1 + settings.expert_parallel_max_imbalance) * even_split
            if _busiest_thread_rows(rows_per_expert, threads) > limit:
                return 1
    return min(threads, active_experts)


def _executor(workers: int):
    if _POOL["executor"] is None or _POOL["workers"] != workers:
        if _POOL["executor"] is not None:
            _POOL["executor"].shutdown(wait=False)
        _POOL["executor"] = ThreadPoolExecutor(workers, thread_name_prefix="dropless-experts")
        _POOL["workers"] = workers
    return _POOL["executor"]


def _forget_pool_in_child():  # a forked child has the pool object but none of its threads
    _POOL["executor"], _POOL["workers"] = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _run_expert_parallel(gemm, slices, threads: int) -> None:
    # Every thread takes the next expert, largest first, from one shared queue: a thread that runs slower (a busy
    # core) takes fewer, which a fixed split by rows cannot do (measured: up to 17% apart at 2 threads).
    queue = collections.deque(sorted(slices, key=lambda item: item[1] - item[2]))  # popleft is thread-safe
    inference = torch.is_inference_mode_enabled()

    def run():
        # Grad and inference modes are thread-local: carry the caller's into the worker.
        with torch.inference_mode(inference), torch.no_grad():
            while True:
                try:
                    expert, start, end = queue.popleft()
                except IndexError:
                    return
                gemm(expert, start, end)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # process-wide: every GEMM of this call runs on one thread
    try:
        futures = [_executor(threads - 1).submit(run) for _ in range(threads - 1)]
        run()
        for future in futures:
            future.result()
    finally:
        torch.set_num_threads(previous)


def _gemm_backend(device: torch.device, dtype: torch.dtype, kept: int, active_experts: int) -> str:
    if settings.gemm_backend is not None:
        return settings.gemm_backend
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return "loop"
    if device.type == "cuda" or kept < settings.grouped_below_rows_per_expert * active_experts:
        return "grouped"
    return "loop"


class _Plan:
    """Where every kept slot goes: its sorted position, its token, the per-expert row ranges, and the bags
    (token-major lists of sorted positions) the weighted reduction sums over."""

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, dtype: torch.dtype):
        num_tokens, top_k = top_k_index.shape
        order_S, token_S, counts_E = sort_slots_by_expert(top_k_index, num_experts)
        counts = counts_E.tolist()  # the one host sync: buffer sizes and slice bounds
        self.counts = counts[:num_experts]
        self.kept = sum(self.counts)
        self.dropped = counts[num_experts]
        self.order_S = order_S[: self.kept]
        self.token_S = token_S[: self.kept]
        self.num_experts = num_experts
        active = sum(1 for count in self.counts if count)
        self.backend = backend = _gemm_backend(top_k_index.device, dtype, self.kept, active)
        self.device = top_k_index.device
        self.offsets_E = None
        if backend == "grouped":
            self.offsets_E = torch.cumsum(counts_E[:num_experts], 0, dtype=torch.int32)
        # Sorted position of every (token, slot) pair in token-major order; dropped slots sit at positions >= kept.
        position_S = torch.empty_like(order_S)
        position_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        if self.dropped:
            keep_S = top_k_index.reshape(-1) < num_experts
            self.bag_positions = position_S[keep_S]
            per_token = keep_S.view(num_tokens, top_k).sum(1)
            self.bag_offsets = torch.cumsum(per_token, 0) - per_token
            self.bag_keep = keep_S
        else:
            self.bag_positions = position_S
            self.bag_offsets = torch.arange(0, num_tokens * top_k, top_k, device=order_S.device)
            self.bag_keep = None

    def slices(self):
        start = 0
        for expert, count in enumerate(self.counts):
            if count:
                yield expert, start, start + count
            start += count

    def run_per_expert(self, gemm, flops_per_row: int) -> None:
        """Call gemm(expert, start, end) for every expert with rows: in this thread, each GEMM using all intra-op
        threads, or (CPU, many small experts) spread over threads with one single-threaded GEMM at a time."""
        slices = list(self.slices())
        mean_flops = 2 * flops_per_row * self.kept / max(len(slices), 1)
        threads = _expert_threads(self.device, [end - start for _, start, end in slices], mean_flops)
        if threads <= 1:
            for expert, start, end in slices:
                gemm(expert, start, end)
            return
        _run_expert_parallel(gemm, slices, threads)

    def reduce(self, rows_SH: torch.Tensor, weights_TK: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] = sum over t's kept slots j of weights[t, j] * rows[position of (t, j)]: one pass, no atomics."""
        per_sample = None
        if weights_TK is not None:
            per_sample = weights_TK.reshape(-1)
            if self.bag_keep is not None:
                per_sample = per_sample[self.bag_keep]
            per_sample = per_sample.to(rows_SH.dtype)
        if rows_SH.shape[0] == 0:  # nothing kept: embedding_bag refuses an empty table
            return rows_SH.new_zeros(self.bag_offsets.shape[0], rows_SH.shape[1])
        return F.embedding_bag(self.bag_positions, rows_SH, self.bag_offsets, mode="sum", per_sample_weights=per_sample)

    def mm(self, a_SK: torch.Tensor, weight_EKN, out_SN: torch.Tensor) -> torch.Tensor:
        """out[rows of e] = a[rows of e] @ weight[e] for every expert e; weight_EKN is [E, K, N] (views allowed)."""
        if self.backend == "grouped":
            return F.grouped_mm(a_SK, weight_EKN, offs=self.offsets_E, out_dtype=out_SN.dtype)
        self.run_per_expert(
            lambda expert, start, end: torch.mm(a_SK[start:end], weight_EKN[expert], out=out_SN[start:end]),
            flops_per_row=a_SK.shape[1] * out_SN.shape[1],
        )
        return out_SN

    def weight_grad(self, a_SM: torch.Tensor, b_SN: torch.Tensor, like_EMN: torch.Tensor) -> torch.Tensor:
        """grad[e] = a[rows of e]^T @ b[rows of e]; experts without rows get zeros."""
        if self.backend == "grouped":
            grad = F.grouped_mm(a_SM.t(), b_SN, offs=self.offsets_E, out_dtype=like_EMN.dtype)
        else:
            grad = torch.empty_like(like_EMN)
            self.run_per_expert(
                lambda expert, start, end: torch.mm(a_SM[start:end].t(), b_SN[start:end], out=grad[expert]),
                flops_per_row=a_SM.shape[1] * b_SN.shape[1],
            )
        idle = [expert for expert, count in enumerate(self.counts) if count == 0]
        if idle:
            grad[idle] = 0
        return grad


class DroplessExpertsFunction(torch.autograd.Function):
    """out[t] = sum_j w[t, j] * down_e(act(gate_e(x_t)) * up_e(x_t)) with e = index[t, j], for SwiGLU experts."""

    @staticmethod
    def forward(ctx, hidden_TH, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn):
        num_experts, intermediate = gate_up_proj.shape[0], down_proj.shape[-1]
        plan = _Plan(top_k_index, num_experts, hidden_TH.dtype)

        x_SH = _workspace("rows", plan.kept, hidden_TH.shape[1], hidden_TH)
        gate_up_S2I = x_SH.new_empty(plan.kept, 2 * intermediate)
        if plan.backend == "grouped":
            torch.index_select(hidden_TH, 0, plan.token_S, out=x_SH)
            gate_up_S2I = plan.mm(x_SH, gate_up_proj.transpose(1, 2), gate_up_S2I)
            act_SI = act_fn(gate_up_S2I[:, :intermediate]).mul_(gate_up_S2I[:, intermediate:])
            y_SH = plan.mm(act_SI, down_proj.transpose(1, 2), x_SH)  # x is not needed any more: reuse its buffer
        else:

            def expert_forward(expert, start, end):
                # One expert start to end while its rows are in cache: gather, gate/up, activation, down (the
                # output overwrites the expert's gathered rows, which are not needed any more).
                x_RH = torch.index_select(hidden_TH, 0, plan.token_S[start:end], out=x_SH[start:end])
                gate_up_R2I = torch.mm(x_RH, gate_up_proj[expert].t(), out=gate_up_S2I[start:end])
                act_RI = act_fn(gate_up_R2I[:, :intermediate]).mul_(gate_up_R2I[:, intermediate:])
                torch.mm(act_RI, down_proj[expert].t(), out=x_RH)

            plan.run_per_expert(expert_forward, flops_per_row=2 * intermediate * hidden_TH.shape[1])
            y_SH = x_SH
        acc_dtype = torch.promote_types(hidden_TH.dtype, torch.float32)
        if y_SH.dtype != acc_dtype:
            y_SH = y_SH.to(acc_dtype)  # bf16/fp16: sum the k expert outputs in float32
        out_TH = plan.reduce(y_SH, top_k_weights)

        ctx.save_for_backward(hidden_TH, top_k_weights, gate_up_S2I, gate_up_proj, down_proj)
        ctx.plan, ctx.act_fn = plan, act_fn
        return out_TH.to(hidden_TH.dtype)

    @staticmethod
    def backward(ctx, grad_out_TH):
        hidden_TH, top_k_weights, gate_up_S2I, gate_up_proj, down_proj = ctx.saved_tensors
        plan = ctx.plan
        needs = InputGrads(*ctx.needs_input_grad)
        dtype = hidden_TH.dtype
        acc_dtype = torch.promote_types(dtype, torch.float32)
        weights_S1 = top_k_weights.reshape(-1)[plan.order_S].to(acc_dtype).unsqueeze(-1)
        grad_y_SH = _workspace("rows", plan.kept, hidden_TH.shape[1], hidden_TH)
        grad_act_SI = _workspace("act", plan.kept, down_proj.shape[-1], hidden_TH)
        grad_gate_up_S2I = _workspace("gate_up", plan.kept, gate_up_S2I.shape[1], gate_up_S2I)
        grads = _backward_staged if plan.backend == "grouped" else _backward_per_expert
        grad_hidden_TH, grad_weights_S, grad_gate_up_proj, grad_down_proj = grads(
            plan,
            needs,
            ctx.act_fn,
            grad_out_TH.to(dtype),
            hidden_TH,
            weights_S1,
            gate_up_S2I,
            gate_up_proj,
            down_proj,
            grad_y_SH,
            grad_act_SI,
            grad_gate_up_S2I,
        )
        grad_top_k_weights = None
        if needs.weights:
            grad_flat = torch.zeros(top_k_weights.numel(), dtype=acc_dtype, device=grad_weights_S.device)
            grad_flat[plan.order_S] = grad_weights_S
            grad_top_k_weights = grad_flat.view(top_k_weights.shape).to(top_k_weights.dtype)
        return grad_hidden_TH, None, grad_top_k_weights, grad_gate_up_proj, grad_down_proj, None


def _backward_staged(
    plan,
    needs,
    act_fn,
    grad_out_TH,
    hidden_TH,
    weights_S1,
    gate_up_S2I,
    gate_up_proj,
    down_proj,
    grad_y_SH,
    grad_act_SI,
    grad_gate_up_S2I,
):
    """Each stage over all rows at once, the GEMMs grouped: the order for torch's grouped GEMM (CUDA)."""
    torch.index_select(grad_out_TH, 0, plan.token_S, out=grad_y_SH)
    grad_act_SI = plan.mm(grad_y_SH, down_proj, grad_act_SI)
    grad_down_proj = None

    def down_grad(weighted_act_SI):
        nonlocal grad_down_proj
        grad_down_proj = plan.weight_grad(grad_y_SH, weighted_act_SI, down_proj)

    grad_weights_S = swiglu_backward(
        grad_act_SI, gate_up_S2I, weights_S1, act_fn, grad_gate_up_S2I, needs.weights, down_grad if needs.down else None
    )
    grad_hidden_TH = None
    if needs.hidden:
        grad_x_SH = plan.mm(grad_gate_up_S2I, gate_up_proj, grad_y_SH)  # reuses grad_y's buffer
        grad_hidden_TH = _reduce_rows(plan, grad_x_SH, hidden_TH.dtype)
    grad_gate_up_proj = None
    if needs.gate_up:
        x_SH = torch.index_select(hidden_TH, 0, plan.token_S)
        grad_gate_up_proj = plan.weight_grad(grad_gate_up_S2I, x_SH, gate_up_proj)
    return grad_hidden_TH, grad_weights_S, grad_gate_up_proj, grad_down_proj


def _backward_per_expert(
    plan,
    needs,
    act_fn,
    grad_out_TH,
    hidden_TH,
    weights_S1,
    gate_up_S2I,
    gate_up_proj,
    down_proj,
    grad_y_SH,
    grad_act_SI,
    grad_gate_up_S2I,
):
    """Each expert start to end while its rows are in cache (CPU): gather, four GEMMs and the SwiGLU backward."""
    grad_weights_S = weights_S1.new_empty(plan.kept) if needs.weights else None
    grad_down_proj = torch.empty_like(down_proj) if needs.down else None
    grad_gate_up_proj = torch.empty_like(gate_up_proj) if needs.gate_up else None

    def expert_backward(expert, start, end):
        grad_y_RH = torch.index_select(grad_out_TH, 0, plan.token_S[start:end], out=grad_y_SH[start:end])
        grad_act_RI = torch.mm(grad_y_RH, down_proj[expert], out=grad_act_SI[start:end])
        grad_gate_up_R2I = grad_gate_up_S2I[start:end]

        def down_grad(weighted_act_RI):
            torch.mm(grad_y_RH.t(), weighted_act_RI, out=grad_down_proj[expert])

        grad_weights_R = swiglu_backward(
            grad_act_RI,
            gate_up_S2I[start:end],
            weights_S1[start:end],
            act_fn,
            grad_gate_up_R2I,
            needs.weights,
            down_grad if needs.down else None,
        )
        if grad_weights_R is not None:
            grad_weights_S[start:end] = grad_weights_R
        if needs.hidden:
            torch.mm(grad_gate_up_R2I, gate_up_proj[expert], out=grad_y_RH)  # grad_y is done: reuse its rows
        if needs.gate_up:
            x_RH = torch.index_select(hidden_TH, 0, plan.token_S[start:end])
            torch.mm(grad_gate_up_R2I.t(), x_RH, out=grad_gate_up_proj[expert])

    plan.run_per_expert(expert_backward, flops_per_row=gate_up_proj.shape[1] * gate_up_proj.shape[2])
    idle = [expert for expert, count in enumerate(plan.counts) if count == 0]
    for grad in (grad_down_proj, grad_gate_up_proj):
        if grad is not None and idle:
            grad[idle] = 0
    grad_hidden_TH = _reduce_rows(plan, grad_y_SH, hidden_TH.dtype) if needs.hidden else None
    return grad_hidden_TH, grad_weights_S, grad_gate_up_proj, grad_down_proj


def _reduce_rows(plan, grad_x_SH, dtype):
    """d/d(hidden): sum each token's rows, in float32 for bf16/fp16."""
    return plan.reduce(grad_x_SH.to(torch.promote_types(dtype, torch.float32))).to(dtype)


def _short_rows(matrix_ENK: torch.Tensor) -> bool:
    rows, row_length = matrix_ENK.shape[-2:]
    return (
        row_length <= settings.short_row
        and rows * row_length <= settings.short_row_max_elements
        and matrix_ENK.device.type == "cpu"
    )


def few_slots_forward(hidden_TH, top_k_index, top_k_weights, gate_up_proj, down_proj, act_fn):
    """Inference for a handful of tokens (decoding): per-call work is what costs there, not FLOPs, so read the
    routing on the host once and run each routed slot as matrix-vector products on its expert's weights only (a
    second slot of the same expert reads them from cache). Elementwise work runs once over all slots."""
    num_experts, intermediate = gate_up_proj.shape[0], down_proj.shape[-1]
    acc_dtype = torch.promote_types(hidden_TH.dtype, torch.float32)
    slots = [
        (token, expert, weight)
        for token, (experts, weights) in enumerate(zip(top_k_index.tolist(), top_k_weights.tolist()))
        for expert, weight in zip(experts, weights)
        if expert < num_experts  # the sentinel num_experts marks a capacity-dropped slot
    ]
    if not slots:
        return torch.zeros_like(hidden_TH)
    # torch.mm on one-row views: the GEMV-shaped GEMM that F.linear runs (torch.mv is 1.7x slower in bfloat16).
    gate_up_S2I = hidden_TH.new_empty(len(slots), 2 * intermediate)
    for slot, (token, expert, _) in enumerate(slots):
        torch.mm(hidden_TH[token : token + 1], gate_up_proj[expert].t(), out=gate_up_S2I[slot : slot + 1])
    act_SI = act_fn(gate_up_S2I[:, :intermediate]).mul_(gate_up_S2I[:, intermediate:])
    weights_S1 = torch.tensor([weight for _, _, weight in slots], dtype=acc_dtype).to(hidden_TH.device)[:, None]
    y_SH = torch.empty(len(slots), hidden_TH.shape[1], dtype=acc_dtype, device=hidden_TH.device)
    if _short_rows(down_proj):
        # y[s] = down[e_s] @ (w_s * act[s]): one expert's products at a time, then the row sums.
        weighted_act_SI = act_SI.to(acc_dtype).mul_(weights_S1)
        products_HI = _workspace("few_slots", down_proj.shape[1], intermediate, y_SH)
        for slot, (_, expert, _) in enumerate(slots):
            torch.sum(torch.mul(down_proj[expert], weighted_act_SI[slot], out=products_HI), -1, out=y_SH[slot])
    else:
        expert_out_SH = hidden_TH.new_empty(len(slots), hidden_TH.shape[1])
        for slot, (_, expert, _) in enumerate(slots):
            torch.mm(act_SI[slot : slot + 1], down_proj[expert].t(), out=expert_out_SH[slot : slot + 1])
        y_SH = torch.mul(expert_out_SH, weights_S1, out=y_SH)
    if hidden_TH.shape[0] == 1:
        return y_SH.sum(0, keepdim=True).to(hidden_TH.dtype)
    tokens_S = torch.tensor([token for token, _, _ in slots], device=hidden_TH.device)
    out_TH = torch.zeros(hidden_TH.shape, dtype=acc_dtype, device=hidden_TH.device)
    return out_TH.index_add_(0, tokens_S, y_SH).to(hidden_TH.dtype)


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def dropless_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Experts-interface entry point: `self` is an experts module with fused `gate_up_proj [E, 2I, H]` and
    `down_proj [E, H, I]` (transformers v5 layout, no bias). Slots whose index is `num_experts` are skipped."""
    check_experts_layout(self, "dropless")
    if torch.compiler.is_compiling():
        # Sizes read on the host (our plan, the few-slots path) break a compiled graph; transformers' grouped-GEMM
        # path sorts and multiplies with device-side offsets only, and is just as dropless.
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    arguments = (hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, self.act_fn)
    if top_k_index.numel() <= settings.few_slots and not _needs_autograd(
        hidden_states, top_k_weights, self.gate_up_proj, self.down_proj
    ):
        return few_slots_forward(*arguments)
    return DroplessExpertsFunction.apply(*arguments)


def register_dropless_experts():
    """Make 'dropless' a valid `experts_implementation` for every transformers MoE model in this process."""
    ALL_EXPERTS_FUNCTIONS.register("dropless", dropless_experts_forward)


register_dropless_experts()
