"""Train servelab's two shipped default models, offline and deterministically.

Corpus: the Python standard library's own ``.py`` sources of the interpreter that runs this script
(PSF License 2.0, redistributable), minus tests, ``site-packages``, ``encodings`` and ``lib2to3``.
Split: a file is held out when the first byte of sha256(relative path) is divisible by 10 (~10%).

Steps (all seeded):
1. a byte-level BPE tokenizer (vocab 4096) trained with ``tokenizers`` on the training files;
2. the **target**: Llama, 6 layers, hidden 256, 4 query heads / 2 KV heads (GQA), head_dim 64;
3. the **draft**: 2 layers with the target's shapes, initialised from the target's embedding, first and
   last layers and final norm, then distilled from the target's logits (KL + cross-entropy on its argmax),
   half of each batch being the target's own greedy continuations (on-policy), in rounds until greedy
   acceptance alpha >= --alpha-goal;
4. evaluation of the saved bf16 weights: held-out perplexity of both models, alpha at 4 drafted
   tokens per round, greedy samples; everything goes into a model card (README.md) beside the weights.

Usage:  python scripts/train_default_models.py                  # ~1 hour on 2 CPU cores
        python scripts/train_default_models.py --reuse-target   # keep the target, train only the draft
        python scripts/train_default_models.py --eval-only      # re-measure the committed models with
                                                                # servelab's own runtime
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "servelab" / "models"
DATA = ROOT / "servelab" / "data"
EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "lib2to3"}
EOS = "<|endoftext|>"
VOCAB = 4096
SAMPLE_PROMPTS = [  # end mid-line: after a bare "\n" the model cannot see the next line's indentation
    "def fibonacci(n):\n    if n <",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def push(self, item):\n        self.",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser =",
    "    def __repr__(self):\n        return",
    "# Read the configuration file and",
]


# ----------------------------------------------------------------------------- corpus
def corpus_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & EXCLUDED_PARTS)
    )
    return root, files


def is_heldout(rel: str) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] % 10 == 0


def load_corpus() -> dict:
    root, files = corpus_files()
    digest = hashlib.sha256()
    train, heldout = [], []
    for p in files:
        rel = p.relative_to(root).as_posix()
        text = p.read_text(encoding="utf-8", errors="replace")
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
        (heldout if is_heldout(rel) else train).append((rel, text))
    return {
        "root": str(root),
        "python": sys.version.split()[0],
        "sha256": digest.hexdigest(),
        "train": train,
        "heldout": heldout,
    }


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None, model_max_length=2048
    )


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# ----------------------------------------------------------------------------- models
def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        attention_bias=False,
        mlp_bias=False,
    )


def batch_windows(tokens: torch.Tensor, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - length - 1, (batch,), generator=gen)
    return torch.stack([tokens[s : s + length + 1] for s in starts.tolist()]).long()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def train_target(tokens, steps, batch, length, seed, log):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(6))
    opt = make_optimizer(model, 3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 3e-3, 100)
        x = batch_windows(tokens, batch, length, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"target step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return model, loss.item()


@torch.no_grad()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decode a batch of equal-length prompts with HF's KV cache (EOS not special here)."""
    out = model(prompts, use_cache=True)
    past, seq = out.past_key_values, [prompts]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens - 1):
        seq.append(nxt)
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    seq.append(nxt)
    return torch.cat(seq, dim=1)


