"""Lab 03's reference (servelab.reference.speculative, released from the solution notebook) and its grader criteria."""

from __future__ import annotations

import random

import pytest
import torch

import servelab.reference.speculative as sol
from grader.labs import lab03_speculative as lab
from grader.spec import Context, Learner, run_criterion
from servelab.acceptance import measure_acceptance
from servelab.generate import reference_greedy
from servelab.loader import load_draft, load_model, load_tokenizer
from servelab.reference.warmup import greedy_decode
from servelab.speculative import SpecRun
from servelab.workloads import load_heldout


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return load_model()


@pytest.fixture(scope="module")
def draft():
    return load_draft()


@pytest.fixture(scope="module")
def prompts():
    rng, tok, texts = random.Random(7), load_tokenizer(), load_heldout()
    out = [[rng.randrange(4096) for _ in range(n)] for n in (1, 2, 9)]
    for n in (12, 40):
        text = texts[rng.randrange(len(texts))]
        out.append(tok.encode(text[:1500], add_special_tokens=False)[:n])
    return out


@pytest.fixture(scope="module")
def expected20(target, prompts):
    return [reference_greedy(target, p, 20) for p in prompts]


# ----------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_greedy_identical(target, draft, prompts, expected20, gamma):
    for p, expected in zip(prompts, expected20):
        for d in (draft, lab.WrongDraft(draft), target):
            run = sol.speculative_greedy(target, d, p, 20, gamma)
            assert isinstance(run, SpecRun)
            assert run.tokens == expected, (gamma, len(p), d)
            assert run.target_forwards == len(run.rounds) and run.draft_forwards == run.drafted
        assert sol.speculative_greedy(target, lab.WrongDraft(draft), p, 20, gamma).accepted == 0
        everything = sol.speculative_greedy(target, target, p, 20, gamma)
        assert everything.accepted == everything.drafted and everything.alpha == 1.0
        assert len(everything.rounds) == -(-20 // (gamma + 1))  # gamma + 1 tokens a round until the last


def test_greedy_eos(target, draft, prompts):
    p = prompts[3]
    full = reference_greedy(target, p, 30)
    eos = full[12]
    expected = full[: full.index(eos) + 1]
    for g in (1, 3, 6):
        assert sol.speculative_greedy(target, draft, p, 30, g, eos_id=eos).tokens == expected
        assert sol.speculative_lookup(target, p, 30, g, eos_id=eos).tokens == expected
    assert sol.speculative_greedy(target, target, p, 30, 5, eos_id=eos).tokens == expected  # EOS among accepted drafts


def test_rejected_positions_are_overwritten(target):
    """The premise of the loop: after feeding wrong drafts at positions p.., feeding the right tokens at the
    same positions gives exactly the logits of a fresh prefill (stale K/V beyond are never read)."""
    seq = [5, 17, 300, 42, 7, 99, 1000, 3]
    view = target.new_cache(1, 16).rows([0])
    target(torch.tensor([seq[:4]]), torch.arange(4)[None], view)
    target(torch.tensor([[11, 12, 13, 14, 15]]), torch.arange(4, 9)[None], view)  # 5 "rejected" drafts
    got = target(torch.tensor([seq[4:6]]), torch.arange(4, 6)[None], view)  # the real tokens, shorter
    fresh = target(torch.tensor([seq[:6]]))[:, 4:6]
    torch.testing.assert_close(got, fresh, atol=1e-4, rtol=1e-4)
    got = target(torch.tensor([[seq[6]]]), torch.tensor([[6]]), view)  # position 6 still holds a stale draft
    torch.testing.assert_close(got, target(torch.tensor([seq[:7]]))[:, 6:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gamma", [2, 4])
def test_caches_consistent_in_the_loop(target, draft, prompts, gamma):
    for p in prompts[2:4]:
        rec = lab.Recorder(target, draft, logits=True)
        run = sol.speculative_greedy(rec.target, rec.draft, p, 24, gamma)
        assert any(a < d for d, a in run.rounds) and any(a == d for d, a in run.rounds)  # both kinds of round
        assert lab.check_caches(rec, p + run.tokens, "loop") > 0


def test_cache_check_catches_a_missing_catch_up(target, draft, prompts, monkeypatch):
    """A loop that forgets to feed the draft the last accepted draft (after an all-accepted round) fails."""
    real = sol.speculative_greedy

    class Forgetful:  # drops the first of two catch-up tokens: the draft never sees that position
        def __init__(self, model):
            self.model = model

        def __call__(self, ids, pos, cache):
            if ids.shape[1] == 2 and pos[0, 0] > 0:
                ids, pos = ids[:, 1:], pos[:, 1:]
            return self.model(ids, pos, cache)

        def __getattr__(self, name):
            return getattr(self.model, name)

    rec = lab.Recorder(target, draft, logits=True)
    inner = rec.draft
    run = real(rec.target, Forgetful(inner), prompts[3], 24, 2)
    with pytest.raises(lab.Fail, match="never fed|differ"):
        lab.check_caches(rec, prompts[3] + run.tokens, "forgetful")


def test_bookkeeping_equals_replay(target, draft, prompts):
    for g in (1, 3, 4):
        for p in prompts[1:]:
            run = sol.speculative_greedy(target, draft, p, 32, g)
            ref = measure_acceptance(target, draft, [p], 0, g, continuations=[run.tokens])
            assert (run.accepted, run.checked, len(run.rounds)) == (ref.accepted, ref.checked, ref.rounds)
            assert run.alpha == pytest.approx(ref.alpha)
            assert run.mean_accepted_length == pytest.approx(run.accepted / len(run.rounds))
            assert run.tokens_per_target_forward == pytest.approx(32 / run.target_forwards)


def test_bad_inputs(target, draft):
    from servelab.config import ModelConfig
    from servelab.model import CausalLM

    other = CausalLM(ModelConfig(**{**target.config.__dict__, "vocab_size": 100})).eval()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="gamma"):
        sol.speculative_greedy(target, draft, [1, 2], 4, 0)
    with pytest.raises(ValueError, match="vocabularies"):
        sol.speculative_greedy(target, other, [1, 2], 4, 2)
    with pytest.raises(ValueError, match="empty prompt"):
        sol.speculative_greedy(target, draft, [], 4, 2)
    with pytest.raises(ValueError, match=r"token ids must be in"):
        sol.speculative_greedy(target, draft, [1, 5000], 4, 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sol.speculative_lookup(target, [1, 2], 0, 2)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sol.speculative_sample(target, draft, [1, 2], 4, 2, t, g)
    with pytest.raises(ValueError, match="generator"):
        sol.speculative_sample(target, draft, [1, 2], 4, 2, 1.0, 3)
    with pytest.raises(ValueError, match="ngram"):
        sol.speculative_lookup(target, [1, 2], 4, 2, ngram=0)
    with pytest.raises(ValueError):
        sol.predicted_speedup(1.2, 4, 0.1, 1.0)


# ----------------------------------------------------------------------------- sampling
def always_accept(p, q, drafted, generator):
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


def resample_from_p(p, q, drafted, generator):
    for i, tok in enumerate(drafted):
        if torch.rand((), generator=generator) * q[i, tok] >= p[i, tok]:
            return i, int(torch.multinomial(p[i], 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


def bonus_from_wrong_row(p, q, drafted, generator):
    """No bonus row: when all are accepted, the extra token comes from the last draft's row p[k - 1]."""
    k, nxt = sol.accept_or_resample(p, q, drafted, generator)
    if k == len(drafted):
        nxt = int(torch.multinomial(p[k - 1], 1, generator=generator))
    return k, nxt


def test_accept_or_resample_is_lossless_on_a_hand_made_vocabulary():
    results = lab.hand_made_test(sol.accept_or_resample, seed=11)
    assert all(pv >= lab.SIGNIFICANCE for _, pv, _ in results), results


@pytest.mark.parametrize("biased", [always_accept, resample_from_p, bonus_from_wrong_row])
def test_biased_acceptance_fails_the_same_test(biased):
    results = lab.hand_made_test(biased, seed=11)
    assert min(pv for _, pv, _ in results) < lab.SIGNIFICANCE, results


def test_chi_square_p_values():
    assert lab.chi_square([50, 50], [0.5, 0.5])[2] == pytest.approx(1.0)
    stat, df, pv = lab.chi_square([60, 40], [0.5, 0.5])  # chi2 = 4, df 1: p = 0.0455
    assert (stat, df) == (pytest.approx(4.0), 1) and pv == pytest.approx(0.0455, abs=1e-3)


def test_speculative_sample_follows_the_target(target, draft):
    ctx = Context(lab="03_speculative", seed=5)
    prompt, probs = lab.sampling_prompt(ctx, 1.0)
    counts, runs = [0] * len(probs), 400
    for r in range(runs):
        run = sol.speculative_sample(target, draft, prompt, 2, 2, 1.0, torch.Generator().manual_seed(1000 + r))
        assert len(run.tokens) == 2
        counts[run.tokens[0]] += 1
    assert lab.chi_square(counts, probs)[2] >= lab.SIGNIFICANCE
    a = sol.speculative_sample(target, draft, prompt, 12, 3, 0.8, torch.Generator().manual_seed(4))
    b = sol.speculative_sample(target, draft, prompt, 12, 3, 0.8, torch.Generator().manual_seed(4))
    assert a.tokens == b.tokens and a.rounds == b.rounds and len(a.tokens) == 12


# ----------------------------------------------------------------------------- prompt lookup and the formula
def test_prompt_lookup_proposals():
    for context, ngram, k, want in lab.LOOKUP_CASES:
        assert sol.prompt_lookup_propose(context, ngram, k) == want, (context, ngram, k)
    rng = random.Random(0)
    for _ in range(200):
        c = [rng.randrange(5) for _ in range(rng.randint(1, 25))]
        n, k = rng.randint(1, 4), rng.randint(1, 5)
        assert sol.prompt_lookup_propose(c, n, k) == lab._reference_lookup(c, n, k)


@pytest.mark.parametrize("gamma", [1, 4, 7])
def test_lookup_identical(target, prompts, gamma):
    for p in prompts:
        run = sol.speculative_lookup(target, p, 24, gamma)
        assert run.tokens == reference_greedy(target, p, 24)
        assert run.draft_forwards == 0 and run.target_forwards == len(run.rounds)


def test_predicted_speedup():
    assert sol.predicted_speedup(0.0, 3, 0.0, 1.0) == pytest.approx(1.0)
    assert sol.predicted_speedup(1.0, 4, 0.0, 1.0) == pytest.approx(5.0)
    assert sol.predicted_speedup(0.8, 4, 0.26, 1.5) == pytest.approx((1 - 0.8**5) / 0.2 / (4 * 0.26 + 1.5))


# ----------------------------------------------------------------------------- the criteria, in process
CORRECTNESS = ["greedy_identical", "caches_consistent", "bad_inputs", "bookkeeping", "sampling_hand_made",
               "sampling_real_models", "lookup_proposals", "lookup_identical", "formula"]


@pytest.mark.parametrize("crit", CORRECTNESS)
def test_solution_passes_criterion(crit):
    ctx = Context(lab="03_speculative", quick=True, seed=21)
    res = run_criterion(lab.LAB.get(crit), Learner(vars(sol)), ctx)
    assert res.status == "passed", res.message


def test_tokens_per_forward_criterion():
    ctx = Context(lab="03_speculative", quick=True, seed=21, threshold=2.5)
    res = run_criterion(lab.LAB.get("tokens_per_forward"), Learner(vars(sol)), ctx)
    assert res.status == "passed", res.message


def test_planted_bug_fails_greedy():
    """A loop that accepts one draft too many (off by one in the comparison) is caught."""
    import inspect

    src = inspect.getsource(sol.speculative_greedy).replace("drafted[j] == best[j]", "drafted[j] == best[j + 1]")
    ns = dict(vars(sol))
    exec(compile(src.replace("@torch.inference_mode()\n", ""), "<planted>", "exec"), ns)
    ctx = Context(lab="03_speculative", quick=True, seed=21)
    res = run_criterion(lab.LAB.get("greedy_identical"), Learner(ns), ctx)
    assert res.status == "failed", res.message


def test_gpu_criterion_blocked_without_cuda():
    res = run_criterion(lab.LAB.get("gpu_hf_pair"), Learner(vars(sol)), Context(lab="03_speculative"))
    assert res.status == "blocked"


def test_greedy_decode_baseline_agrees(target, prompts):
    assert greedy_decode(target, prompts[3], 16) == reference_greedy(target, prompts[3], 16)


def test_the_lookup_trace_keeps_prompts_the_target_re_emits():
    """The offline count of what prompt lookup reaches equals the solution's real run, and the speed trace keeps
    the candidate prompts lookup does best on (seed 1945022833 once drew one at 1.4 tokens per verify)."""
    from grader.checks import corpus_prompts
    from servelab.reference.warmup import greedy_decode

    ctx = Context(lab="03_speculative", seed=1945022833)
    target, scores = ctx.model(), []
    for _, p in corpus_prompts(ctx, lab.LOOKUP_CANDIDATES, (200, 200), "speed-lookup"):
        p = p + p[:16]
        offline = lab.lookup_tokens_per_verify(p, greedy_decode(target, p, lab.SPEED_NEW_TOKENS))
        assert offline == pytest.approx(sol.speculative_lookup(target, p, lab.SPEED_NEW_TOKENS, 4).tokens_per_target_forward)
        scores.append((offline, p))
    assert min(scores)[0] < 1.5 < max(scores)[0]  # the draw has a poor prompt and a good one
    assert lab.speed_prompts(ctx, "lookup", 1) == [max(scores)[1]]
