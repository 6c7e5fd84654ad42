"""LlamaMoE: a Llama decoder whose feed-forward blocks are dropless sparse Mixture-of-Experts layers.

Attention, RMSNorm, rotary embedding and the dense MLP are transformers' own Llama modules; this file adds
the router, the experts (transformers v5 fused layout, wired into the experts interface with our "dropless"
kernel as default), the MoE block, the router losses and the model classes. Part of the remote-code bundle:
imports only torch, transformers and its siblings, so a saved checkpoint loads without llama_moe installed.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_llama_moe import LlamaMoEConfig
from .dropless_moe import dropless_experts_forward  # noqa: F401  (importing registers "dropless")
from .triton_moe import triton_experts_forward  # noqa: F401  (importing registers "dropless_triton")

DEFAULT_EXPERTS_IMPLEMENTATION = "dropless"


@use_experts_implementation
class LlamaMoEExperts(nn.Module):
    """Routed SwiGLU experts as two fused 3-D tensors. `forward` is the plain per-expert loop ("eager"), the
    reference every faster implementation is tested against."""

    def __init__(self, config: LlamaMoEConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_TH = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for expert in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == expert)  # capacity-dropped slots hold num_experts
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            final_TH.index_add_(0, token_idx, out.float() * top_k_weights[token_idx, slot, None].float())
        return final_TH.to(hidden_states.dtype)


class LlamaMoETopKRouter(nn.Module):
    """The linear router, and the base of every router: scores experts for each token in float32 and returns
    (router_logits, top_k_weights, top_k_index). A variant overrides `scores` (how logits are computed), adds its
    training-time noise with `perturb_input` / `perturb_logits`, and initializes what it owns in `init_weights`;
    `router_class(config)` picks the variant from `router_type` and `router_noise`. Parameter names are the state
    dict's contract: `weight`, `out_weight` (mlp), `noise_weight` (noisy top-k)."""

    def __init__(self, config: LlamaMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.temperature = float(config.router_temperature)
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def scores(self, x_TH: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TH, self.weight.float())

    def perturb_input(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """Training only: noise on the router's input (none here)."""
        return hidden_TH

    def perturb_logits(self, x_TH: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
        """Training only: noise on the (temperature-scaled) logits (none here)."""
        return logits_TE

    def init_weights(self, std: float) -> None:
        init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, hidden_TH: torch.Tensor):
        if self.training:
            hidden_TH = self.perturb_input(hidden_TH)
        x_TH = hidden_TH.float()
        logits_TE = self.scores(x_TH)
        if self.temperature != 1.0:
            logits_TE = logits_TE / self.temperature
        if self.training:
            logits_TE = self.perturb_logits(x_TH, logits_TE)
        probs_TE = F.softmax(logits_TE, dim=-1)
        top_k_weights, top_k_index = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits_TE, top_k_weights, top_k_index


class LlamaMoEMLPRouter(LlamaMoETopKRouter):
    """LLaMA-MoE's released gate: Linear(H, E) -> Tanh -> Linear(E, E)."""

    def __init__(self, config: LlamaMoEConfig):
        super().__init__(config)
        self.out_weight = nn.Parameter(torch.empty(self.num_experts, self.num_experts))

    def scores(self, x_TH):
        return F.linear(torch.tanh(super().scores(x_TH)), self.out_weight.float())

    def init_weights(self, std):
        super().init_weights(std)
        init.normal_(self.out_weight, mean=0.0, std=std)


class JitterNoise:
    """Router mixin: in training, multiply the router's input by U(1 - eps, 1 + eps) (`router_jitter_noise`)."""

    def __init__(self, config: LlamaMoEConfig):
        super().__init__(config)
        self.jitter_noise = float(config.router_jitter_noise)

    def perturb_input(self, hidden_TH):
        hidden_TH = super().perturb_input(hidden_TH)
        if self.jitter_noise <= 0:
            return hidden_TH
        return hidden_TH * torch.empty_like(hidden_TH).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)


class NoisyTopKNoise:
    """Router mixin: LLaMA-MoE's learnable noisy gate, adding N(0, softplus(x W_noise) + eps) to the logits in
    training. W_noise starts at zero, so a new router starts with the smallest noise."""

    def __init__(self, config: LlamaMoEConfig):
        super().__init__(config)
        self.noise_weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.noise_epsilon = config.router_noise_epsilon

    def perturb_logits(self, x_TH, logits_TE):
        logits_TE = super().perturb_logits(x_TH, logits_TE)
        noise_std_TE = F.softplus(F.linear(x_TH, self.noise_weight.float())) + self.noise_epsilon
        return logits_TE + torch.randn_like(logits_TE) * noise_std_TE

    def init_weights(self, std):
        super().init_weights(std)
        init.zeros_(self.noise_weight)


ROUTERS = {"linear": LlamaMoETopKRouter, "mlp": LlamaMoEMLPRouter}
ROUTER_NOISES = {"none": None, "jitter": JitterNoise, "noisy_topk": NoisyTopKNoise}
_COMBINED_ROUTERS: dict[tuple[str, str], type] = {}


def router_class(config: LlamaMoEConfig) -> type[LlamaMoETopKRouter]:
    """The router for `router_type` with the noise of `router_noise` mixed in."""
    key = (config.router_type, config.router_noise)
    if key not in _COMBINED_ROUTERS:
        scores, noise = ROUTERS[config.router_type], ROUTER_NOISES[config.router_noise]
        name = scores.__name__ if noise is None else noise.__name__.replace("Noise", "") + scores.__name__
        _COMBINED_ROUTERS[key] = scores if noise is None else type(name, (noise, scores), {})
    return _COMBINED_ROUTERS[key]


def limit_expert_capacity(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, capacity: int):
    """Keep at most `capacity` slots per expert, first choices before second choices, earlier tokens first.
    Dropped slots get the sentinel index `num_experts` and weight 0: they skip the expert (residual only)."""
    num_tokens, top_k = top_k_index.shape
    slot_major_S = top_k_index.t().reshape(-1)
    position_S = (F.one_hot(slot_major_S, num_experts).cumsum(0) - 1).gather(1, slot_major_S[:, None]).squeeze(1)
    keep_TK = (position_S < capacity).view(top_k, num_tokens).t()
    return top_k_index.masked_fill(~keep_TK, num_experts), top_k_weights.masked_fill(~keep_TK, 0.0)


class LlamaMoEMLP(nn.Module):
    """A SwiGLU feed-forward of a given width; the always-on shared expert."""

    def __init__(self, config: LlamaMoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaMoESparseMoeBlock(nn.Module):
    """Router + routed experts (+ optional shared expert). Remembers the last forward's expert load."""

    def __init__(self, config: LlamaMoEConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.capacity_factor = config.capacity_factor
        self.gate = router_class(config)(config)
        self.experts = LlamaMoEExperts(config)
        if self.capacity_factor is not None:
            # transformers' own backends skip sentinel (dropped) slots only in this mode.
            self.experts._is_expert_parallel = True
        self.shared_expert = (
            LlamaMoEMLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_intermediate_size > 0
            else None
        )
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        # The last forward's expert load: buffers, so they follow the module's device; not saved with the weights.
        self.register_buffer("last_tokens_per_expert", None, persistent=False)
        self.register_buffer("last_dropped_slots", None, persistent=False)

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_shape = hidden_states.shape
        hidden_TH = hidden_states.reshape(-1, input_shape[-1])
        _, top_k_weights, top_k_index = self.gate(hidden_TH)
        if self.routed_scaling_factor != 1.0:
            # Scaling every routing weight scales the combined routed output.
            top_k_weights = top_k_weights * self.routed_scaling_factor
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * hidden_TH.shape[0] * self.top_k / self.num_experts)
            top_k_index, top_k_weights = limit_expert_capacity(top_k_index, top_k_weights, self.num_experts, capacity)
        with torch.no_grad():
            counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts + 1)
            self.last_tokens_per_expert, self.last_dropped_slots = counts[: self.num_experts], counts[self.num_experts]

        out_TH = self.experts(hidden_TH, top_k_index, top_k_weights)
        if self.shared_expert is not None:
            out_TH = out_TH + self.shared_output(hidden_TH)
        return out_TH.reshape(input_shape)

    def shared_output(self, hidden_TH: torch.Tensor) -> torch.Tensor:
        """The always-on shared expert's contribution (gated as Qwen2-MoE when `shared_expert_gate`); 0 without one."""
        if self.shared_expert is None:
            return hidden_TH.new_zeros(())
        shared_TH = self.shared_expert(hidden_TH)
        if self.shared_expert_gate is not None:
            shared_TH = torch.sigmoid(self.shared_expert_gate(hidden_TH)) * shared_TH
        return shared_TH


class LlamaMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: LlamaMoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMoESparseMoeBlock(config) if config.is_moe_layer(layer_idx) else LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class LlamaMoEPreTrainedModel(PreTrainedModel):
    config_class = LlamaMoEConfig
    config: LlamaMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMoEDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # "dropless" takes a path without host syncs under torch.compile (dropless_moe.py), the model has no other
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(LlamaMoETopKRouter, index=0),
        "hidden_states": LlamaMoEDecoderLayer,
        "attentions": LlamaAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, LlamaMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, LlamaMoETopKRouter):
            module.init_weights(std)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Our dropless kernel is the default; "eager" and transformers' backends stay selectable.
        return super().get_correct_experts_implementation(requested_experts or DEFAULT_EXPERTS_IMPLEMENTATION)

    def expert_load(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert in the last forward pass, per MoE layer index (padding included)."""
        return {
            idx: layer.mlp.last_tokens_per_expert
            for idx, layer in enumerate(self.get_decoder().layers)
            if isinstance(layer.mlp, LlamaMoESparseMoeBlock) and layer.mlp.last_tokens_per_expert is not None
        }

    def dropped_slots(self) -> dict[int, int]:
        """Token slots dropped by the capacity limit in the last forward pass, per MoE layer index."""
        return {
            idx: int(layer.mlp.last_dropped_slots)
            for idx, layer in enumerate(self.get_decoder().layers)
            if isinstance(layer.mlp, LlamaMoESparseMoeBlock) and layer.mlp.last_dropped_slots is not None
        }


class LlamaMoEModel(LlamaMoEPreTrainedModel):
    def __init__(self, config: LlamaMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LlamaMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_decoder(self):
        return self

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


def _masks_tokens(attention_mask: torch.Tensor | None, num_tokens: int) -> bool:
    """True when `attention_mask` is a 2-D padding mask over exactly the routed tokens (else every token counts)."""
    return attention_mask is not None and attention_mask.dim() == 2 and attention_mask.numel() == num_tokens


def _token_mask(attention_mask: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor | None:
    """A flat float mask of real (non-padding) tokens, or None when every token counts."""
    if not _masks_tokens(attention_mask, num_tokens):
        return None
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def switch_load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None):
    """Switch/Mixtral load balancing, E * sum_e f_e * P_e (f_e: share of top-k slots, P_e: mean probability), computed
    for each MoE layer and averaged over layers (k when balanced). transformers' `load_balancing_loss_func` sums
    counts and probabilities over all layers before the product, so layers collapsed onto different experts cancel
    out: 30 layers routing to one or two experts each read as balanced (2.005 for top-2) and got almost no gradient."""
    return torch.stack(
        [load_balancing_loss_func((logits_TE,), num_experts, top_k, attention_mask) for logits_TE in router_logits]
    ).mean()


def cv2_load_balancing_loss(router_logits, num_experts: int, top_k: int, norm_topk_prob: bool, attention_mask=None):
    """LLaMA-MoE's balance loss: squared coefficient of variation of expert importance (sum of routing
    weights) plus that of expert load (token count), averaged over MoE layers."""

    def cv_squared(x_E):
        return x_E.var() / (x_E.mean() ** 2 + 1e-10)

    losses = []
    for logits_TE in router_logits:
        logits_TE = logits_TE.float()
        probs_TE = F.softmax(logits_TE, dim=-1)
        top_weights, top_index = torch.topk(probs_TE, top_k, dim=-1)
        if norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        scores_TE = torch.zeros_like(probs_TE).scatter(1, top_index, top_weights)
        mask_T = _token_mask(attention_mask, scores_TE.shape[0], scores_TE.device)
        if mask_T is not None:
            scores_TE = scores_TE * mask_T[:, None]
        importance_E = scores_TE.sum(0)
        load_E = (scores_TE > 0).float().sum(0)
        losses.append(cv_squared(importance_E) + cv_squared(load_E))
    return torch.stack(losses).mean()


def router_z_loss(router_logits, attention_mask=None):
    """ST-MoE's router z-loss: mean squared log-partition of the router logits, averaged over MoE layers."""
    losses = []
    for logits_TE in router_logits:
        z_T = torch.logsumexp(logits_TE.float(), dim=-1) ** 2
        mask_T = _token_mask(attention_mask, z_T.shape[0], z_T.device)
        losses.append(z_T.mean() if mask_T is None else (z_T * mask_T).sum() / mask_T.sum().clamp(min=1))
    return torch.stack(losses).mean()


