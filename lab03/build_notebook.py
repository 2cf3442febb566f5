"""Build lab 03's solution notebook, ``solutions/03_speculative/speculative.ipynb``, from this script's text
and the graded code in ``lab03/solution.py`` (one graded cell per exercise function).

    PYTHONPATH=. python lab03/build_notebook.py          # then: python -m grader release

The solution notebook is what the release reads (learner notebook, ``servelab.reference.speculative``); this
script is how its first version was written. Edit lab03/solution.py or the text here and rebuild.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = ROOT / "lab03" / "solution.py"
OUT = ROOT / "solutions" / "03_speculative" / "speculative.ipynb"
LAB_ID = "03_speculative"

# what each graded cell imports itself (cells run in one namespace, but each reads on its own)
CELL_IMPORTS = {
    "speculative_greedy": "import torch\n\nfrom servelab.speculative import SpecRun, check_speculative\n",
    "accept_or_resample": "import torch\n",
    "speculative_sample": "import torch\n\nfrom servelab.speculative import SpecRun, check_speculative\n",
    "prompt_lookup_propose": "",
    "speculative_lookup": "import torch\n\nfrom servelab.speculative import SpecRun, check_speculative\n",
    "predicted_speedup": "",
}


def graded_sources(path: Path = SOLUTION) -> dict[str, str]:
    """Each top-level function of lab03/solution.py, with its decorators, as source text."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            end = node.end_lineno
            while end < len(lines) and lines[end].strip().startswith("### END SOLUTION"):  # a comment: not in the AST
                end += 1
            out[node.name] = "\n".join(lines[start:end])
    missing = set(CELL_IMPORTS) - set(out)
    if missing:
        raise SystemExit(f"{path} does not define {sorted(missing)}")
    return out


def md(text: str) -> dict:
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str, *tags: str) -> dict:
    return nbformat.v4.new_code_cell(text.strip("\n"), metadata={"tags": list(tags)} if tags else {})


def graded(name: str, sources: dict[str, str]) -> dict:
    imports = CELL_IMPORTS[name]
    return code((imports + "\n\n" if imports else "") + sources[name], "graded")


def check_cell(name: str) -> dict:
    return code(f'check("{name}")', "check")


# ----------------------------------------------------------------------------- the text
INTRO = r"""
# Lab 03 — Speculative decoding: draft and verify, lossless sampling, prompt lookup

**What you will build.** A decode step of a large model at batch 1 reads every weight to produce *one* token:
the GPU (or here, the CPU) mostly waits for memory. Scoring 5 tokens in one forward costs little more than
scoring 1. **Speculative decoding** turns that spare compute into tokens: a cheap **proposer** guesses the
next γ tokens, the **target** scores all of them in one forward, and every guess the target agrees with is a
token gained. You will write the loop for greedy decoding (the output is *identical* to plain greedy), the
**lossless acceptance rule** for sampling (the output is distributed *exactly* as sampling the target),
**prompt lookup** (a proposer with no model at all), and the formula that predicts the speedup, then test
the formula against your own measurements.

**Why it matters.** Leviathan et al. (ICML 2023) reported **2–3x** faster T5-XXL decoding with identical
outputs; Chen et al. (DeepMind, 2023) **2–2.5x** on Chinchilla 70B; prompt lookup decoding gives **2–4x** on
tasks whose output copies its input (code editing, summarisation, RAG). vLLM, SGLang, TensorRT-LLM and
Hugging Face `generate` all ship it (EAGLE, Medusa, n-gram and draft-model speculators).

**What you will reproduce.** On the shipped pair (a 6-layer target and a 2-layer draft, trained on the same
data) at batch 1: the acceptance rate α (about 0.8 when we measured), **about 3.5 tokens per target forward at
γ = 4**, the speedup against γ with your measured points on the formula's curve, and **why the speedup is far
below 3.5x on a CPU**: the draft is not cheap enough next to the target (a draft step costs a quarter to a half
of a target step here, against a few percent for a 70B target with a 1B draft), and two models that take turns
cost more than each timed alone. Prompt lookup, whose proposer costs nothing, does much better on text that
repeats its prompt. Your own numbers are printed as you go and collected at the end.

| part | you write | graded by |
|---|---|---|
| 1 | `speculative_greedy` | identical tokens to plain greedy for γ in {1, 2, 4, 7}; KV caches consistent after rejections; bookkeeping; tokens per target forward |
| 2 | `accept_or_resample`, `speculative_sample` | chi-square tests that the tokens follow the target's distribution |
| 3 | `prompt_lookup_propose`, `speculative_lookup` | proposals on hand-made contexts; identical tokens to plain greedy |
| 4 | `predicted_speedup` | the closed form; measured speedups within 15% of it |
"""

