"""servelab.disagg.tp: a model split by heads over 2 real processes (gloo) computes the single-rank logits, and
each rank's paged cache holds its slice of the single-rank cache's KV heads."""
from __future__ import annotations

import functools

import pytest
import torch

from servelab.disagg.launch import run_ranks
from servelab.disagg.tp import head_slice, shard_config, shard_model
from servelab.model import CausalLM
from servelab.paged.cache import PagedKVCache
from test_step_metadata import tiny_model as step_metadata_tiny_model


tiny_model = functools.partial(step_metadata_tiny_model, intermediate=48)  # random weights, biases when asked


def _forward(model: CausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits [1, T, V] of a prefill into a fresh paged cache (blocks of 4), and that cache's K and V per layer."""
    cache = PagedKVCache.for_model(model, 8, 4)
    n = ids.shape[1]
    logits = model(ids, torch.arange(n)[None], cache.view([list(range(-(-n // 4)))]))
    return logits, cache.k, cache.v


CASES = {"plain": {}, "fused": {"fuse": True}, "biases, tied embeddings": {"qkv_bias": True, "mlp_bias": True,
                                                                           "tie": True}}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tp2_forward_equals_the_single_rank_one(case):
    kw = dict(CASES[case])
    fuse = kw.pop("fuse", False)
    model = tiny_model(**kw)
    if fuse:
        model.fuse_projections()
    ids = torch.randint(1, 97, (1, 13), generator=torch.Generator().manual_seed(1))
    want_logits, want_k, want_v = _forward(model, ids)

    def rank(ctx):
        shard = shard_model(model, ctx.rank, 2)
        assert shard.fused == fuse and shard.config.num_kv_heads == 1
        return _forward(shard, ids)

    results = run_ranks([rank, rank], timeout_s=60)
    assert all(r.ok for r in results), [r.error for r in results]
    for r in results:
        logits, k, v = r.value
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        heads = head_slice(2, r.rank, 2)
        for layer in range(3):
            torch.testing.assert_close(k[layer], want_k[layer][:, :, heads], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[layer], want_v[layer][:, :, heads], rtol=1e-5, atol=1e-5)
    assert results[0].value[1][0].abs().sum() > 0  # the KV is real, not an untouched cache


def test_heads_that_do_not_divide_are_refused():
    cfg = tiny_model().config
    with pytest.raises(ValueError, match="2 KV heads do not divide by 4"):
        shard_config(cfg, 4)
    assert shard_config(cfg, 2).num_heads == 2 and shard_config(cfg, 2).intermediate_size == 24


def test_a_world_of_one_is_the_model_itself():
    model = tiny_model()
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(shard_model(model, 0, 1)(ids), model(ids))
