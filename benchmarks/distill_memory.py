"""Peak memory of the distillation KL (forward + backward) against vocabulary size: chunked (ours) vs plain.

Each case runs in a fresh process that holds the student logits [tokens, V] with their gradient (what the
language-model loss needs anyway) and measures how much the peak resident memory grows during one KL forward and
backward beyond that. Any loss on the logits returns a gradient of their size; what the chunked KL needs besides
that should not depend on the vocabulary. Plain = log_softmax of the full teacher and student logits, as a
straightforward implementation writes it. Measures; asserts nothing.
Run: python benchmarks/distill_memory.py [--tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CASE = r"""
import json, resource, sys
import torch
import torch.nn.functional as F
from llama_moe.training.distillation import kl_to_teacher

mode, tokens, vocab, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
student = torch.randn(tokens, vocab, requires_grad=True)
teacher_hidden, head = torch.randn(tokens, hidden), torch.randn(vocab, hidden) / hidden**0.5
mask = torch.ones(tokens)
student.grad = torch.ones_like(student)  # the LM loss gradient exists anyway (written, so resident)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "chunked":
    loss = kl_to_teacher(student, teacher_hidden, head, mask)
else:
    log_teacher = F.log_softmax(teacher_hidden @ head.T, -1)
    log_student = F.log_softmax(student, -1)
    loss = (log_teacher.exp() * (log_teacher - log_student)).sum()
loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (after - before) / 1024, "logits_mb": student.numel() * 4 / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocabs", default="32000,49152,128256")
    args = parser.parse_args()
    print(
        "| vocabulary | student logits (MB) | extra peak, chunked (MB) | chunked minus its returned gradient (MB) "
        "| extra peak, plain (MB) |"
    )
    print("|---|---|---|---|---|")
    for vocab in (int(v) for v in args.vocabs.split(",")):
        row = {}
        for mode in ("chunked", "plain"):
            out = subprocess.run(
                [sys.executable, "-c", CASE, mode, str(args.tokens), str(vocab), str(args.hidden)],
                capture_output=True,
                text=True,
                check=True,
            )
            row[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        chunked, logits = row["chunked"]["extra_mb"], row["chunked"]["logits_mb"]
        print(
            f"| {vocab} | {logits:.0f} | {chunked:.0f} | {chunked - logits:.0f} | {row['plain']['extra_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    resource.getrusage(resource.RUSAGE_SELF)
    main()