SETUP_MD = r"""
## Setup
Both models are servelab's `CausalLM`s (lab 00): `model(input_ids, positions, cache)` returns logits
`[batch, tokens, vocab]`; with a cache view (`model.new_cache(1, max_len).rows([0])`) the forward writes the
K/V of the positions it is given and attends to everything the cache holds before them.
"""

SETUP = r"""
import os
import statistics
import time

import servelab  # first: configures Triton (interpreter on CPU) before anything imports it
import matplotlib.pyplot as plt
import torch
from servelab import load_draft, load_model, load_tokenizer
from servelab.device import describe
from servelab.reference.warmup import greedy_decode
from servelab.speculative import SpecRun
from servelab.timing import paired_benchmark
from servelab.workloads import load_heldout
from grader.inline import check
from grader.probes import CountingModel

QUICK = os.environ.get("SERVELAB_QUICK", "0") != "0"  # CI runs the notebook at smaller sizes
NEW = 48 if QUICK else 128  # new tokens per request in the experiments
torch.manual_seed(0)
if servelab.get_device().type == "cpu":
    torch.set_num_threads(1)  # batch 1 through small models: one CPU thread is fastest and steadiest

info = describe()
print(f"device: {info['device']} ({info['device_name']}), torch {info['torch']}")
target, draft, tok = load_model(), load_draft(), load_tokenizer()
EOS = tok.eos_token_id
sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in (("target", target), ("draft", draft))}
for name, m in (("target", target), ("draft", draft)):
    cfg = m.config
    print(f"{name}: {m.name}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {sizes[name] / 1e6:.1f} M parameters")
print(f"draft / target parameters: {sizes['draft'] / sizes['target']:.2f}; shared vocabulary of {target.config.vocab_size}")


def corpus_prompt(i: int, length: int) -> list[int]:
    # a prompt cut from held-out source files (never trained on)
    texts = load_heldout()
    return tok.encode(texts[i % len(texts)][:4000], add_special_tokens=False)[:length]


prompts = [corpus_prompt(i, 32) for i in range(2 if QUICK else 6)]
print(f"{len(prompts)} prompts of 32 tokens; {NEW} new tokens each")
"""

PART1 = r"""
## Part 1 — Draft and verify (greedy)

A **round** of greedy speculative decoding, with the sequence so far ending in token `x` at position `p`:

1. the draft proposes `d1 .. dk` (k ≤ γ), one token at a time, each its argmax;
2. the target runs **one** forward over `[x, d1, .., dk]` at positions `p .. p+k`: row `i` of its logits is the
   target's choice *after* `x, d1, .., di`, so `best[0]` checks `d1`, `best[1]` checks `d2`, ..., and `best[k]`
   is the token after `dk`;
3. accept the longest prefix with `di == best[i-1]`; then append the target's own token `best[j]` (`j` =
   accepted count): the **correction** at the first mismatch, or the **bonus** token when all k agreed.

Every emitted token is the target's argmax given the tokens before it, so the output equals plain greedy
decoding, whatever the draft proposes. A round costs k draft steps and one target forward and yields j + 1
tokens.

**KV caches without rollback.** K/V of position `q` live at index `q` of the cache, and a forward attends only
up to its own positions. After a rejection, the cache holds stale K/V of the rejected drafts at positions past
the accepted ones, and that is fine: the next forward feeds the real tokens **at those same positions**, which
overwrites them before anything reads them. So each model only needs to know *how many positions of the
sequence it holds*; nothing is copied or deleted.
"""

