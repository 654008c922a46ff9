"""The `lmforge` command: `lmforge VERB ...`, a dict from verb to the function that runs it.

Every verb has `--help`. Errors a user can act on (a missing path, an unsupported checkpoint, a
prompt longer than the context) print one line to stderr and exit with status 2, no traceback;
set LMFORGE_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError)


# ------------------------------------------------------------------------------------------ verbs

def cmd_generate(args) -> None:
    """Continue a prompt; prints only the continuation."""
    import torch

    from .generate import stream_text
    from .models.hub import load

    model, tokenizer = _load_generator(args.model, load)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=not args.chat)])
    tokens = model.stream(ids, tokenizer=tokenizer, **_sampling_args(args))
    for piece in stream_text(tokens, tokenizer):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> None:
    """Talk to a model with its chat template, streaming the answer to the terminal."""
    from .chat import chat_loop
    from .models.hub import load

    model, tokenizer = _load_generator(args.model, load)
    chat_loop(model, tokenizer, system=args.system, messages=args.message, sampling=_sampling_args(args))


def cmd_info(args) -> None:
    """Print what a model is: family, architecture, sizes, tokenizer, files."""
    from .info import describe

    print(json.dumps(describe(args.model), indent=2, ensure_ascii=False))


def cmd_convert(args) -> None:
    """Convert a GGUF file or Hugging Face folder to an lmforge/Hugging Face folder."""
    import torch

    from .models.hub import load, save

    dst = Path(args.dst)
    if dst.is_dir() and any(dst.iterdir()) and not args.force:  # say so before a long load, and name the flag
        raise FileExistsError(f"{dst} already exists and is not empty; choose another folder or pass --force "
                              "to replace it")
    model, tokenizer = load(args.src, dtype=getattr(torch, args.dtype))
    out = save(model, args.dst, tokenizer, overwrite=args.force)
    print(f"wrote {out}", file=sys.stderr)


def cmd_tokenizer_train(args) -> None:
    """Train a tokenizer on text files."""
    from .tokenizer import train_tokenizer

    tok = train_tokenizer(args.kind, args.files, args.vocab_size, output=args.output,
                          min_frequency=args.min_frequency, lowercase=args.lowercase)
    print(f"wrote {args.output} ({len(tok)} tokens)", file=sys.stderr)


def cmd_pretrain(args) -> None:
    """Pretrain a model on unlabeled text (causal LM, masked LM + NSP, or T5 span corruption)."""
    from .pretrain import main as pretrain

    state = pretrain(args.config, args.overrides, resume=args.resume)
    print(f"done: {state['step']} steps, final loss {state.get('loss', float('nan')):.4f}", file=sys.stderr)


def cmd_finetune(args) -> None:
    """Fine-tune a model on a labeled task (classify, ner, qa, seq2seq, chat), fully or with PEFT."""
    from .finetune import main as finetune

    state = finetune(args.config, args.overrides, resume=args.resume)
    shown = {k: round(v, 4) for k, v in state.items()
             if k.startswith("val_") or k in ("accuracy", "f1", "exact_match", "bleu", "chrf")}
    print(f"done: {state['step']} steps, {shown}", file=sys.stderr)


def cmd_compare(args) -> None:
    """Fine-tune one task with several methods; a table and a plot of parameters, memory, time, metric."""
    from .compare import compare

    folder = compare(args.config, [m.strip() for m in args.methods.split(",") if m.strip()], args.overrides)
    print((folder / "compare.md").read_text())
    print(f"wrote {folder}/compare.md, compare.json, compare.png", file=sys.stderr)


def cmd_evaluate(args) -> None:
    """Score a fine-tuned model on a labeled file; prints its metrics as one JSON object (last line)."""
    from .evaluate import evaluate_file

    result = evaluate_file(args.model, args.data, kind=args.task, batch_size=args.batch_size, **_read_args(args))
    print(json.dumps(result, ensure_ascii=False))


def cmd_predict(args) -> None:
    """Run a fine-tuned model over a file; writes one JSON line per example (its prediction)."""
    from .evaluate import predict_file

    n = predict_file(args.model, args.data, args.output, kind=args.task, batch_size=args.batch_size,
                     **_read_args(args))
    print(f"wrote {n} predictions to {args.output}", file=sys.stderr)


def _read_args(args) -> dict:
    """The data-reading options of evaluate/predict, as read_examples takes them."""
    columns = dict(c.split("=", 1) for c in args.column or ())
    return {"format": args.format, "target_path": args.target, "text_column": args.text_column,
            "text_pair_column": args.text_pair_column, "label_column": args.label_column,
            "columns": columns or None, "limit": args.limit or None, "skip_bad_rows": args.skip_bad_rows}


def _add_run_verb(verbs, name: str, run, recipe: str, example: str) -> None:
    """A verb that runs a YAML recipe with `key.sub=value` overrides and `--resume` (pretrain, finetune)."""
    p = verbs.add_parser(name, help=run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description=f"{run.__doc__}\n\nexample:\n  {example}")
    p.add_argument("config", help=f"a YAML recipe, e.g. {recipe}")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="change config values")
    p.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    p.set_defaults(run=run)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    from .data.labeled import FORMATS
    from .evaluate import KINDS

    p.add_argument("model", help="a fine-tuned model folder (e.g. runs/NAME/final)")
    p.add_argument("--data", required=True, help="the file: TSV/CSV/JSONL/Parquet, CoNLL, SQuAD JSON, or X.en")
    p.add_argument("--target", help="parallel text: the target side (X.de for --data X.en)")
    p.add_argument("--task", choices=KINDS, help="default: the task the model was fine-tuned for")
    p.add_argument("--format", choices=FORMATS, help="default: from the file name and content")
    p.add_argument("--text-column", help="the column holding the text (default: text, sentence, review, ...)")
    p.add_argument("--text-pair-column", help="the column holding the second text of pairs")
    p.add_argument("--label-column", help="the column holding the label (default: label)")
    p.add_argument("--column", action="append", metavar="KEY=COLUMN", help="more renames, e.g. source=en")
    p.add_argument("--limit", type=int, default=0, help="only the first N examples")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave malformed rows out instead of stopping")
    p.add_argument("--batch-size", type=int, default=32)


def cmd_data_prepare(args) -> None:
    """Tokenize a corpus into memory-mapped token shards with a document index and a validation split."""
    from .data.prepare import run

    run(args)


def cmd_demo(args) -> None:
    """A tour on real weights and data that install from the package index (offline)."""
    from .demo import main as demo

    demo()


# -------------------------------------------------------------------------------------- helpers

def _load_generator(name: str, load):
    model, tokenizer = load(name)
    if not hasattr(model, "generate"):
        raise ValueError(f"{name} is an encoder ({type(model).__name__}); it cannot generate text")
    if tokenizer is None:
        raise ValueError(f"{name} has no tokenizer files (tokenizer.json or vocab.txt)")
    return model, tokenizer


def _sampling_args(args) -> dict:
    sample = args.temperature > 0 and not args.greedy
    kw = {"max_new_tokens": args.max_new_tokens, "do_sample": sample,
          "repetition_penalty": args.repetition_penalty, "stop_strings": args.stop or [], "seed": args.seed}
    if sample:
        kw.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kw


def _add_sampling(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate (default %(default)s)")
    g.add_argument("--greedy", action="store_true", help="always pick the most likely token (ignores --temperature)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature; 0 means greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (default 1.0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop when TEXT appears (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Build, pretrain, fine-tune, evaluate and serve Transformer language models.",
        epilog="examples:\n  lmforge chat smollm2\n  lmforge generate smollm2 --prompt 'Once upon a time' --greedy\n"
               "  lmforge info minilm\n  lmforge convert model.gguf my-model/\n\n"
               "Run `lmforge VERB --help` for the options of a verb. LMFORGE_DEBUG=1 shows tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    model_help = "a Hugging Face folder, a .gguf file, an alias (minilm, smollm2) or a hub id"

    p = verbs.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    p.add_argument("model", help=model_help)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_sampling(p, max_new_tokens=64, temperature=0.0)
    p.set_defaults(run=cmd_generate)

    p = verbs.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__ +
                         " Interactive on a terminal; otherwise each line of stdin (or each --message) is one turn.")
    p.add_argument("model", help=model_help)
    p.add_argument("--system", help="system prompt")
    p.add_argument("-m", "--message", action="append", help="a user message; repeat for several turns (no prompt)")
    _add_sampling(p, max_new_tokens=256, temperature=0.0)
    p.set_defaults(run=cmd_chat)

    p = verbs.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    p.add_argument("model", help=model_help)
    p.set_defaults(run=cmd_info)

    p = verbs.add_parser("convert", help=cmd_convert.__doc__, description=cmd_convert.__doc__)
    p.add_argument("src", help=model_help)
    p.add_argument("dst", help="output folder (loads in lmforge and transformers)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=cmd_convert)

    _add_run_verb(verbs, "pretrain", cmd_pretrain, "configs/pretrain/shakespeare-char-cpu.yaml",
                  "lmforge pretrain configs/pretrain/shakespeare-char-cpu.yaml run.name=try1 train.max_steps=500\n"
                  "  torchrun --nproc-per-node 2 -m lmforge pretrain CONFIG   (DDP; gloo on CPU)")
    _add_run_verb(verbs, "finetune", cmd_finetune, "configs/finetune/sst2-minilm.yaml",
                  "lmforge finetune configs/finetune/sst2-minilm-lora.yaml run.name=try1 train.max_steps=300")

    p = verbs.add_parser("compare", help=cmd_compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description=cmd_compare.__doc__ + "\n\nexample:\n  lmforge compare "
                         "configs/finetune/sst2-minilm.yaml --methods full,lora,adapter train.max_steps=500 "
                         "lora:train.lr=5e-4 adapter:train.lr=5e-4")
    p.add_argument("config", help="a fine-tuning recipe")
    p.add_argument("--methods", default="full,lora,adalora,adapter,prefix",
                   help="comma-separated: full, lora, adalora, adapter, prefix, prompt, ia3")
    p.add_argument("overrides", nargs="*", metavar="[method:]key.sub=value",
                   help="change config values, for every method or (method:...) for one")
    p.set_defaults(run=cmd_compare)

    p = verbs.add_parser("evaluate", help=cmd_evaluate.__doc__, description=cmd_evaluate.__doc__)
    _add_data_arguments(p)
    p.set_defaults(run=cmd_evaluate)

    p = verbs.add_parser("predict", help=cmd_predict.__doc__, description=cmd_predict.__doc__)
    _add_data_arguments(p)
    p.add_argument("--output", required=True, help="the JSON-lines file to write")
    p.set_defaults(run=cmd_predict)

    data = verbs.add_parser("data", help="prepare corpora", description="Data tools.")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="VERB", required=True)
    p = data_verbs.add_parser("prepare", help=cmd_data_prepare.__doc__, description=cmd_data_prepare.__doc__)
    from .data.prepare import add_arguments

    add_arguments(p)
    p.set_defaults(run=cmd_data_prepare)

    p = verbs.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.set_defaults(run=cmd_demo)

    tok = verbs.add_parser("tokenizer", help="train tokenizers", description="Tokenizer tools.")
    tok_verbs = tok.add_subparsers(dest="tokenizer_verb", metavar="VERB", required=True)
    p = tok_verbs.add_parser("train", help=cmd_tokenizer_train.__doc__, description=cmd_tokenizer_train.__doc__ +
                             " bpe: byte-level BPE (GPT-2/Llama); wordpiece: BERT, CJK split per character;"
                             " unigram: T5; char: one token per character.")
    p.add_argument("files", nargs="+", help="text files or folders of .txt files")
    p.add_argument("--kind", required=True, choices=["bpe", "wordpiece", "unigram", "char"])
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--output", required=True, help="folder to write (loads with AutoTokenizer)")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--lowercase", action="store_true", help="lowercase text (wordpiece)")
    p.set_defaults(run=cmd_tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # `key=value` overrides after an option (`CONFIG --resume a.b=c`)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except USER_ERRORS as e:
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lmforge {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

