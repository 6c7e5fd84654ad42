"""Configuration of LlamaMoE: every Llama field plus the Mixture-of-Experts options.

Part of the remote-code bundle copied into every checkpoint: imports only torch, transformers and its
siblings (single-dot imports). Validation raises ValueError naming the field, the bad value and the fix.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

ROUTER_TYPES = ("linear", "mlp")
ROUTER_NOISE_TYPES = ("none", "jitter", "noisy_topk")
AUX_LOSS_TYPES = ("switch", "cv2")


@strict
class LlamaMoEConfig(LlamaConfig):
    r"""
    A Llama decoder whose feed-forward blocks are (some or all) Mixture-of-Experts layers.

    Llama fields (GQA through `num_key_value_heads`, `rope_parameters` with Llama 3.1 `llama3` scaling,
    `tie_word_embeddings`, `attention_bias`, ...) keep their Llama meaning. MoE fields:

    num_local_experts (`int`, alias `num_experts`): routed experts per MoE layer.
    num_experts_per_tok (`int`): experts each token is routed to (top-k).
    moe_intermediate_size (`int`, defaults to `intermediate_size`): width of one routed expert.
    moe_layers (`list[int]`, defaults to every layer): which decoder layers are MoE; the others keep a dense
        Llama MLP of width `intermediate_size`.
    router_type (`"linear"` or `"mlp"`): one linear layer, or LLaMA-MoE's `Linear(H, E) -> Tanh -> Linear(E, E)`.
    norm_topk_prob (`bool`): `True` takes the top-k softmax probabilities and renormalizes them (Mixtral,
        LLaMA-MoE); `False` keeps them as they are (softmax then top-k, as NVIDIA's upcycling paper prefers).
    routed_scaling_factor (`float`): multiplies the combined routed output (LLaMA-MoE's score scale factor).
    router_temperature (`float`): router logits are divided by it before the softmax. Exports fold it into the
        router weights, so it changes no computation; it changes training: fitted routers (`--router-init fit`)
        keep weights of the usual size (Adam moves them at the usual relative rate) while their softmax stays
        nearly flat, so the chosen experts keep weights close to equal, as inside the dense FFN.
    router_noise (`"none"`, `"jitter"` or `"noisy_topk"`): training-time noise. `jitter` multiplies the router
        input by U(1-eps, 1+eps) with eps = `router_jitter_noise`; `noisy_topk` is LLaMA-MoE's learnable noisy
        gate, adding N(0, softplus(x W_noise) + `router_noise_epsilon`) to the logits.
    shared_expert_intermediate_size (`int`, 0 = none): width of an always-on shared expert.
    shared_expert_gate (`bool`): scale the shared expert by sigmoid(x w), as Qwen2-MoE does.
    router_aux_loss_coef (`float`): weight of the load-balancing loss added to `loss` when labels are given
        and `output_router_logits` is on, per MoE layer (Switch, LLaMA-MoE and Megatron's convention; `aux_loss`
        reports the mean over layers).
    aux_loss_type (`"switch"` or `"cv2"`): Switch/Mixtral load balancing, or LLaMA-MoE's squared coefficient
        of variation of importance and load.
    router_z_loss_coef (`float`): weight of the router z-loss (ST-MoE), per MoE layer as well.
    capacity_factor (`float` or `None`): `None` is dropless. A number caps each expert at
        `ceil(capacity_factor * tokens * top_k / num_experts)` token slots; slots over the cap skip that
        expert and the token keeps only its residual for that slot.
    """

    model_type = "llama_moe"
    attribute_map = {"num_experts": "num_local_experts"}

    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    moe_layers: list[int] | None = None
    router_type: str = "linear"
    norm_topk_prob: bool = True
    routed_scaling_factor: float | int = 1.0
    router_temperature: float | int = 1.0
    router_noise: str = "none"
    router_jitter_noise: float | int = 0.0
    router_noise_epsilon: float | int = 1e-2
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    router_aux_loss_coef: float | int = 0.01
    aux_loss_type: str = "switch"
    router_z_loss_coef: float | int = 0.0
    output_router_logits: bool = False
    capacity_factor: float | int | None = None

    def __post_init__(self, **kwargs):
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.moe_layers is None:
            self.moe_layers = list(range(self.num_hidden_layers))
        self.moe_layers = sorted(set(int(i) for i in self.moe_layers))
        self._validate_moe_fields()
        super().__post_init__(**kwargs)

    def _validate_moe_fields(self):
        positive = {
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"LlamaMoEConfig.{name} must be > 0, got {value}.")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"LlamaMoEConfig.num_experts_per_tok ({self.num_experts_per_tok}) is larger than "
                f"num_local_experts ({self.num_local_experts}): pick top-k <= the number of experts."
            )
        bad_layers = [i for i in self.moe_layers if not 0 <= i < self.num_hidden_layers]
        if bad_layers:
            raise ValueError(
                f"LlamaMoEConfig.moe_layers has indices {bad_layers} outside the model's "
                f"{self.num_hidden_layers} layers (valid: 0..{self.num_hidden_layers - 1})."
            )
        for name, value, allowed in (
            ("router_type", self.router_type, ROUTER_TYPES),
            ("router_noise", self.router_noise, ROUTER_NOISE_TYPES),
            ("aux_loss_type", self.aux_loss_type, AUX_LOSS_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"LlamaMoEConfig.{name}={value!r} is unknown; choose one of {list(allowed)}.")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(
                "LlamaMoEConfig.shared_expert_intermediate_size must be >= 0 (0 means no shared expert), "
                f"got {self.shared_expert_intermediate_size}."
            )
        if self.shared_expert_gate and self.shared_expert_intermediate_size == 0:
            raise ValueError(
                "LlamaMoEConfig.shared_expert_gate=True needs a shared expert: set shared_expert_intermediate_size > 0."
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"LlamaMoEConfig.capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}."
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "router_noise_epsilon"):
            if getattr(self, name) < 0:
                raise ValueError(f"LlamaMoEConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.router_temperature <= 0:
            raise ValueError(f"LlamaMoEConfig.router_temperature must be > 0, got {self.router_temperature}.")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"LlamaMoEConfig.routed_scaling_factor must be > 0, got {self.routed_scaling_factor}.")

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers

    # Parallel plans follow transformers' MoE models (Mixtral, Qwen2-MoE): attention, dense MLPs and the shared
    # expert split over tensor-parallel ranks; routed experts whole per expert-parallel rank (`ep_size`); the router
    # replicated. Properties, because which entries exist depends on the layout: transformers checks that every entry
    # names a module of the model.
    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        plan = {
            "layers.*.self_attn.q_proj": "colwise",
            "layers.*.self_attn.k_proj": "colwise",
            "layers.*.self_attn.v_proj": "colwise",
            "layers.*.self_attn.o_proj": "rowwise",
        }
        prefixes = ["layers.*.mlp."] if len(self.moe_layers) < self.num_hidden_layers else []
        if self.shared_expert_intermediate_size > 0:
            prefixes.append("layers.*.mlp.shared_expert.")
        for prefix in prefixes:
            plan.update(
                {prefix + "gate_proj": "colwise", prefix + "up_proj": "colwise", prefix + "down_proj": "rowwise"}
            )
        return plan

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        return {
            "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
            "layers.*.mlp.experts.down_proj": "grouped_gemm",
            "layers.*.mlp.experts": "ep_dispatch_experts",
        }


__all__ = ["LlamaMoEConfig"]
