"""A step's attention metadata: built once per forward on the host, one copy to the device, no sync in a layer."""
from __future__ import annotations

import contextlib

import pytest
import torch

from servelab import device as devmod
from servelab.attention import causal_mask, reference_attention
from servelab.config import ModelConfig
from servelab.kv_cache import NoCache, SlotView
from servelab.model import CausalLM, DecoderLayer
from servelab.reference.warmup import greedy_decode


def tiny_model(dev: str | torch.device = "cpu", *, intermediate: int = 64, qkv_bias: bool = False,
               mlp_bias: bool = False, tie: bool = False) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=intermediate, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, qkv_bias=qkv_bias, mlp_bias=mlp_bias,
                      tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    model = CausalLM(cfg).eval()
    for p in model.parameters():  # random, not zeros: every weight, bias included, must matter
        torch.nn.init.normal_(p, std=0.3)
    return model.to(dev)  # drawn on the CPU: the same weights on any device


SYNCING = ("item", "tolist", "nonzero", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_sync_in_layers(monkeypatch):
    """Inside every decoder layer, any Tensor -> Python value (what makes a GPU host wait) raises."""
    inside = {"on": False}

    def guard(name, original):
        def wrapped(self, *a, **k):
            if inside["on"]:
                raise AssertionError(f"Tensor.{name}() inside a layer: that is a host<->device sync on a GPU")
            return original(self, *a, **k)
        return wrapped

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    layer_forward = DecoderLayer.forward

    def forward(self, *a, **k):
        inside["on"] = True
        try:
            return layer_forward(self, *a, **k)
        finally:
            inside["on"] = False

    monkeypatch.setattr(DecoderLayer, "forward", forward)
    yield


def test_plan_once_per_step_and_every_layer_gets_that_metadata(monkeypatch):
    model = tiny_model()
    plans, seen = [], []
    plan, attend = SlotView.plan, SlotView.attend

    def counting_plan(self, positions):
        meta = plan(self, positions)
        plans.append(meta)
        return meta

    def recording_attend(self, layer, q, k, v, meta):
        seen.append((layer, meta))
        return attend(self, layer, q, k, v, meta)

    monkeypatch.setattr(SlotView, "plan", counting_plan)
    monkeypatch.setattr(SlotView, "attend", recording_attend)
    out = greedy_decode(model, [5, 9, 2, 7], 6)
    assert len(out) == 6
    assert len(plans) == 6  # one prefill + 5 decode steps: one plan each, not one per layer
    assert len(seen) == 6 * model.config.num_layers
    for step in range(6):
        metas = {id(m) for _, m in seen[step * 3:(step + 1) * 3]}
        assert len(metas) == 1, "all layers of one step must share one metadata object"
    assert [layer for layer, _ in seen[:3]] == [0, 1, 2]


@pytest.mark.parametrize("slots", [[0, 1, 2], [2, 0], [1]])
def test_no_host_sync_inside_layers(monkeypatch, slots):
    """Padded prefill and decode through any slots, and a plain forward: no Tensor->Python inside a layer."""
    model = tiny_model()
    cache = model.new_cache(num_slots=3, max_len=32)
    ids = torch.randint(0, 97, (len(slots), 5))
    pos = torch.arange(5).repeat(len(slots), 1)
    pos[0, :2] = -1  # left padding in row 0
    with no_host_sync_in_layers(monkeypatch):
        prefill = model(ids, pos, cache.rows(slots))
        step = model(ids[:, :1], torch.full((len(slots), 1), 5), cache.rows(slots))
        plain = model(ids)
    assert torch.isfinite(prefill).all() and torch.isfinite(step).all() and torch.isfinite(plain).all()


def test_the_guard_catches_a_sync_in_a_layer(monkeypatch):
    """The test above can fail: a layer that reads a Python int from a tensor is caught."""
    model = tiny_model()

    def syncing_attend(self, layer, q, k, v, meta):
        int(meta.positions.max())  # what the old SlotView.attend did in every layer
        return NoCache.attend(self, layer, q, k, v, meta)

    monkeypatch.setattr(NoCache, "attend", syncing_attend)
    with no_host_sync_in_layers(monkeypatch), pytest.raises(AssertionError, match="inside a layer"):
        model(torch.randint(0, 97, (1, 4)))


def test_metadata_matches_the_layout_it_describes():
    model = tiny_model()
    cache = model.new_cache(num_slots=4, max_len=16)
    pos = torch.tensor([[-1, 0, 1], [3, 4, 5]])
    meta = cache.rows([3, 1]).plan(pos)
    assert meta.write_index.tolist() == [1, 2, 3, 4, 5]  # the padding token (row 0, column 0) is never written
    assert meta.write_slot.tolist() == [3, 3, 1, 1, 1]
    assert meta.write_pos.tolist() == [0, 1, 3, 4, 5]
    assert meta.k_pos.tolist() == list(range(6)) and not meta.dense and not meta.identity
    assert meta.q_pos.tolist() == [[-1, -1, -1], [3, 4, 5], [-1, -1, -1], [-1, 0, 1]]
    with pytest.raises(ValueError, match="does not fit.*16 tokens"):
        cache.rows([0]).plan(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="2 rows but the cache view has 1"):
        cache.rows([0]).plan(pos)


def test_prebuilt_mask_equals_the_one_built_from_positions():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    q_pos = torch.tensor([[-1, 4, 5], [0, 1, 2]])
    k_pos = torch.arange(6).expand(2, 6)
    a = reference_attention(q, k, v, q_pos, k_pos)
    b = reference_attention(q, k, v, mask=causal_mask(q_pos, k_pos))
    torch.testing.assert_close(a, b)
    assert a[0, :, 0].abs().sum() == 0  # the padding query gets zeros
    with pytest.raises(ValueError, match="needs q_pos and k_pos"):
        reference_attention(q, k, v)


def test_host_to_device_makes_one_copy(monkeypatch):
    """Off the CPU, all host tensors of a step travel in one packed copy (the 'meta' device stands in for a
    GPU here; the pinned-memory branch runs only where CUDA exists and is covered by the gpu test)."""
    monkeypatch.setattr(devmod, "pinned_memory_available", lambda: False)
    copies = []
    to = torch.Tensor.to

    def counting_to(self, *a, **k):
        copies.append(a)
        return to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    a, b, c = torch.arange(6).view(2, 3), torch.tensor([7]), torch.zeros(0, dtype=torch.long)
    moved = devmod.host_to_device([a, b, c], "meta")
    assert len(copies) == 1
    assert [t.device.type for t in moved] == ["meta"] * 3
    assert [tuple(t.shape) for t in moved] == [(2, 3), (1,), (0,)]
    assert devmod.host_to_device([a], "cpu")[0] is a  # the CPU: nothing to move
    with pytest.raises(ValueError, match="host LongTensors"):
        devmod.host_to_device([torch.ones(2)], "meta")


def test_inputs_already_on_the_device_still_work():
    """A learner who builds inputs with device=model.device gets the same logits (at one sync per call)."""
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(model(ids), model(ids.to(model.device), torch.arange(6).expand(2, 6).to(model.device)))


def test_bad_token_ids_are_caught_on_the_host():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\), got 0..97"):
        model(torch.tensor([[0, 97]]))


