"""Training throughput: lmforge's causal-LM step vs transformers' GPT2LMHeadModel, same config.

GPT-2 shape: 6 layers, 6 heads, 384 wide, sequence 256, vocabulary 8192, batch 16, dropout 0.1,
AdamW (lr 3e-4, weight decay 0.1 on matrices), fp32, gradient clipping 1.0. transformers runs in a
plain PyTorch loop (forward with labels, backward, clip, AdamW step); lmforge runs its own training
step (the one `fit()` uses: task loss, fused AdamW). The two alternate in timed blocks after warm-up;
the best block of each counts. A large matrix product (`a @ b`) is timed in the same run, and our
achieved FLOP/s (6 x parameters x tokens + attention, per step) is reported as a fraction of it; also
as a fraction of the faster of that and oneDNN's GEMM (which lmforge uses; on CPUs where the BLAS
is slow, such as AMD's with MKL, oneDNN's is the machine's real matmul rate).

Prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lmforge.models import gpt
from lmforge.tasks.clm import CausalLM
from lmforge.train.optim import build_optimizer

LAYERS, HEADS, DIM, SEQ, VOCAB, BATCH, DROPOUT = 6, 6, 384, 256, 8192, 16, 0.1


def matmul_rates(n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """FLOP/s of an n x n x n fp32 matrix product, best of `repeats`: (PyTorch's `a @ b`, which calls
    the BLAS it was built with; the faster of that and oneDNN's GEMM, which lmforge's training uses)."""
    from lmforge.models.linear import ENABLED, matmul_t

    a, b = torch.randn(n, n), torch.randn(n, n)
    blas = min(_seconds(lambda: a @ b) for _ in range(repeats + 1))
    onednn = min(_seconds(lambda: matmul_t(a, b)) for _ in range(repeats + 1)) if ENABLED else blas
    return 2 * n**3 / blas, 2 * n**3 / min(blas, onednn)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_flops(params_no_embed: int, vocab_params: int) -> float:
    """Forward + backward FLOPs of one step: 6 per parameter per token (the LM head included),
    plus attention scores and weighted sums (6 * 2 * T * C per token per layer)."""
    tokens = BATCH * SEQ
    return 6 * (params_no_embed + vocab_params) * tokens + 12 * LAYERS * SEQ * DIM * tokens


def train_step(loss_fn, model, optimizer):
    """One optimizer step as a plain PyTorch loop does it: loss, backward, clip, AdamW."""

    def step(x, y):
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def ours():
    torch.manual_seed(0)
    config = gpt.GPTConfig(vocab_size=VOCAB, dim=DIM, n_layers=LAYERS, n_heads=HEADS, max_len=SEQ,
                           dropout=DROPOUT, attention_dropout=DROPOUT, bos_token_id=None, eos_token_id=None)
    model = gpt.GPTForCausalLM(config).train()
    optimizer = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95))

    def loss(x, y):  # the task's loss, exactly what fit() calls (sum over targets, then / count)
        loss_sum, count = CausalLM.loss(None, model, {"input_ids": x, "labels": y})
        return loss_sum / count

    return model, train_step(loss, model, optimizer)


def hf():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=DIM, n_layer=LAYERS, n_head=HEADS,
                                     resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)
    model = transformers.GPT2LMHeadModel(config).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.95))
    return model, train_step(lambda x, y: model(input_ids=x, labels=x).loss, model, optimizer)  # HF shifts labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per side")
    parser.add_argument("--steps", type=int, default=3, help="steps per block")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, VOCAB, (BATCH, SEQ + 1)))
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    sides = {"ours": ours(), "hf": hf()}
    for _, step in sides.values():  # warm-up: allocator, kernels
        step(x, y), step(x, y)
    times = {name: [] for name in sides}
    for _ in range(args.blocks):
        for name, (_, step) in sides.items():
            times[name].append(_seconds(lambda step=step: [step(x, y) for _ in range(args.steps)]) / args.steps)
    model = sides["ours"][0]
    embed = model.model.embed.weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embed - model.model.pos_embed.weight.numel()
    flops = step_flops(params, embed)
    rate, best_rate = matmul_rates()
    best = {name: min(t) for name, t in times.items()}
    tokens = BATCH * SEQ
    print(json.dumps({
        "benchmark": "pretrain_throughput", "config": f"GPT-2 {LAYERS}L {HEADS}H {DIM}d seq {SEQ} vocab {VOCAB} "
        f"batch {BATCH} dropout {DROPOUT} fp32", "threads": torch.get_num_threads(),
        "ours_tokens_per_s": round(tokens / best["ours"], 1), "hf_tokens_per_s": round(tokens / best["hf"], 1),
        "ratio": round(best["hf"] / best["ours"], 3),
        "ours_step_s": round(best["ours"], 3), "hf_step_s": round(best["hf"], 3),
        "step_gflop": round(flops / 1e9, 1), "ours_gflop_s": round(flops / best["ours"] / 1e9, 1),
        "matmul_gflop_s": round(rate / 1e9, 1), "ours_fraction_of_matmul": round(flops / best["ours"] / rate, 3),
        "best_gemm_gflop_s": round(best_rate / 1e9, 1),
        "ours_fraction_of_best_gemm": round(flops / best["ours"] / best_rate, 3),
    }))


if __name__ == "__main__":
    main()