EX1 = r"""
### Exercise: `speculative_greedy(target, draft, prompt_ids, max_new_tokens, gamma, eos_id=None) -> SpecRun`

The contract, all of it checked by the grader:

- **Validate** first: `servelab.speculative.check_speculative`, called with the function's first five
  arguments, raises the ValueErrors the grader expects (γ < 1, different vocabularies, an empty or
  out-of-range prompt).
- **Prefill**: give each model its own cache, `model.new_cache(1, len(prompt) + max_new_tokens).rows([0])`,
  and feed both `prompt[:-1]` at positions `0 .. n-2` in one forward (nothing for a 1-token prompt). The last
  prompt token opens the first round, exactly like the last token of every later round.
- **Draft**: a round drafts `k = min(gamma, max_new_tokens - tokens so far)` tokens, one draft forward per
  token; it stops drafting early after proposing `eos_id`. The first draft forward of a round feeds the
  tokens the draft has not seen yet: the round's last token, or *two* tokens after a round where every draft
  was accepted (the last draft, which the draft proposed but never fed, and the bonus token).
- **Verify**: exactly **one** target forward per round, over `[last token] + drafts` at positions `p .. p+k`.
- **Emit** the accepted drafts and the target's token; stop right after `eos_id` (even among accepted drafts)
  and at `max_new_tokens`.
- **Return** `SpecRun(tokens, rounds, target_forwards, draft_forwards)`: `tokens` the new tokens (EOS
  included); `rounds[r] = (drafted, accepted)`; `target_forwards` = verify forwards (one per round);
  `draft_forwards` = draft forwards after the prefill. Prefills are not counted.

<details><summary>Hint 1: the state to keep</summary>

`seq` (prompt + new tokens) and one integer per model: how many positions of `seq` its cache holds. The target
always holds `len(seq) - 1` (every token but the last). The draft holds whatever it was fed; after a round,
cut it to `min(draft_len, len(seq) - 1)`: positions past that hold rejected drafts and get overwritten.
</details>

<details><summary>Hint 2: the acceptance loop</summary>

The target's choices are `logits[0].argmax(-1)`, one per position it was fed. The accepted count `j` is the
length of the common prefix of `drafted` and those choices; the round emits `drafted[:j]` and then choice `j`.
</details>
"""

EXP1_MD = r"""
**Experiment: what the rounds look like.** One prompt at γ = 4: each round's accepted drafts, then the
target's own token. The draft is usually right on the easy continuations (closing brackets, repeated names)
and wrong where the text branches.
"""

EXP1 = r"""
prompt = prompts[0]
run = speculative_greedy(target, draft, prompt, NEW, 4)
assert run.tokens == greedy_decode(target, prompt, NEW), "speculative greedy must equal plain greedy"
print(run.summary())
i = 0
for r, (drafted, accepted) in enumerate(run.rounds[:10]):
    kept, own = run.tokens[i : i + accepted], run.tokens[i + accepted : i + accepted + 1]
    print(f"round {r:2d}: drafted {drafted}, accepted {accepted}: {tok.decode(kept)!r:40} + target {tok.decode(own)!r}")
    i += accepted + 1
"""

EXP1B_MD = r"""
**Experiment: acceptance by position within a draft, and tokens per target forward.** For γ = 1 .. 7 over the
prompts: the rate at which the i-th draft of a round is accepted *given that the drafts before it were*, and
the new tokens each verify forward yields. If drafts were accepted independently with probability α, the
first curve would be flat at α and a round would yield (1 − α^(γ+1)) / (1 − α) tokens.
"""

EXP1B = r"""
GAMMAS = (1, 2, 4, 7) if QUICK else (1, 2, 3, 4, 5, 6, 7)
runs = {g: [speculative_greedy(target, draft, p, NEW, g) for p in prompts] for g in GAMMAS}
reached, accepted_at = [0] * max(GAMMAS), [0] * max(GAMMAS)
for d, a in (r for run in runs[max(GAMMAS)] for r in run.rounds):
    for i in range(min(d, a + 1)):  # draft i was checked: every draft before it was accepted
        reached[i] += 1
        accepted_at[i] += i < a
alpha = {g: sum(r.accepted for r in runs[g]) / sum(r.checked for r in runs[g]) for g in GAMMAS}
per_forward = {g: sum(len(r.tokens) for r in runs[g]) / sum(r.target_forwards for r in runs[g]) for g in GAMMAS}
for g in GAMMAS:
    print(f"gamma {g}: alpha {alpha[g]:.2f}, {per_forward[g]:.2f} tokens per target forward")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
pos = [i + 1 for i in range(max(GAMMAS)) if reached[i]]
ax1.plot(pos, [accepted_at[i - 1] / reached[i - 1] for i in pos], marker="o", label="accepted | reached")
ax1.axhline(alpha[max(GAMMAS)], color="gray", ls="--", label=f"alpha = {alpha[max(GAMMAS)]:.2f}")
ax1.set(xlabel="position of the draft within its round", ylabel="acceptance rate", ylim=(0, 1.05),
        title=f"acceptance by position (gamma = {max(GAMMAS)})")
ax1.legend()
ax2.bar([str(g) for g in GAMMAS], [per_forward[g] for g in GAMMAS], label="measured")
a = alpha[4] if 4 in alpha else alpha[GAMMAS[-1]]
ax2.plot([str(g) for g in GAMMAS], [(1 - a ** (g + 1)) / (1 - a) for g in GAMMAS], "k.--",
         label=f"(1 - a^(g+1)) / (1 - a), a = {a:.2f}")
ax2.set(xlabel="gamma", ylabel="new tokens per target forward", title="tokens per verify forward")
ax2.legend()
plt.tight_layout()
plt.show()
"""

