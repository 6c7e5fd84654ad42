"""Distillation from a dense teacher: the chunked KL equals the plain formula in value and gradient, a teacher
equal to the student adds nothing (zero KL, the same gradients), and `llama-moe train --distill_from` logs it
and refuses a teacher with another vocabulary before any work."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from llama_moe.training.distillation import Distiller, kl_to_teacher
from tests.conftest import tiny_moe_config
from tests.training.helpers import log_history, run_train, train_args


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_matches_the_formula(temperature):
    generator = torch.Generator().manual_seed(0)
    N, H, V = 37, 8, 50
    student = torch.randn(N, V, generator=generator, requires_grad=True)
    hidden = torch.randn(N, H, generator=generator)
    head = torch.randn(V, H, generator=generator)
    mask = (torch.rand(N, generator=generator) > 0.2).float()
    got = kl_to_teacher(student, hidden, head, mask, temperature, chunk=8)
    (grad_got,) = torch.autograd.grad(got, student)

    log_teacher = F.log_softmax(hidden @ head.T / temperature, -1)
    log_student = F.log_softmax(student / temperature, -1)
    expected = ((log_teacher.exp() * (log_teacher - log_student)).sum(-1) * mask).sum()
    (grad_expected,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad_got, grad_expected)


def _fake_trainer(model, distiller):
    return types.SimpleNamespace(
        model=model,
        model_accepts_loss_kwargs=True,
        current_gradient_accumulation_steps=1,
        args=types.SimpleNamespace(average_tokens_across_devices=False),
        moe_logging=None,
        accelerator=types.SimpleNamespace(num_processes=1),
        distiller=distiller,
        _router_metrics={"aux_loss": [], "z_loss": [], "distill_loss": []},
    )


def test_teacher_equal_to_student_changes_nothing():
    from llama_moe.modeling import LlamaMoEForCausalLM
    from llama_moe.training.trainer import MoETrainer

    model = LlamaMoEForCausalLM(tiny_moe_config(output_router_logits=True)).train()
    ids = torch.randint(0, 128, (2, 16))
    inputs = {"input_ids": ids, "labels": ids}
    count = torch.tensor(30)

    def gradients(distiller):
        model.zero_grad()
        fake = _fake_trainer(model, distiller)
        loss = MoETrainer.compute_loss(fake, model, dict(inputs), num_items_in_batch=count)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], fake

    plain_loss, plain_grads, _ = gradients(None)
    teacher = copy.deepcopy(model).eval()
    distilled_loss, distilled_grads, fake = gradients(Distiller(teacher, weight=1.0, temperature=2.0))
    assert fake._router_metrics["distill_loss"][0].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(distilled_loss, plain_loss)
    for got, expected in zip(distilled_grads, plain_grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_distillation_pulls_the_student_towards_the_teacher():
    from llama_moe.modeling import LlamaMoEForCausalLM

    torch.manual_seed(1)
    teacher = LlamaMoEForCausalLM(tiny_moe_config())
    torch.manual_seed(2)
    student = LlamaMoEForCausalLM(tiny_moe_config())
    distiller = Distiller(teacher, weight=1.0, temperature=1.0)
    ids = torch.randint(0, 128, (2, 16))
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    kls = []
    for _ in range(20):
        kl, count = distiller.kl_sum({"input_ids": ids}, student(ids).logits)
        kls.append((kl / count).item())
        optimizer.zero_grad()
        (kl / count).backward()
        optimizer.step()
    assert kls[-1] < 0.5 * kls[0]


def test_train_with_distillation_logs_it(tiny_model_dir, corpora, tmp_path):
    out = tmp_path / "run"
    assert run_train(train_args(tiny_model_dir, corpora, out, 3, distill_from=tiny_model_dir, distill_weight=0.5)) == 0
    history = log_history(out / "checkpoint-3")
    distill = [entry["distill_loss"] for entry in history if "distill_loss" in entry]
    assert len(distill) == 3
    assert distill[0] == pytest.approx(0.0, abs=1e-5)  # the teacher is the starting student
    assert distill[-1] > 0


def test_teacher_with_another_vocabulary_is_refused(tiny_model_dir, tokenizer_dir, corpora, tmp_path, capsys):
    from tests.training.conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other", tokenizer_dir, vocab_size=500)
    code = run_train(train_args(tiny_model_dir, corpora, tmp_path / "run", 2, distill_from=other))
    assert code == 2
    assert "vocabulary of 500 tokens, the student 384" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bfloat16_teacher_gives_nearly_the_float32_kl_and_a_bad_dtype_is_refused(
    tiny_model_dir, corpora, tmp_path, capsys
):
    from llama_moe.training.arguments import parse_arguments
    from llama_moe.training.run import load_teacher

    flags = train_args(tiny_model_dir, corpora, tmp_path / "run", 1, distill_from=tiny_model_dir)
    teachers = {
        dtype: load_teacher(*parse_arguments(flags + ["--distill_dtype", dtype])) for dtype in ("auto", "bfloat16")
    }
    assert next(teachers["auto"].teacher.parameters()).dtype == torch.float32
    assert next(teachers["bfloat16"].teacher.parameters()).dtype == torch.bfloat16
    torch.manual_seed(0)
    ids = torch.randint(0, 384, (2, 16))
    student_logits = torch.randn(2, 16, 384)
    kl = {dtype: distiller.kl_sum({"input_ids": ids}, student_logits)[0] for dtype, distiller in teachers.items()}
    assert kl["bfloat16"].dtype == torch.float32
    assert kl["bfloat16"].item() == pytest.approx(kl["auto"].item(), rel=2e-2)

    assert run_train(flags + ["--distill_dtype", "int8"]) == 2
    assert "--distill_dtype must be one of auto, float32, bfloat16, float16, got 'int8'" in capsys.readouterr().err
