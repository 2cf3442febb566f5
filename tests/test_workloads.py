import itertools
import json

import numpy as np
import pytest

from servelab import workloads as wl

CORPUS = list(range(1000, 3000))  # 2000 distinct "tokens" so slices identify their offset


def fake_encode(text: str) -> list[int]:
    """A stand-in tokenizer: one token per character, plus a BOS the trace builder must strip."""
    return [1] + [ord(c) + 10 for c in text]


def test_same_seed_same_trace_and_different_seed_differs():
    args = ("t", 16, wl.uniform(4, 20), wl.log_uniform(8, 256), wl.poisson(5.0))
    a = wl.make_trace(*args, seed=3, corpus_tokens=CORPUS)
    b = wl.make_trace(*args, seed=3, corpus_tokens=CORPUS)
    c = wl.make_trace(*args, seed=4, corpus_tokens=CORPUS)
    assert a == b
    assert a != c


def test_lengths_respect_distributions_and_prompts_are_contiguous_slices():
    tr = wl.make_trace("t", 200, wl.uniform(16, 64), wl.log_uniform(8, 256), wl.all_at_once(), seed=0,
                       corpus_tokens=CORPUS)
    assert len(tr) == 200
    for r in tr.requests:
        assert 16 <= r.prompt_len <= 64 and 8 <= r.max_new_tokens <= 256
        assert r.prompt_ids == list(range(r.prompt_ids[0], r.prompt_ids[0] + r.prompt_len))
        assert r.arrival_s == 0.0
    outs = np.array([r.max_new_tokens for r in tr.requests])
    assert np.median(outs) < 70 < outs.max()  # skewed: most short, a few long


def test_fixed_lengths():
    tr = wl.make_trace("t", 5, wl.fixed(7), wl.fixed(3), wl.all_at_once(), seed=0, corpus_tokens=CORPUS)
    assert {r.prompt_len for r in tr.requests} == {7} and {r.max_new_tokens for r in tr.requests} == {3}


def test_poisson_and_gamma_arrivals_have_the_requested_rate():
    rng = np.random.default_rng(0)
    for arr in (wl.poisson(10.0), wl.gamma(10.0, 0.5)):
        t = arr.sample(rng, 4001)
        assert t[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(t))
        assert 9.0 < 4000 / t[-1] < 11.0
    gaps = lambda a: np.diff(a.sample(np.random.default_rng(1), 4001))
    cv = lambda g: g.std() / g.mean()
    assert cv(gaps(wl.gamma(10.0, 0.5))) > 1.2 > cv(gaps(wl.poisson(10.0)))  # burstier = more variable gaps


def test_changing_arrivals_keeps_prompts_and_lengths():
    a = wl.standard_trace("poisson", corpus_tokens=CORPUS)
    b = wl.standard_trace("bursty", corpus_tokens=CORPUS)
    assert [r.prompt_ids for r in a.requests] == [r.prompt_ids for r in b.requests]
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in b.requests]


def test_json_round_trip_and_describe():
    tr = wl.standard_trace("skewed", corpus_tokens=CORPUS)
    back = wl.Trace.from_json(tr.to_json())
    assert back == tr
    json.loads(tr.to_json())
    d = tr.describe()
    assert d["n"] == 128 and 16 <= d["prompt_len_min"] <= d["prompt_len_max"] <= 64
    assert 4 <= d["output_len_min"] and d["output_len_max"] <= 384 and d["duration_s"] == 0.0
    assert tr.params["prompt_len"] == {"kind": "uniform", "lo": 16, "hi": 64}


def test_params_regenerate_the_trace():
    tr = wl.standard_trace("bursty", corpus_tokens=CORPUS)
    p = tr.params
    again = wl.make_trace(tr.name, p["n_requests"], wl.LengthDist(**p["prompt_len"]), wl.LengthDist(**p["output_len"]),
                          wl.Arrivals(**p["arrivals"]), tr.seed, corpus_tokens=CORPUS)
    assert again.requests == tr.requests


def test_scale_shrinks_requests_and_outputs():
    full = wl.standard_trace("skewed", corpus_tokens=CORPUS)
    small = wl.standard_trace("skewed", corpus_tokens=CORPUS, scale=0.25)
    tiny = wl.standard_trace("skewed", corpus_tokens=CORPUS, scale=0.01)
    assert len(small) == 32 and len(tiny) == 4
    assert max(r.max_new_tokens for r in small.requests) <= 96 < max(r.max_new_tokens for r in full.requests)


def test_all_standard_traces_build():
    assert set(wl.STANDARD_TRACES) >= {"uniform", "skewed", "poisson", "bursty"}
    for name in wl.STANDARD_TRACES:
        assert len(wl.standard_trace(name, corpus_tokens=CORPUS, scale=0.1)) >= 4


def test_prompts_from_heldout_text_with_encoder():
    tr = wl.make_trace("t", 6, wl.uniform(20, 300), wl.fixed(4), wl.all_at_once(), seed=0, encode=fake_encode)
    texts = wl.load_heldout()
    for r in tr.requests:
        assert 1 not in r.prompt_ids  # BOS stripped
        text = "".join(chr(t - 10) for t in r.prompt_ids)
        assert len(text) == r.prompt_len and any(text in doc for doc in texts)
    assert tr.params["source"] == "heldout.jsonl"


class _Tok:
    """Tokenizer-like object: encode/decode methods, so prompt_text gets filled."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_tokenizer_object_fills_prompt_text():
    tr = wl.make_trace("t", 3, wl.fixed(40), wl.fixed(4), wl.all_at_once(), seed=1, encode=_Tok())
    for r in tr.requests:
        assert len(r.prompt_text) == 40 and r.prompt_ids == [ord(c) for c in r.prompt_text]


@pytest.mark.parametrize("make, match", [
    (lambda: wl.fixed(0), ">= 1"),
    (lambda: wl.uniform(-3, 5), ">= 1"),
    (lambda: wl.uniform(10, 5), "greater than"),
    (lambda: wl.LengthDist("zipf", 1, 2), "unknown length"),
    (lambda: wl.poisson(0), "rate > 0"),
    (lambda: wl.gamma(-1.0, 0.5), "rate > 0"),
    (lambda: wl.gamma(1.0, 0.0), "burstiness"),
    (lambda: wl.make_trace("t", 0, wl.fixed(4), wl.fixed(4), wl.all_at_once(), 0, corpus_tokens=CORPUS), "n_requests"),
    (lambda: wl.make_trace("t", 2, wl.fixed(5000), wl.fixed(4), wl.all_at_once(), 0, corpus_tokens=CORPUS),
     "longer than corpus"),
    (lambda: wl.make_trace("t", 2, wl.fixed(10**6), wl.fixed(4), wl.all_at_once(), 0, encode=fake_encode),
     "longer than every"),
    (lambda: wl.make_trace("t", 2, wl.fixed(4), wl.fixed(4), wl.all_at_once(), 0), "exactly one"),
    (lambda: wl.standard_trace("nope", corpus_tokens=CORPUS), "skewed"),
    (lambda: wl.standard_trace("skewed", corpus_tokens=CORPUS, scale=0), "scale"),
])
def test_bad_parameters_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_encode_must_be_callable():
    with pytest.raises(TypeError, match="encode must be"):
        wl.make_trace("t", 2, wl.fixed(4), wl.fixed(4), wl.all_at_once(), 0, encode=42)