PART2 = r"""
## Part 2 — Lossless speculative sampling

At temperature T > 0 the target *samples* from p = softmax(logits / T); the draft samples its proposals from
its own q. The rule of Leviathan et al. and Chen et al. makes every emitted token distributed **exactly** as if
sampled from p:

- accept draft d with probability **min(1, p(d) / q(d))**;
- at the first rejection, sample the replacement from the **residual** norm(max(0, p − q));
- if all k drafts are accepted, sample a **bonus** token from the target's next row p[k].

Why it is exact: P(emit t) = q(t) · min(1, p(t)/q(t)) + P(reject) · residual(t) = min(q(t), p(t)) +
(p(t) − min(q(t), p(t))) = p(t). The acceptance rate is Σ min(p, q): the closer the draft, the more it is
accepted, but *any* draft gives the target's distribution.
"""

EX2A = r"""
### Exercise: `accept_or_resample(p, q, drafted, generator) -> (accepted, next_token)`

- `p`: `[k + 1, V]` the target's probabilities after the last token and after each draft; `q`: `[k, V]` the
  draft's probabilities that draft i was sampled from; `drafted`: the k token ids (a list of ints).
- For i = 0, 1, ...: draw `r = torch.rand((), generator=generator)`; accept draft i if `r * q[i, d] < p[i, d]`
  (the same as r < p/q without dividing by zero). At the first rejection return `(i, token sampled from
  max(0, p[i] − q[i]) normalised)` (if that is all zero, sample from p[i]). All accepted: return
  `(k, token sampled from p[k])`.
- **Every** random draw comes from `generator` (`torch.rand(..., generator=...)`, `torch.multinomial(...,
  generator=...)`), so a seed fixes the result. Return plain Python ints.

The grader drives it 20,000 times on a 5-token vocabulary with known p and q and tests, at significance 1e-4,
that the first, second and bonus tokens follow p's rows. "Always accept", "resample from p instead of the
residual" and "bonus from the wrong row" all fail that test.

<details><summary>Hint</summary>

`torch.multinomial` takes unnormalised weights: `torch.multinomial((p[i] - q[i]).clamp(min=0), 1,
generator=generator)`.
</details>
"""

EX2B = r"""
### Exercise: `speculative_sample(target, draft, prompt_ids, max_new_tokens, gamma, temperature, generator, eos_id=None) -> SpecRun`

The rounds of `speculative_greedy`, except:
- the draft **samples** each proposal from `q = softmax(draft logits / temperature)` (keep each q row);
- the verify forward gives `p = softmax(target logits / temperature)` for all k + 1 positions;
- `accept_or_resample(p, q, drafted, generator)` decides the accepted count and the next token;
- validate with `check_speculative(..., temperature)` (temperature must be > 0) and raise ValueError if
  `generator` is not a `torch.Generator`. Move probabilities to the CPU before sampling with a CPU generator.

The grader runs it from many seeds on a real prompt and tests the first token against the target's
distribution; the same seed must give the same run.
"""

EXP2_MD = r"""
**Experiment: the rule is lossless, a shortcut is not.** The hand-made vocabulary of the grader: the
distribution of the first emitted token from your `accept_or_resample`, against p (the target) and q (the
draft), and the same for "always accept" (which just samples the draft).
"""