def distill_draft(target, tokens, steps, batch, length, seed, log, draft=None, round_idx=0, layers=2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if draft is None:
        draft = LlamaForCausalLM(llama_config(layers))
        draft.model.embed_tokens.weight.data.copy_(target.model.embed_tokens.weight.data)
        n = len(target.model.layers)
        picks = [0] if layers == 1 else [round(i * (n - 1) / (layers - 1)) for i in range(layers)]
        for mine, theirs in enumerate(picks):  # first and last layers of the target (layer dropping)
            draft.model.layers[mine].load_state_dict(target.model.layers[theirs].state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())
    gen = torch.Generator().manual_seed(seed + 7)
    # on-policy pool: the target's own greedy continuations of corpus prompts
    t0 = time.time()
    pool = []
    target.eval()
    n_pool = steps * (batch // 2) // 4  # each sequence is seen ~4 times
    for _ in range(max(1, n_pool // 32)):
        prompts = batch_windows(tokens, 32, 32, gen)[:, :32]
        pool.append(greedy_continuations(target, prompts, length + 1 - 32))
    pool = torch.cat(pool)
    log(f"draft round {round_idx}: generated {len(pool)} on-policy sequences ({time.time() - t0:.0f}s)")
    opt = make_optimizer(draft, 2e-3)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3, 50)
        text = batch_windows(tokens, batch // 2, length, gen)
        onp = pool[torch.randint(0, len(pool), (batch // 2,), generator=gen)]
        x = torch.cat([text, onp])[:, :-1]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t_logits = target(x).logits.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d_logits = draft(x).logits.float()
        d_logp = F.log_softmax(d_logits, -1).reshape(-1, VOCAB)
        kl = F.kl_div(d_logp, F.log_softmax(t_logits, -1).reshape(-1, VOCAB), log_target=True, reduction="batchmean")
        # greedy acceptance is a top-1 match: also fit the target's argmax directly
        loss = kl + F.nll_loss(d_logp, t_logits.argmax(-1).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"draft round {round_idx} step {step}/{steps} KL {kl.item():.3f} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return draft


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, length: int = 256, max_windows: int = 200) -> float:
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // length)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = [tokens[j * length : j * length + length + 1] for j in range(i, min(n, i + 8))]
        x = torch.stack(rows).long()
        logits = model(x[:, :-1]).logits.float()
        total += F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def acceptance(target, draft, tokens, n_prompts=40, prompt_len=32, new_tokens=96, gamma=4, seed=1234):
    """Leviathan et al.'s alpha for greedy speculative decoding, measured at ``gamma`` drafted tokens.

    Greedy speculative decoding always emits the target's greedy tokens, so each round starts from the
    target's own continuation. A round drafts min(gamma, remaining) tokens; the drafted tokens *checked*
    are those up to and including the first rejection. alpha = accepted / checked.
    """
    target.eval(), draft.eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = batch_windows(tokens, n_prompts, prompt_len, gen)[:, :prompt_len]
    reference = greedy_continuations(target, prompts, new_tokens)
    accepted = checked = rounds = 0
    for row in reference:
        pos = prompt_len
        while pos < prompt_len + new_tokens:
            k = min(gamma, prompt_len + new_tokens - pos)
            ctx = row[:pos].clone()
            for i in range(k):
                guess = draft(ctx[None]).logits[0, -1].argmax()
                checked += 1
                if guess.item() != row[pos + i].item():
                    break
                accepted += 1
                ctx = torch.cat([ctx, guess[None]])
            else:
                i = k  # every drafted token accepted: the target adds a bonus token
            pos += i + 1
            rounds += 1
    return {"alpha": accepted / checked, "accepted": accepted, "checked": checked, "rounds": rounds,
            "prompts": n_prompts, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "gamma": gamma}


@torch.no_grad()
def samples(model, tokenizer, new_tokens=48) -> list[dict]:
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        seq = greedy_continuations(model, ids, new_tokens)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in seq:
            seq = seq[: seq.index(tokenizer.eos_token_id)]
        out.append({"prompt": prompt, "continuation": tokenizer.decode(seq)})
    return out


def distinct_4grams(model, tokens: torch.Tensor) -> float:
    gen = torch.Generator().manual_seed(99)
    prompts = batch_windows(tokens, 16, 32, gen)[:, :32]
    cont = greedy_continuations(model, prompts, 96)[:, 32:].tolist()
    grams = [tuple(r[i : i + 4]) for r in cont for i in range(len(r) - 3)]
    return len(set(grams)) / max(1, len(grams))


# ----------------------------------------------------------------------------- saving
def save_model(model, tokenizer, path: Path) -> None:
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, do_sample=False)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    model.float()


def write_heldout_sample(heldout: list[tuple[str, str]], limit_chars: int = 400_000) -> None:
    """Ship held-out files (PSF License) so every machine draws the same prompts for traces."""
    DATA.mkdir(parents=True, exist_ok=True)
    used = 0
    with open(DATA / "heldout.jsonl", "w") as f:
        for rel, text in heldout:
            if used >= limit_chars:
                break
            text = text[: limit_chars - used]
            f.write(json.dumps({"path": rel, "text": text}) + "\n")
            used += len(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-steps", type=int, default=2000)
    ap.add_argument("--draft-steps", type=int, default=1000)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--reuse-target", action="store_true",
                    help="keep the tokenizer and target in --out (trained by an earlier run); train only the draft")
    ap.add_argument("--alpha-goal", type=float, default=0.77)
    ap.add_argument("--max-draft-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--eval-only", action="store_true", help="re-measure the models in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t_start = time.time()
    corpus = load_corpus()
    log(f"corpus: {len(corpus['train'])} train / {len(corpus['heldout'])} held-out files, sha256 {corpus['sha256'][:16]}")
    target_dir, draft_dir = args.out / "servelab-target", args.out / "servelab-draft"

    if args.eval_only:  # an independent re-measurement: servelab's runtime and its alpha replay
        sys.path.insert(0, str(ROOT))
        from servelab import load_model, load_tokenizer
        from servelab.acceptance import measure_acceptance

        tokenizer = load_tokenizer(target_dir)
        held = encode_docs(tokenizer, [t for _, t in corpus["heldout"]])
        gen = torch.Generator().manual_seed(1234)  # the same prompts as acceptance() draws
        prompts = batch_windows(held, 40, 32, gen)[:, :32].tolist()
        acc = measure_acceptance(load_model(target_dir), load_model(draft_dir), prompts, 96, gamma=4)
        print(json.dumps(acc.to_dict(), indent=1))
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer

    report_file = args.out / "training_report.json"
    if args.reuse_target:
        tokenizer = AutoTokenizer.from_pretrained(target_dir)
        previous = json.loads(report_file.read_text())["target"] if report_file.exists() else {}
        target_loss = previous.get("final_train_loss", float("nan"))
    else:
        tokenizer = train_tokenizer([t for _, t in corpus["train"]])
    train = encode_docs(tokenizer, [t for _, t in corpus["train"]])
    held = encode_docs(tokenizer, [t for _, t in corpus["heldout"]])
    log(f"tokens: {len(train)} train / {len(held)} held-out ({time.time() - t_start:.0f}s)")

    if not args.reuse_target:
        target, target_loss = train_target(train, args.target_steps, 16, 256, args.seed, log)
        save_model(target, tokenizer, target_dir)
    # distil from the target exactly as shipped (bf16 weights), so --reuse-target reproduces a full run
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)

    draft, rounds, history = None, 0, []
    while rounds < args.max_draft_rounds:
        draft = distill_draft(target, train, args.draft_steps, 16, 128, args.seed + 100 + rounds, log, draft, rounds,
                              args.draft_layers)
        rounds += 1
        acc = acceptance(target, draft, held)
        history.append(round(acc["alpha"], 4))
        log(f"draft round {rounds - 1}: alpha {acc['alpha']:.3f}")
        if acc["alpha"] >= args.alpha_goal:
            break
    save_model(draft, tokenizer, draft_dir)

    # evaluate exactly what is shipped: reload the bf16 files in fp32
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    report = {
        "corpus": {k: corpus[k] for k in ("python", "sha256")}
        | {"train_files": len(corpus["train"]), "heldout_files": len(corpus["heldout"]),
           "train_tokens": len(train), "heldout_tokens": len(held)},
        "seed": args.seed,
        "command": "python scripts/train_default_models.py" + (" --reuse-target" if args.reuse_target else ""),
        "target": {"steps": args.target_steps, "batch": 16, "seq_len": 256, "final_train_loss": round(target_loss, 4),
                   "heldout_ppl": round(perplexity(target, held), 2),
                   "greedy_distinct_4grams": round(distinct_4grams(target, held), 3),
                   "params": sum(p.numel() for p in target.parameters())},
        "draft": {"layers": args.draft_layers, "rounds": rounds, "steps_per_round": args.draft_steps, "alpha_per_round": history,
                  "heldout_ppl": round(perplexity(draft, held), 2),
                  "params": sum(p.numel() for p in draft.parameters())},
        "acceptance": acceptance(target, draft, held),
        "samples": samples(target, tokenizer),
        "train_seconds": round(time.time() - t_start),
        "torch": torch.__version__,
    }
    write_heldout_sample(corpus["heldout"])
    report_file.write_text(json.dumps(report, indent=1) + "\n")
    write_model_cards(report, target_dir, draft_dir)
    log(json.dumps({k: report[k] for k in ("target", "draft", "acceptance")}, indent=1))


def write_model_cards(r: dict, target_dir: Path, draft_dir: Path) -> None:
    c, t, d, a = r["corpus"], r["target"], r["draft"], r["acceptance"]
    samples_md = "\n".join(
        f"**Prompt** `{s['prompt']!r}` →\n```python\n{s['prompt']}{s['continuation']}\n```" for s in r["samples"]
    )
    common = f"""
## Training data
The `.py` sources of the Python {c['python']} standard library (PSF License 2.0), without `test/`,
`tests/`, `idle_test/`, `site-packages/`, `encodings/` and `lib2to3/`. Files are split by path: a file is
held out when the first byte of sha256(relative path) is divisible by 10. {c['train_files']} training files
({c['train_tokens']:,} tokens), {c['heldout_files']} held-out files ({c['heldout_tokens']:,} tokens).
Corpus sha256: `{c['sha256']}`.

Tokenizer: byte-level BPE, vocabulary 4096, trained with `tokenizers` on the training files;
`<|endoftext|>` (id 0) separates files and is BOS/EOS.

## Measured (bf16 weights as shipped, evaluated in fp32)
| | target | draft |
|---|---|---|
| parameters | {t['params']:,} | {d['params']:,} |
| held-out perplexity (256-token windows) | {t['heldout_ppl']} | {d['heldout_ppl']} |

Draft acceptance rate, greedy, 4 drafted tokens per round: **alpha = {a['alpha']:.3f}**
({a['accepted']} accepted of {a['checked']} drafted tokens checked, counting each round up to and including its
first rejection; {a['prompts']} held-out prompts of {a['prompt_tokens']} tokens, {a['new_tokens']} new tokens each,
{a['rounds']} rounds).

Measured by `{r['command']}` (seed {r['seed']}, {r['train_seconds']} s on 2 CPU cores{r.get('seconds_note', '')},
torch {r['torch']}); re-measure the committed weights with `python scripts/train_default_models.py --eval-only`.
"""
    (target_dir / "README.md").write_text(f"""---
license: mit
library_name: transformers
pipeline_tag: text-generation
---
# servelab-target

The default **target** model of the servelab curriculum: a tiny Llama (6 layers, hidden 256,
4 query heads / 2 KV heads, head_dim 64, SwiGLU 688, tied embeddings) trained from scratch on
Python source. It is small enough to serve on a 2-core CPU and large enough to make batching,
paged attention and speculative decoding measurable. It is not a useful code model.

Training: {t['steps']} steps × batch {t['batch']} × {t['seq_len']} tokens, AdamW (peak LR 3e-3,
cosine), bf16 autocast, final training loss {t['final_train_loss']}. Greedy continuations of held-out
prompts: {t['greedy_distinct_4grams']:.0%} distinct 4-grams.
{common}
## Greedy samples
{samples_md}
""")
    (draft_dir / "README.md").write_text(f"""---
license: mit
library_name: transformers
pipeline_tag: text-generation
---
# servelab-draft

The default **draft** model for speculative decoding with `servelab-target`: the target's shapes with
{d['layers']} layer(s), initialised from the target's embedding, first and last layers and final norm, then
distilled from the target's logits (KL plus cross-entropy on the target's argmax), half of each batch
being the target's own greedy continuations (on-policy). {d['rounds']} round(s) of {d['steps_per_round']} steps; alpha after each round: {d['alpha_per_round']}.
{common}""")


if __name__ == "__main__":
    main()
