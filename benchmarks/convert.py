"""Benchmark: peak memory and write speed of streamed upcycling on a Llama-3-8B-shaped checkpoint.

Generates random bf16 weights with Llama 3 8B's shapes (hidden 4096, FFN 14336, vocab 128256, GQA 8 KV heads)
for a few layers into a temporary folder, converts it with `copy` to 8 experts in a child process, and reports
the child's peak resident memory and MB/s written next to the goal
`peak < max_shard_size + two dense layers' FFN weights + 1 GB`. Measures only; asserts nothing.

    python benchmarks/convert.py --layers 2 --max-shard-size 2GB
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 4096, 14336, 128256, 32, 8


def llama3_8b_config(num_layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "vocab_size": VOCAB,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "dtype": "bfloat16",
    }


def write_dense(folder: str, num_layers: int) -> int:
    """One shard per layer (plus embeddings and head), generated one shard at a time. Returns bytes written."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(llama3_8b_config(num_layers), f)
    # One random block reused everywhere: conversion speed and memory do not depend on the values.
    block = (torch.randn(FFN, HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)

    def rand(rows, cols):
        if cols != HIDDEN:
            return block[:cols].T.contiguous() if rows == HIDDEN else block[:rows, :cols].clone()
        return block.repeat(-(-rows // FFN), 1)[:rows].clone()

    head_dim = HIDDEN // HEADS
    shards = [{"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}]
    shards += [None] * num_layers
    shards.append(
        {"model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16), "lm_head.weight": rand(VOCAB, HIDDEN)}
    )
    weight_map, total = {}, 0
    for i in range(len(shards)):
        tensors = shards[i]
        if tensors is None:
            p = f"model.layers.{i - 1}."
            tensors = {
                p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
                p + "self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
                p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": rand(FFN, HIDDEN),
                p + "mlp.up_proj.weight": rand(FFN, HIDDEN),
                p + "mlp.down_proj.weight": rand(HIDDEN, FFN),
                p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            }
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        shards[i] = None
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


CHILD = """
import json, sys, time
from llama_moe.conversion.options import UpcycleOptions
from llama_moe.conversion.pipeline import run_upcycle
base, out, shard = sys.argv[1:4]

def vm_hwm():  # peak resident memory of this process (reset at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

import threading
peak_anon = [0]
def sample():  # anonymous memory only: what the process itself allocated (no mapped file pages)
    while True:
        peak_anon[0] = max(peak_anon[0], rss_anon())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
rss_before = vm_hwm()
result = run_upcycle(base, out, UpcycleOptions(method="copy", num_experts=8, top_k=2), max_shard_size=shard,
                     progress=False)
print(json.dumps({"bytes": result.bytes_written, "seconds": result.seconds, "files": result.num_files,
                  "rss_after_imports": rss_before, "peak": vm_hwm(), "peak_anon": peak_anon[0],
                  "summary": result.summary()}))
"""


def disk_write_speed(folder: str, num_bytes: int) -> float:
    """MB/s of writing a buffer to a file the way the converter does (buffered, no fsync)."""
    buffer = memoryview(bytearray(64 * 2**20))
    path = os.path.join(folder, "disk_speed.bin")
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(num_bytes // len(buffer)):
            f.write(buffer)
    seconds = time.perf_counter() - start
    os.remove(path)
    return num_bytes / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--workdir", default=None, help="where to put the ~10 GB of temporary files")
    args = parser.parse_args()

    from llama_moe.conversion.writer import parse_size

    root = tempfile.mkdtemp(prefix="llama_moe_convert_bench_", dir=args.workdir)
    try:
        dense, out = os.path.join(root, "dense"), os.path.join(root, "moe")
        start = time.perf_counter()
        dense_bytes = write_dense(dense, args.layers)
        print(
            f"generated {dense_bytes / 1e9:.2f} GB dense checkpoint ({args.layers} layers) in "
            f"{time.perf_counter() - start:.1f}s",
            flush=True,
        )
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, dense, out, args.max_shard_size], capture_output=True, text=True, check=True
        )
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = report["peak"]
        disk = disk_write_speed(root, report["bytes"])
        ffn_layer = 3 * FFN * HIDDEN * 2
        goal = parse_size(args.max_shard_size) + 2 * ffn_layer + 10**9
        print(report["summary"])
        print(
            f"written: {report['bytes'] / 1e9:.2f} GB in {report['files']} shards, "
            f"{report['bytes'] / 1e6 / report['seconds']:.0f} MB/s (whole run incl. checks, config, card); plain "
            f"sequential write of as many bytes on the same disk: {disk:.0f} MB/s"
        )
        print(
            f"peak RSS of the conversion process: {peak / 1e9:.2f} GB "
            f"(of which {report['rss_after_imports'] / 1e9:.2f} "
            f"GB after imports); goal < {goal / 1e9:.2f} GB (shard {args.max_shard_size} + 2 dense FFN layers "
            f"{2 * ffn_layer / 1e9:.2f} GB + 1 GB): {'met' if peak < goal else 'NOT met'}; peak anonymous memory "
            f"(sampled every 20 ms, excludes mapped file pages): {report['peak_anon'] / 1e9:.2f} GB"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