def router_loss_layers(config) -> int:
    """How many times the router-loss coefficients count. LlamaMoE applies them per MoE layer, as Switch, GShard,
    LLaMA-MoE and Megatron do: the losses are reported as means over layers (k when balanced), and every layer's
    router gets the coefficient's full push however deep the model. A mean alone gave each of SmolLM2's 30 routers
    1/30 of it, and LLaMA-MoE's random split collapsed its routing in training. Other classes (Mixtral's fallback
    in the trainer) keep their own rule: one coefficient on one loss over all layers."""
    return len(config.moe_layers) if getattr(config, "model_type", None) == "llama_moe" else 1


def add_router_losses(language_loss, aux_loss, z_loss, config, accumulation_steps: int = 1):
    """The training loss: the token loss plus the coefficient-weighted router losses (per MoE layer, see
    `router_loss_layers`), which are per-batch means and so are divided by the gradient-accumulation steps when the
    token loss is already divided by the tokens of all accumulated micro-batches. The model (accumulation_steps=1,
    Mixtral's convention) and the trainer both use it."""
    loss, scale = language_loss, router_loss_layers(config) / accumulation_steps
    if aux_loss is not None:
        loss = loss + config.router_aux_loss_coef * scale * aux_loss.to(loss.device)
    if z_loss is not None:
        loss = loss + config.router_z_loss_coef * scale * z_loss.to(loss.device)
    return loss


