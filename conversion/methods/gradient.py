"""`gradient`: LLaMA-MoE's gradient-importance construction (Sharing-Inner; Sharing-Inter with shared experts).

Not implemented yet: the name is registered so that --help lists it and choosing it fails with a clear message
before any work. Must not silently fall back to another method.
"""

from .base import UpcycleMethod


class GradientMethod(UpcycleMethod):
    name = "gradient"
    summary = "LLaMA-MoE gradient-importance experts from calibration text (not implemented yet)"
    supports_shared_experts = True

    def check(self, dense_config, options) -> None:
        raise ValueError(
            "--method gradient is not implemented yet in this version of llama-moe; use random or clustering "
            "(LLaMA-MoE's other splits) or copy."
        )