EXP2 = r"""
P = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05], [0.10, 0.50, 0.10, 0.20, 0.10], [0.05, 0.05, 0.20, 0.30, 0.40]])
Q = torch.tensor([[0.10, 0.20, 0.40, 0.20, 0.10], [0.30, 0.10, 0.30, 0.20, 0.10]])
TRIALS = 4000 if QUICK else 20000
gen, draws = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
drafts = torch.stack([torch.multinomial(Q[i], TRIALS, replacement=True, generator=draws) for i in range(2)], 1).tolist()
mine, naive = [0] * 5, [0] * 5
accepted_total = 0
for d in drafts:
    k, nxt = accept_or_resample(P, Q, d, gen)
    mine[(d[:k] + [nxt])[0]] += 1
    naive[d[0]] += 1  # always accept: the first token is the draft's
    accepted_total += k
x = range(5)
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.bar([i - 0.3 for i in x], P[0], width=0.2, label="target p[0]", color="black")
ax.bar([i - 0.1 for i in x], [c / TRIALS for c in mine], width=0.2, label="accept_or_resample")
ax.bar([i + 0.1 for i in x], [c / TRIALS for c in naive], width=0.2, label="always accept")
ax.bar([i + 0.3 for i in x], Q[0], width=0.2, label="draft q[0]", color="gray")
ax.set(xlabel="token", ylabel="share of first tokens", title=f"{TRIALS} rounds of 2 drafts")
ax.legend()
plt.show()
print(f"accepted {accepted_total / (2 * TRIALS):.2f} of the drafts; sum(min(p, q)) for the first = "
      f"{float(torch.minimum(P[0], Q[0]).sum()):.2f}")

for temp in (0.5, 1.0):
    sampled = [speculative_sample(target, draft, p, NEW, 4, temp, torch.Generator().manual_seed(i))
               for i, p in enumerate(prompts)]
    a = sum(r.accepted for r in sampled) / sum(r.checked for r in sampled)
    tpf = sum(len(r.tokens) for r in sampled) / sum(r.target_forwards for r in sampled)
    print(f"temperature {temp}: alpha {a:.2f}, {tpf:.2f} tokens per target forward (greedy: alpha {alpha[4 if 4 in alpha else GAMMAS[-1]]:.2f})")
"""

PART3 = r"""
## Part 3 — Prompt lookup: a proposer with no model

When the output copies the input (editing code, answering from a document, re-emitting a JSON schema), the
next tokens are often *already in the context*. **Prompt lookup** (Saxena, 2023; vLLM's `ngram` speculator)
finds the most recent earlier occurrence of the last n tokens and proposes what followed it. It costs a list
search instead of draft forwards: c ≈ 0.
"""

EX3A = r"""
### Exercise: `prompt_lookup_propose(context, ngram, k) -> list[int]`

- Take the last `n` tokens of `context` for `n = ngram, ngram − 1, .., 1` (never more than `len(context) − 1`).
- Search for their **most recent earlier occurrence**: one that *ends before the last token* (so at least one
  token follows it). Scan start positions from the end backwards.
- Return up to `k` tokens that followed it (fewer if the context ends); `[]` if no n-gram matches.

Examples: `([1, 2, 3, 4, 1, 2, 3], 3, 2) -> [4, 1]`; `([1, 2, 7, 1, 2, 8, 1, 2], 2, 1) -> [8]` (the most recent
occurrence); `([4, 5, 6, 3, 6], 3, 2) -> [3, 6]` (no 3- or 2-gram match, the 1-gram `6` matches at index 2);
`([7, 7, 7, 7], 2, 4) -> [7]`.
"""

EX3B = r"""
### Exercise: `speculative_lookup(target, prompt_ids, max_new_tokens, gamma, ngram=3, eos_id=None) -> SpecRun`

The greedy loop of Part 1 with `prompt_lookup_propose(prompt + tokens so far, ngram, min(gamma, tokens still
to produce))` as the proposer: no draft model, no draft cache, `draft_forwards = 0`. A round may propose
nothing (then its verify forward is a plain decode step of 1 token, and the round records `(0, 0)`). Drafts
are cut after `eos_id`. Validate with `check_speculative(target, None, ...)` and raise ValueError for
`ngram < 1`. The tokens equal plain greedy decoding.
"""

EXP3_MD = r"""
**Experiment: where lookup wins.** A "code trace": 200 tokens of a source file, then its first 16 tokens
again, so the model goes on re-emitting the file, as a model editing code it was given does. Lookup against
the draft model there, and on the plain prompts of Part 1. Look at the drafts per round: lookup proposes
only where the context has a match, and a round without one is a plain decode step (with no draft cost).
"""