@pytest.mark.gpu
def test_decode_step_never_syncs_on_a_gpu():
    """On CUDA: prefill and decode steps through the contiguous cache run under sync-debug mode 'error'."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model("cuda")
    cache = model.new_cache(num_slots=3, max_len=32)
    ids = torch.randint(0, 97, (2, 5))
    pos = torch.arange(5).repeat(2, 1)
    pos[1, :3] = -1
    model(ids, pos, cache.rows([2, 0]))  # warm-up: first-call allocations may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(ids, pos, cache.rows([2, 0]))
        for p in range(5, 9):
            logits = model(ids[:, :1], torch.full((2, 1), p), cache.rows([2, 0]))
        model(ids)  # no cache
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = tiny_model("cpu")
    ref_cache = ref.new_cache(num_slots=3, max_len=32)
    ref(ids, pos, ref_cache.rows([2, 0]))
    for p in range(5, 9):
        ref_logits = ref(ids[:, :1], torch.full((2, 1), p), ref_cache.rows([2, 0]))
    torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-4, rtol=1e-4)


def test_fused_projections_are_a_switch_with_identical_results():
    """load_model(fuse_projections=...) : one matmul for q/k/v and one for gate/up gives the same logits."""
    from servelab import load_model

    plain, fused = load_model(fuse_projections=False), load_model()
    assert fused.fused and not plain.fused
    assert hasattr(plain.model.layers[0].self_attn, "q_proj") and fused.model.layers[0].self_attn.qkv_proj is not None
    ids = torch.randint(0, plain.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fused(ids), plain(ids), atol=1e-5, rtol=1e-5)
    assert greedy_decode(fused, ids[0].tolist(), 12) == greedy_decode(plain, ids[0].tolist(), 12)


def test_low_precision_rmsnorm_scales_after_the_cast():
    """bf16: normalise in fp32, cast, then scale (the reference order), not scale in fp32."""
    from servelab.model import RMSNorm

    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm.float()(x32), expected.float(), atol=2e-2, rtol=2e-2)


def test_a_step_where_every_query_sees_every_key_builds_no_mask():
    """Batch-1 decode (and any batch whose rows all sit at the span's last position) skips the mask: same logits."""
    model = tiny_model()
    cache, ref = model.new_cache(num_slots=2, max_len=16), model.new_cache(num_slots=2, max_len=16)
    ids = torch.randint(0, 97, (2, 6))
    model(ids, torch.arange(6).expand(2, 6), cache.rows([0, 1]))
    model(ids, torch.arange(6).expand(2, 6), ref.rows([0, 1]))
    view = cache.rows([0, 1])
    meta = view.plan(torch.tensor([[6], [6]]))
    assert meta.sees_every_key and not view.plan(torch.tensor([[6], [5]])).sees_every_key
    assert not cache.rows([1]).plan(torch.tensor([[6]])).sees_every_key  # slot 0 is in the view, not the batch
    fast = model(ids[:, :1], torch.tensor([[6], [6]]), view)
    plan = SlotView.plan

    def plan_with_mask(self, positions):  # the same step with the mask built anyway
        meta = plan(self, positions)
        meta.sees_every_key = False
        return meta

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SlotView, "plan", plan_with_mask)
        slow = model(ids[:, :1], torch.tensor([[6], [6]]), ref.rows([0, 1]))
    torch.testing.assert_close(fast, slow)
