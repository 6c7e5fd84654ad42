"""torch.compile(fullgraph=True) against eager mode, on CPU, in one run (repetitions interleaved A B A B ...).

1. Decoding: LlamaMoEForCausalLM with the default "dropless" kernel, eager with a dynamic cache (what `generate()`
   does by default) against its forward compiled with a static cache (`cache_implementation="static"`), batch 1
   and 8: median milliseconds per decoding step.
2. One MoE layer forward + backward (router, experts, combine) on a batch of tokens, compiled against eager.
Under compile "dropless" runs transformers' grouped-GEMM path (no host sync); eager runs our sorted kernel.
Measures only.

    python benchmarks/compile.py
    python benchmarks/compile.py --shape 64:8:128 --layers 2 --repeats 5
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch


def build_model(args, num_experts, top_k, width):
    from llama_moe.modeling import LlamaMoEConfig, LlamaMoEForCausalLM

    torch.manual_seed(0)
    config = LlamaMoEConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        intermediate_size=top_k * width,
        moe_intermediate_size=width,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        tie_word_embeddings=True,
    )
    return LlamaMoEForCausalLM(config).eval()


def decode_seconds(model, forward, cache, batch, args):
    """Mean seconds per decoding step after a prompt (the prefill, eager, is not timed); `cache` is new or reset."""
    generator = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(vocab, (batch, args.prompt), generator=generator)
    next_ids = torch.randint(vocab, (args.new_tokens, batch, 1), generator=generator)
    with torch.no_grad():
        position = torch.arange(args.prompt)
        model(input_ids=prompt_ids, cache=cache, use_cache=True, cache_position=position, logits_to_keep=1)
        start = time.perf_counter()
        for step in range(args.new_tokens):
            position = torch.tensor([args.prompt + step])
            forward(input_ids=next_ids[step], cache=cache, use_cache=True, cache_position=position)
        return (time.perf_counter() - start) / args.new_tokens


def reset(cache):
    cache.reset()
    return cache


def layer_seconds(block, tokens, hidden):
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0)).requires_grad_()
    start = time.perf_counter()
    block(x[None]).sum().backward()
    return time.perf_counter() - start


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8:2:1024", help="experts:top_k:width (default %(default)s)")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--layer-tokens", type=int, default=2048, help="tokens of the layer forward+backward")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def interleaved(contenders: dict, repeats: int) -> dict:
    times = {name: [] for name in contenders}
    for repeat in range(repeats + 1):
        for name, run in contenders.items():
            seconds = run()
            if repeat:  # the first round warms up (and compiles)
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv=None):
    from transformers import DynamicCache, StaticCache

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    num_experts, top_k, width = (int(v) for v in args.shape.split(":"))
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, threads {args.threads}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: {num_experts} experts top-{top_k} of width {width}, hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}, float32; median of {args.repeats}\n"
    )
    model = build_model(args, num_experts, top_k, width)
    compiled_forward = torch.compile(model.forward, fullgraph=True)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        static = StaticCache(config=model.config, max_cache_len=args.prompt + args.new_tokens)
        medians = interleaved(
            {
                "eager, dynamic cache": lambda: decode_seconds(
                    model, model.forward, DynamicCache(config=model.config), batch, args
                ),
                "compiled, static cache": lambda: decode_seconds(model, compiled_forward, reset(static), batch, args),
            },
            args.repeats,
        )
        rows.append((f"decoding, batch {batch} (ms per step)", medians))
        print(f"  timed {rows[-1][0]}", flush=True)
    block = model.model.layers[0].mlp.train()
    compiled_block = torch.compile(block, fullgraph=True)
    medians = interleaved(
        {
            "eager": lambda: layer_seconds(block, args.layer_tokens, args.hidden),
            "compiled": lambda: layer_seconds(compiled_block, args.layer_tokens, args.hidden),
        },
        args.repeats,
    )
    rows.append((f"one MoE layer fwd+bwd, {args.layer_tokens} tokens (ms)", medians))
    print("\n| measurement | eager ms | compiled ms | compiled / eager |")
    print("|---|---|---|---|")
    for label, medians in rows:
        eager, compiled = list(medians.values())
        print(f"| {label} | {eager * 1e3:.1f} | {compiled * 1e3:.1f} | {compiled / eager:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
