"""A word-level transformer language model trained by any rule, in a loop of its own.

    python examples/language_model.py --data DIR --rule dfa --epochs 3 --seed 0

DIR holds ``train.txt``, ``valid.txt`` and ``test.txt``: whitespace-separated words, one line a
sentence or paragraph, read as WikiText-2 is by pytorch/examples' word_language_model (each line's
words, then ``<eos>``). The model is that example's transformer (200 wide, 2 blocks of 2 heads,
learned positions, a causal mask), batch-first: (N, T) token ids in, (N, T, V) logits out, one
distribution per token (``RuleContext(output_layout="NTC")``).

The rule trains it through ``rule.prepare()``: the script's loop is the usual ``loss.backward();
optimizer.step()``. The DFA family cuts after every block, as Launay et al. (2020, "Direct Feedback
Alignment Scales to Modern Deep Learning Tasks and Architectures") do: each block's output gets
``e_t·B`` at every token t, e_t the token's error (softmax − one-hot, over the vocabulary) and B one
V x 200 matrix a block, the same for every t. ``hybrid`` trains the lower half of the blocks by
backprop from the DFA signal of the block above them (Han & Yoo's hybrid); the output layer
(final LayerNorm and decoder) always learns from the true gradient.

Prints each epoch's training and validation perplexity, then, as its last line, one JSON object:
``valid_ppl`` (the best epoch's), ``test_ppl`` (that epoch's model), ``train_ppl``, ``step_ms``,
``tokens_per_s`` and the settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from trainer.rules import RuleContext, build_rule, rule_options_class

EOS = "<eos>"
CUT_RULES = ("dfa", "bdfa", "sdfa", "hybrid", "shallow")  # rules whose units are the blocks


class Corpus:
    """The three files as token ids over one vocabulary (every word of the three, in order of first
    appearance: train, valid, test), each line's words followed by ``<eos>``."""

    def __init__(self, folder: Path):
        self.words: dict[str, int] = {}
        self.train, self.valid, self.test = (self.read(folder / f"{split}.txt") for split in ("train", "valid", "test"))

    def read(self, path: Path) -> torch.Tensor:
        ids = []
        with open(path, encoding="utf8") as f:
            for line in f:
                for word in [*line.split(), EOS]:
                    ids.append(self.words.setdefault(word, len(self.words)))
        return torch.tensor(ids, dtype=torch.int64)


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The token stream as ``batch_size`` contiguous rows (N, L), the tail that does not fill a
    row dropped: row n continues where row n carried on in the previous chunk."""
    length = tokens.numel() // batch_size
    return tokens[: length * batch_size].view(batch_size, length)


def chunks(rows: torch.Tensor, bptt: int):
    """(x, y) windows of at most ``bptt`` tokens; y is x shifted by one token."""
    for start in range(0, rows.shape[1] - 1, bptt):
        steps = min(bptt, rows.shape[1] - 1 - start)
        yield rows[:, start: start + steps], rows[:, start + 1: start + 1 + steps]


class TransformerLM(nn.Module):
    """Token plus learned position embeddings, ``blocks`` pre-norm transformer
    blocks under a causal mask, a final LayerNorm and the decoder to the vocabulary."""

    def __init__(self, vocab: int, width: int = 200, blocks: int = 2, heads: int = 2, hidden: int = 200,
                 dropout: float = 0.2, context: int = 512):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, hidden, dropout, batch_first=True, norm_first=True)
            for _ in range(blocks))
        self.output = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        steps = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(steps, device=tokens.device)
        h = self.dropout(self.embed(tokens) + self.position(torch.arange(steps, device=tokens.device)))
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.output(h)


def rule_for(name: str, model: TransformerLM, example: torch.Tensor, seed: int):
    """``name`` built over ``model``; the DFA family cut after every block (``hybrid``: dfa with the
    lower half of the blocks trained by backprop from the block above them)."""
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    options = {}
    if name in CUT_RULES:
        options["units"] = blocks
    if name == "hybrid":
        name, options["bp_units"] = "dfa", blocks[: len(blocks) // 2]
    context = RuleContext(num_classes=model.output[1].out_features, output_layout="NTC", example_input=example,
                          seed=seed)
    return build_rule(name, rule_options_class(name)(**options), model, context)


@torch.no_grad()
def perplexity(net: nn.Module, rows: torch.Tensor, bptt: int) -> float:
    """exp of the mean cross-entropy over every predicted token of ``rows``."""
    net.eval()
    total, count = 0.0, 0
    for x, y in chunks(rows, bptt):
        logits = net(x)
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                             reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train.txt, valid.txt, test.txt")
    parser.add_argument("--rule", default="dfa", help=f"bp, {', '.join(CUT_RULES)}, trace_bp, fa, usf, brsf, frsf, kp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (one-cycle cosine from it)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35, help="tokens a window")
    parser.add_argument("--width", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    parser.add_argument("--max-batches", type=int, default=0, help="train on at most this many windows an epoch")
    args = parser.parse_args(argv)
    for split in ("train", "valid", "test"):
        if not (args.data / f"{split}.txt").is_file():
            parser.error(f"--data {args.data}: no {split}.txt there; the folder needs train.txt, valid.txt and test.txt")
    if args.epochs < 1 or args.bptt < 1 or args.batch_size < 1:
        parser.error("--epochs, --bptt and --batch-size must be at least 1")

    torch.manual_seed(args.seed)
    corpus = Corpus(args.data)
    vocab = len(corpus.words)
    train = batchify(corpus.train, args.batch_size)
    valid, test = batchify(corpus.valid, 10), batchify(corpus.test, 10)
    model = TransformerLM(vocab, args.width, args.blocks, args.heads, args.width, args.dropout)
    rule = rule_for(args.rule, model, train[:2, : args.bptt], args.seed)
    net = rule.prepare()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    windows = (train.shape[1] - 2) // args.bptt + 1
    per_epoch = min(windows, args.max_batches) if args.max_batches else windows
    total = per_epoch * args.epochs
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))))
    criterion = nn.CrossEntropyLoss()
    print(f"{args.rule} on {args.data}: vocabulary {vocab:,}, {corpus.train.numel():,} training tokens, "
          f"{sum(p.numel() for p in model.parameters()):,} model parameters, {per_epoch} windows an epoch")

    best, best_state, seconds, steps, seen, train_ppl = math.inf, None, 0.0, 0, 0, math.nan
    for epoch in range(1, args.epochs + 1):
        net.train()
        loss_sum, tokens, start = 0.0, 0, time.perf_counter()
        for step, (x, y) in enumerate(chunks(train, args.bptt)):
            if step == per_epoch:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(net(x).reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            if args.clip:
                nn.utils.clip_grad_norm_(net.parameters(), args.clip)
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * y.numel()
            tokens += y.numel()
        elapsed = time.perf_counter() - start
        seconds, steps, seen = seconds + elapsed, steps + per_epoch, seen + tokens
        train_ppl = math.exp(loss_sum / tokens)
        valid_ppl = perplexity(net, valid, args.bptt)
        if valid_ppl < best:
            best, best_state = valid_ppl, copy.deepcopy(model.state_dict())
        print(f"epoch {epoch}/{args.epochs} · train ppl {train_ppl:.1f} · valid ppl {valid_ppl:.1f} · "
              f"{elapsed:.0f} s · {tokens / elapsed:,.0f} tokens/s", flush=True)
    model.load_state_dict(best_state)
    result = {
        "rule": args.rule, "epochs": args.epochs, "seed": args.seed, "valid_ppl": round(best, 3),
        "test_ppl": round(perplexity(net, test, args.bptt), 3), "train_ppl": round(train_ppl, 3),
        "step_ms": round(1000 * seconds / steps, 2), "tokens_per_s": round(seen / seconds),
        "vocab": vocab, "lr": args.lr, "width": args.width, "blocks": args.blocks, "windows_per_epoch": per_epoch,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