EXP3 = r"""
code_prompts = [corpus_prompt(i, 200) for i in range(1, 2 if QUICK else 4)]
code_prompts = [p + p[:16] for p in code_prompts]
rows = []
for name, ps in (("code trace", code_prompts), ("plain prompts", prompts)):
    for method in ("draft", "lookup"):
        rs = [speculative_greedy(target, draft, p, NEW, 4) if method == "draft" else speculative_lookup(target, p, NEW, 4)
              for p in ps]
        a = sum(r.accepted for r in rs) / max(1, sum(r.checked for r in rs))
        tpf = sum(len(r.tokens) for r in rs) / sum(r.target_forwards for r in rs)
        rows.append((name, method, a, tpf, sum(r.drafted for r in rs) / sum(len(r.rounds) for r in rs)))
print(f"{'prompts':14} {'proposer':8} {'alpha':>6} {'tok/fwd':>8} {'drafts/round':>13}")
for name, method, a, tpf, dpr in rows:
    print(f"{name:14} {method:8} {a:6.2f} {tpf:8.2f} {dpr:13.2f}")
"""

PART4 = r"""
## Part 4 — The formula, and where speculation stops paying

With acceptance rate α (independent per draft), γ drafts per round, a draft step costing **c** target decode
steps and a verify forward of γ + 1 tokens costing **v** target decode steps, a round yields
(1 − α^(γ+1)) / (1 − α) tokens on average and costs γc + v, so plain decoding is sped up by

$$S(\alpha, \gamma, c, v) = \frac{1 - \alpha^{\gamma + 1}}{(1 - \alpha)(\gamma c + v)}.$$

Leviathan et al. take v = 1 (a verify costs one decode step: true while decoding is memory-bound). On a
CPU, or at a large batch, v grows with the tokens scored, and that is where speculation stops paying.
"""

EX4 = r"""
### Exercise: `predicted_speedup(alpha, gamma, c, v) -> float`

The formula above. At α = 1 use its limit γ + 1 for (1 − α^(γ+1)) / (1 − α). Raise ValueError for α outside
[0, 1], γ < 1, c < 0 or v ≤ 0.
"""

EXP4_MD = r"""
**Experiment: speedup against γ, measured on the predicted curve.** For each γ: plain cached greedy (lab 00)
against your `speculative_greedy`, timed in alternating pairs (the ratio is the median). Every forward is
timed by a `CountingModel` wrapped around the models, so **c** and **v** are measured *inside* the loops, where
the two models take turns in the CPU's caches. The dashed curve predicts with the draft's cost measured
**alone** instead.
"""

EXP4 = r"""
SPEED_GAMMAS = (2, 4) if QUICK else (1, 2, 3, 4, 5, 6, 7)
PAIRS = 1 if QUICK else 3
speed_prompts = prompts[:1] if QUICK else prompts[:2]
expected = [greedy_decode(target, p, NEW) for p in speed_prompts]


def step_seconds(model, prompt):
    # a 1-token decode step of `model`, decoding alone (median over the run)
    probe = CountingModel(model)
    greedy_decode(probe, prompt, NEW)
    return statistics.median(c.seconds for c in probe.calls if c.tokens == 1)


t_alone, d_alone = step_seconds(target, prompts[0]), step_seconds(draft, prompts[0])
print(f"alone: target step {t_alone * 1e3:.2f} ms, draft step {d_alone * 1e3:.2f} ms, c = {d_alone / t_alone:.2f}")
results = {}
for g in SPEED_GAMMAS:
    base, t_probe, d_probe, spec_runs = CountingModel(target), CountingModel(target), CountingModel(draft), []
    timing = paired_benchmark(lambda: [greedy_decode(base, p, NEW) for p in speed_prompts],
                              lambda: spec_runs.extend(speculative_greedy(t_probe, d_probe, p, NEW, g) for p in speed_prompts),
                              repeats=PAIRS, warmup=1)
    assert all(r.tokens == expected[i % len(expected)] for i, r in enumerate(spec_runs))
    step = statistics.median(c.seconds for c in base.calls if c.tokens == 1)
    verify = statistics.mean(c.seconds for c in t_probe.calls if c.positions[0][0] > 0)
    c_in = statistics.mean(c.seconds for c in d_probe.calls if c.positions[0][0] > 0) / step
    a = sum(r.accepted for r in spec_runs) / sum(r.checked for r in spec_runs)
    results[g] = dict(alpha=a, c=c_in, v=verify / step, measured=timing.speedup, ratios=timing.ratios,
                      predicted=predicted_speedup(a, g, c_in, verify / step),
                      predicted_alone=predicted_speedup(a, g, d_alone / t_alone, verify / step))
print(f"{'gamma':>5} {'alpha':>6} {'c':>5} {'v':>5} {'predicted':>9} {'measured':>8}  pairs")
for g, r in results.items():
    print(f"{g:5d} {r['alpha']:6.2f} {r['c']:5.2f} {r['v']:5.2f} {r['predicted']:8.2f}x {r['measured']:7.2f}x  "
          + ", ".join(f"{x:.2f}" for x in r["ratios"]))
best = max(results, key=lambda g: results[g]["measured"])
fig, ax = plt.subplots(figsize=(7, 4))
gs = list(results)
ax.plot(gs, [results[g]["predicted"] for g in gs], "o-", label="predicted, c and v measured in the loop")
ax.plot(gs, [results[g]["predicted_alone"] for g in gs], "s--", color="gray", label="predicted, c measured alone")
ax.scatter(gs, [results[g]["measured"] for g in gs], color="red", zorder=3, s=60, label="measured (paired median)")
ax.axhline(1, color="black", lw=0.8)
ax.set(xlabel="gamma (drafts per round)", ylabel="speedup over plain cached greedy",
       title=f"draft-model speculation, batch 1 (best gamma here: {best})")
ax.legend()
plt.show()
"""

