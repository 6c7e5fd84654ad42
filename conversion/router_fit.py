"""Routers fitted on calibration activations (`--router-init fit`): each router row predicts, linearly from the
FFN input, how much its expert contributes to that token's output, so top-k picks the experts that matter.

The fit is ridge least squares from the inputs X [T, H] to the experts' output norms [T, E]; the rows are then
scaled so that the logits of one token differ little across experts, which makes renormalized top-k weights
nearly equal (the experts are pieces of one FFN: each chosen piece should count fully). Must not choose experts.
"""

import torch
import torch.nn.functional as F

# Spread (std over experts, averaged over tokens) of the fitted logits: softmax weights of the chosen experts
# then stay within about +-10% of equal, and training can still move them.
LOGIT_SPREAD = 0.25
RIDGE = 1e-3
TOKEN_CHUNK = 4096


def expert_output_norms(gate_up_EFH: torch.Tensor, down_EHW: torch.Tensor, inputs_TH: torch.Tensor) -> torch.Tensor:
    """[T, E] norm of each SwiGLU expert's output for each token (computed in token chunks)."""
    norms = []
    for x_TH in inputs_TH.split(TOKEN_CHUNK):
        per_expert = []
        for gate_up_FH, down_HW in zip(gate_up_EFH, down_EHW):
            gate_TW, up_TW = F.linear(x_TH, gate_up_FH.float()).chunk(2, dim=-1)
            per_expert.append(F.linear(F.silu(gate_TW) * up_TW, down_HW.float()).norm(dim=-1))
        norms.append(torch.stack(per_expert, dim=1))
    return torch.cat(norms)


def least_squares_rows(inputs_TH: torch.Tensor, targets_TE: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """[E, H] rows W minimizing ||X W^T - S||^2 + ridge * mean(diag(X^T X)) * ||W||^2 (no bias: routers have none,
    and a softmax ignores what is common to all experts)."""
    x_TH = inputs_TH.double()
    gram_HH = x_TH.T @ x_TH
    gram_HH += ridge * gram_HH.diagonal().mean() * torch.eye(gram_HH.shape[0], dtype=gram_HH.dtype)
    return torch.linalg.solve(gram_HH, x_TH.T @ targets_TE.double()).T.float()


def fit_router(gate_up_EFH, down_EHW, inputs_TH: torch.Tensor, spread: float | None = None) -> torch.Tensor:
    """Router rows [E, H] whose logits rank the experts by their predicted contribution."""
    spread = LOGIT_SPREAD if spread is None else spread
    targets_TE = expert_output_norms(gate_up_EFH, down_EHW, inputs_TH)
    rows_EH = least_squares_rows(inputs_TH, targets_TE)
    logits_TE = inputs_TH @ rows_EH.T
    current = logits_TE.std(dim=1).mean().clamp(min=1e-12)
    return rows_EH * (spread / current)