@dataclass
class LlamaMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus `z_loss` (the router z-loss, when `router_z_loss_coef` > 0) and
    `language_loss` (the token loss alone; `loss` adds the router losses to it when they are computed)."""

    z_loss: torch.FloatTensor | None = None
    language_loss: torch.FloatTensor | None = None


class LlamaMoEForCausalLM(LlamaMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LlamaMoEConfig):
        super().__init__(config)
        self.model = LlamaMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # Read by TRL and lm-eval.
    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def num_experts_per_tok(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def router_aux_loss_coef(self) -> float:
        return self.config.router_aux_loss_coef

    def get_decoder(self):
        return self.model

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LlamaMoECausalLMOutputWithPast:
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        language_loss = None
        if labels is not None:
            language_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )

        aux_loss = z_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = self.router_aux_loss(outputs.router_logits, attention_mask)
            if self.config.router_z_loss_coef > 0:
                z_loss = router_z_loss(outputs.router_logits, attention_mask)
        loss = None if language_loss is None else add_router_losses(language_loss, aux_loss, z_loss, self.config)

        return LlamaMoECausalLMOutputWithPast(
            loss=loss,
            language_loss=language_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def router_aux_loss(self, router_logits, attention_mask=None) -> torch.Tensor:
        """The load-balancing loss of `config.aux_loss_type` (unscaled by its coefficient)."""
        if self.config.aux_loss_type == "cv2":
            return cv2_load_balancing_loss(
                router_logits,
                self.config.num_local_experts,
                self.config.num_experts_per_tok,
                self.config.norm_topk_prob,
                attention_mask,
            )
        mask = attention_mask if _masks_tokens(attention_mask, router_logits[0].shape[0]) else None
        return switch_load_balancing_loss(
            router_logits, self.config.num_local_experts, self.config.num_experts_per_tok, mask
        )


__all__ = [
    "LlamaMoEPreTrainedModel",
    "LlamaMoEModel",
    "LlamaMoEForCausalLM",
    "LlamaMoESparseMoeBlock",
    "LlamaMoETopKRouter",
    "LlamaMoEMLPRouter",
    "router_class",
    "LlamaMoEExperts",
    "switch_load_balancing_loss",
    "cv2_load_balancing_loss",
    "router_z_loss",
    "add_router_losses",
    "router_loss_layers",
]