EXP4B_MD = r"""
**Experiment: latency per request.** Each prompt decoded plainly and with speculation at the best γ measured
above, one after the other; prompt lookup on the code traces.
"""

EXP4B = r"""
def seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


lat = {"plain": [], f"draft, gamma {best}": [], "plain (code)": [], "lookup (code)": []}
for p in prompts:
    lat["plain"].append(seconds(lambda: greedy_decode(target, p, NEW)))
    lat[f"draft, gamma {best}"].append(seconds(lambda: speculative_greedy(target, draft, p, NEW, best)))
for p in code_prompts:
    lat["plain (code)"].append(seconds(lambda: greedy_decode(target, p, NEW)))
    lat["lookup (code)"].append(seconds(lambda: speculative_lookup(target, p, NEW, 8)))
fig, ax = plt.subplots(figsize=(8, 3.5))
for k, (name, xs) in enumerate(lat.items()):
    ax.scatter([k] * len(xs), [1e3 * x for x in xs], label=name)
    ax.hlines(1e3 * statistics.median(xs), k - 0.25, k + 0.25, color="black")
ax.set_xticks(range(len(lat)), list(lat), rotation=10)
ax.set(ylabel=f"ms per request ({NEW} new tokens)", title="latency per request, batch 1 (bar: median)")
plt.show()
for name, xs in lat.items():
    print(f"{name:16} median {1e3 * statistics.median(xs):7.1f} ms")
"""

EXP4C_MD = r"""
**Experiment: the verify cost at batch 1, 4 and 16.** A cached forward of 5 new tokens per row (γ = 4) against
a 1-token forward, at growing batch. Speculation trades idle compute for fewer forwards: at batch 1 the extra
tokens are nearly free (v close to 1 on a GPU; larger on this CPU), but a batch that already fills the
hardware pays for every drafted token, rejected or not, and then v approaches γ + 1 and the speedup vanishes.
"""

EXP4C = r"""
def verify_cost(model, batch, context=64, tokens=5, repeats=5 if QUICK else 20):
    view = model.new_cache(batch, context + tokens + 1).rows(list(range(batch)))
    model(torch.randint(0, model.config.vocab_size, (batch, context)), torch.arange(context).expand(batch, context), view)

    def one(t):
        ids = torch.randint(0, model.config.vocab_size, (batch, t))
        t0 = time.perf_counter()
        model(ids, torch.arange(context, context + t).expand(batch, t), view)
        return time.perf_counter() - t0

    singles, multis = [], []
    for _ in range(repeats):  # interleaved: drift hits both alike
        singles.append(one(1))
        multis.append(one(tokens))
    return statistics.median(multis) / statistics.median(singles)


with torch.inference_mode():
    vs = {b: verify_cost(target, b) for b in (1, 4, 16)}
a4 = results[4]["alpha"] if 4 in results else alpha[GAMMAS[-1]]
c4 = results[4]["c"] if 4 in results else d_alone / t_alone
for b, v in vs.items():
    print(f"batch {b:2d}: v = {v:.2f}  -> predicted speedup at gamma 4: {predicted_speedup(a4, 4, c4, v):.2f}x")
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.bar([str(b) for b in vs], list(vs.values()))
ax.axhline(5, color="gray", ls="--", label="gamma + 1 = 5 (no gain from batching the tokens)")
ax.set(xlabel="batch", ylabel="v: 5-token / 1-token forward", title="verify cost grows with the batch")
ax.legend()
plt.show()
"""

