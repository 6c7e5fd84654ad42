"""The routed experts' output scale, fitted on calibration tokens (LLaMA-MoE v1's calibrated score scale, CMoE):
the layer's routed output is multiplied by the least-squares factor c that brings the MoE layer's output closest to
the dense FFN's on the calibration inputs, min_c ||dense(x) - shared(x) - c * routed(x)||^2. With top-k of pieces
of one FFN, the chosen experts miss the contributions of the others; c compensates the part of those that points
the same way. With every expert chosen, routed = dense - shared and c = 1. Folded into the experts' down
projections, so configs and exports need nothing new. Must not choose experts or fit routers.

Measured on SmolLM2-135M, carve 4 of 8 (held-out perplexity at initialization, 4096 tokens per domain): the fixed
scale k gives 5.18x / 3.90x the dense model, this fit 6.62x / 4.61x, and matching output norms instead (c =
||dense - shared|| / ||routed||, LLaMA-MoE v1's norm ratio) 7.22x / 4.89x: the smallest output error is not the
best next-token distribution. So carve offers it (`--output-scale fit`) and defaults to k.
"""

import torch

TOKEN_CHUNK = 4096


@torch.no_grad()
def routed_output_scale(block, ffn) -> float:
    """c for one MoE block (float32, as the model will run it) against its dense FFN (conversion DenseFFN with
    `inputs`)."""
    numerator = denominator = 0.0
    for x_TH in ffn.inputs.split(TOKEN_CHUNK):
        shared_TH = block.shared_output(x_TH)
        routed_TH = block(x_TH) - shared_TH
        target_TH = ffn.output(x_TH) - shared_TH
        numerator += float((target_TH.double() * routed_TH.double()).sum())
        denominator += float(routed_TH.double().pow(2).sum())
    return numerator / denominator if denominator > 0 else 1.0
