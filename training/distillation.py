"""Distillation from a frozen teacher (usually the dense model an MoE was upcycled from): a KL term between the
teacher's and the student's next-token distributions on the same batch.

The KL is computed in chunks of tokens and recomputed in backward, so besides the student's own logits (which
the language-model loss needs anyway) memory holds only one chunk of teacher logits and the teacher's final
hidden states, whatever the vocabulary size. Must not load models or touch the optimizer (run.py, trainer.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one chunk of logits (64 MiB in float32): 512 tokens at a 32k vocabulary, 128 at 128k. A few float32
# tensors of this size are alive at once, whatever the vocabulary and the batch.
CHUNK_ELEMENTS = 1 << 24


def _chunk_probabilities(student_CV, teacher_hidden_CH, teacher_head_VH, temperature: float):
    log_student = F.log_softmax(student_CV.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(F.linear(teacher_hidden_CH, teacher_head_VH).float() / temperature, dim=-1)
    return log_student, log_teacher


class ChunkedKLDivergence(torch.autograd.Function):
    """sum_t mask_t * KL(teacher_t || student_t) at a temperature; student logits [N, V], teacher final hidden
    states [N, H] and output matrix [V, H]. Backward recomputes each chunk: d/ds = mask (p_s - p_t) / T."""

    @staticmethod
    def forward(ctx, student_NV, teacher_hidden_NH, teacher_head_VH, mask_N, temperature, chunk):
        total = torch.zeros((), dtype=torch.float32, device=student_NV.device)
        for start in range(0, student_NV.shape[0], chunk):
            part = slice(start, start + chunk)
            log_student, log_teacher = _chunk_probabilities(
                student_NV[part], teacher_hidden_NH[part], teacher_head_VH, temperature
            )
            kl_C = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
            total += (kl_C * mask_N[part]).sum()
        ctx.save_for_backward(student_NV, teacher_hidden_NH, teacher_head_VH, mask_N)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        student_NV, teacher_hidden_NH, teacher_head_VH, mask_N = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        grad_NV = torch.empty_like(student_NV)
        for start in range(0, student_NV.shape[0], chunk):
            part = slice(start, start + chunk)
            log_student, log_teacher = _chunk_probabilities(
                student_NV[part], teacher_hidden_NH[part], teacher_head_VH, temperature
            )
            scale_C1 = (grad_total * mask_N[part] / temperature)[:, None]
            grad_NV[part] = ((log_student.exp() - log_teacher.exp()) * scale_C1).to(grad_NV.dtype)
        return grad_NV, None, None, None, None, None


def kl_to_teacher(
    student_logits_NV, teacher_hidden_NH, teacher_head_VH, mask_N, temperature: float = 1.0, chunk: int | None = None
) -> torch.Tensor:
    """Sum over the masked tokens of KL(teacher || student) at `temperature` (differentiable in the student);
    `chunk` tokens at a time (default: CHUNK_ELEMENTS worth of logits)."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // student_logits_NV.shape[-1])
    return ChunkedKLDivergence.apply(
        student_logits_NV, teacher_hidden_NH.detach(), teacher_head_VH.detach(), mask_N.float(), temperature, chunk
    )


class Distiller:
    """A frozen teacher and the KL term of one batch. `weight * temperature**2 * KL` is added to the loss (the
    squared temperature keeps the gradient scale independent of it, as in Hinton et al.)."""

    def __init__(self, teacher, weight: float, temperature: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature

    @property
    def scale(self) -> float:
        return self.weight * self.temperature**2

    @torch.no_grad()
    def teacher_hidden_states(self, inputs: dict) -> torch.Tensor:
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        keep = (
            "input_ids",
            "attention_mask",
            "position_ids",
            "cu_seq_lens_q",
            "cu_seq_lens_k",
            "max_length_q",
            "max_length_k",
        )
        outputs = self.teacher.get_decoder()(**{k: v for k, v in inputs.items() if k in keep}, use_cache=False)
        return outputs.last_hidden_state

    def kl_sum(self, inputs: dict, student_logits_BSV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL summed over the tokens that have a next-token label, their count) for one batch."""
        hidden_BSH = self.teacher_hidden_states(inputs)
        labels = inputs.get("labels", inputs["input_ids"])
        mask_BS = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        mask_BS[:, :-1] = (labels[:, 1:] != -100).float()  # position i predicts token i + 1, as the LM loss
        vocab = student_logits_BSV.shape[-1]
        head_VH = self.teacher.get_output_embeddings().weight
        total = kl_to_teacher(
            student_logits_BSV.reshape(-1, vocab),
            hidden_BSH.reshape(-1, hidden_BSH.shape[-1]),
            head_VH,
            mask_BS.reshape(-1),
            self.temperature,
        )
        return total, mask_BS.sum()