WRAP_MD = r"""
## Wrap-up: your numbers
"""

WRAP = r"""
g4 = results.get(4) or results[best]
lookup_row = next(r for r in rows if r[0] == "code trace" and r[1] == "lookup")
table = [("alpha (draft, gamma 4)", f"{alpha[4] if 4 in alpha else alpha[GAMMAS[-1]]:.2f}"),
         ("tokens per target forward (gamma 4)", f"{per_forward[4] if 4 in per_forward else per_forward[GAMMAS[-1]]:.2f}"),
         ("c in the loop / alone", f"{g4['c']:.2f} / {d_alone / t_alone:.2f}"),
         ("v (5-token verify, batch 1)", f"{g4['v']:.2f}"),
         (f"speedup at gamma {best}: measured / predicted", f"{results[best]['measured']:.2f}x / {results[best]['predicted']:.2f}x"),
         ("prompt lookup on code: alpha, tokens per forward", f"{lookup_row[2]:.2f}, {lookup_row[3]:.2f}"),
         ("prompt lookup on code: speedup (plain / lookup median latency)",
          f"{statistics.median(lat['plain (code)']) / statistics.median(lat['lookup (code)']):.2f}x")]
for name, value in table:
    print(f"{name:62} {value}")
"""

ENGINES = r"""
**What real engines call these features.**
- **vLLM**: `--speculative-config '{"model": "<draft>", "num_speculative_tokens": 5}'` for a draft model;
  `{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}` for prompt lookup; also EAGLE,
  Medusa and MLP speculators (`"method": "eagle"`, ...). Acceptance metrics (accepted tokens per draft
  position) are exported like your acceptance-by-position plot.
- **SGLang**: `--speculative-algorithm` (`EAGLE`, `EAGLE3`, `NEXTN`, `STANDALONE` for a draft model, `NGRAM`),
  `--speculative-draft-model-path`, `--speculative-num-steps`, `--speculative-num-draft-tokens`,
  `--speculative-eagle-topk` (a *tree* of drafts verified in one forward).
- **TensorRT-LLM**: `speculative_decoding_mode` (draft-target "draft tokens external", Medusa, EAGLE, ReDrafter,
  lookahead decoding) and `max_draft_len`. **Hugging Face transformers**: `generate(..., assistant_model=draft)`
  (assisted generation) and `generate(..., prompt_lookup_num_tokens=10)`.
- Modern drafts are not separate small models but heads on the target's own hidden states (Medusa, EAGLE):
  nearly free to run (c ≈ 0) and accepted often.

**Questions.**
1. Your measured c inside the loop is higher than the draft's cost alone. What would make the two models stop
   evicting each other's weights (on a CPU; on a GPU, where both fit in HBM)?
2. At batch 16 the verify forward costs nearly γ + 1 decode steps here. How should a server choose γ (or turn
   speculation off) as its batch grows? What do vLLM's and SGLang's schedulers do?
3. Prompt lookup needs no model and no extra memory. On which of your own workloads would it pay, and on which
   would every round be a wasted verify of proposals that never match?
"""


def build() -> dict:
    src = graded_sources()
    cells = [
        md(INTRO), md(SETUP_MD), code(SETUP),
        md(PART1), md(EX1), graded("speculative_greedy", src), check_cell("speculative_greedy"),
        md(EXP1_MD), code(EXP1, "experiment"), md(EXP1B_MD), code(EXP1B, "experiment"),
        md(PART2), md(EX2A), graded("accept_or_resample", src), check_cell("accept_or_resample"),
        md(EX2B), graded("speculative_sample", src), check_cell("speculative_sample"),
        md(EXP2_MD), code(EXP2, "experiment"),
        md(PART3), md(EX3A), graded("prompt_lookup_propose", src), check_cell("prompt_lookup_propose"),
        md(EX3B), graded("speculative_lookup", src), check_cell("speculative_lookup"),
        md(EXP3_MD), code(EXP3, "experiment"),
        md(PART4), md(EX4), graded("predicted_speedup", src), check_cell("predicted_speedup"),
        md(EXP4_MD), code(EXP4, "experiment"), md(EXP4B_MD), code(EXP4B, "experiment"),
        md(EXP4C_MD), code(EXP4C, "experiment"),
        md(WRAP_MD), code(WRAP, "experiment"), md(ENGINES),
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}, "servelab": {"lab": LAB_ID, "role": "solution"}}
    return nb


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    nb = build()
    nbformat.validate(nb)
    out.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} ({len(nb.cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
