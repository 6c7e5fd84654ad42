"""Decoding speed of a whole MoE model against a dense Llama with the same active parameters, in one run.

Each step feeds one new token per sequence through the model with its KV cache (batch 1 and 8), as `generate()`
does, without the sampling around it. Contenders, repetitions interleaved (A B C A B C ...): the dense Llama whose
FFN width is top_k x expert width, and LlamaMoEForCausalLM with our `dropless` kernel and with transformers'
`grouped_mm`. Prints the median milliseconds per decoding step as ratios to dense. Measures only.

    python benchmarks/decode.py                          # the three issue-6 expert shapes, batch 1 and 8
    python benchmarks/decode.py --shapes 8:2:1024 --batch 1 --layers 4
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

DEFAULT_SHAPES = "8:2:1024,16:4:256,64:8:128"


def build(kind, args, num_experts, top_k, width):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama_moe.modeling import LlamaMoEConfig, LlamaMoEForCausalLM

    common = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if kind == "dense":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=top_k * width, **common))
    else:
        config = LlamaMoEConfig(
            intermediate_size=top_k * width,
            moe_intermediate_size=width,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            **common,
        )
        config._experts_implementation = kind
        model = LlamaMoEForCausalLM(config)
    return model.to(getattr(torch, args.dtype)).eval()


def decode_step_seconds(model, batch, prompt, new_tokens):
    """Mean seconds per decoding step after a prompt of `prompt` tokens (the prefill is not timed)."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(vocab, (batch, prompt), generator=generator)
    next_ids = torch.randint(vocab, (new_tokens, batch, 1), generator=generator)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt_ids, cache=cache, use_cache=True, logits_to_keep=1)
        start = time.perf_counter()
        for step in range(new_tokens):
            model(input_ids=next_ids[step], cache=cache, use_cache=True)
        return (time.perf_counter() - start) / new_tokens


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="experts:top_k:width,... (default %(default)s)")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (not timed)")
    parser.add_argument("--new-tokens", type=int, default=16, help="decoding steps per repetition")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contenders", default="dense,dropless,grouped_mm")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    contenders = args.contenders.split(",")
    if contenders[0] != "dense":
        sys.exit("--contenders must start with dense (the reference)")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, threads {args.threads}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, vocab "
        f"{args.vocab}, {args.dtype}; prompt {args.prompt}, {args.new_tokens} steps, median of {args.repeats}\n"
    )
    rows = []
    for shape in args.shapes.split(","):
        num_experts, top_k, width = (int(v) for v in shape.split(":"))
        models = {name: build(name, args, num_experts, top_k, width) for name in contenders}
        for batch in (int(b) for b in args.batch.split(",")):
            times = {name: [] for name in models}
            for repeat in range(args.repeats + 1):
                for name, model in models.items():
                    seconds = decode_step_seconds(model, batch, args.prompt, args.new_tokens)
                    if repeat:  # the first round warms up
                        times[name].append(seconds)
            medians = {name: statistics.median(values) for name, values in times.items()}
            rows.append((f"{num_experts}x top-{top_k}, I={width}, batch {batch}", medians))
            print(f"  timed {rows[-1][0]}", flush=True)
        del models
    print("\nms per decoding step (dense) and ratio to dense (lower is better)\n")
    print("| shape | dense ms | " + " | ".join(contenders[1:]) + " |")
    print("|" + "---|" * (len(contenders) + 1))
    for label, medians in rows:
        dense = medians["dense"]
        cells = [f"{medians[name] / dense:.2f}x" for name in contenders[1:]]
        print(f"| {label} | {dense * 1e3:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
