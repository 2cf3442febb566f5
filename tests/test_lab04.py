"""Lab 04 (disaggregation): its library pieces, and classic wrong implementations planted into the solution,
each failing a named criterion with words that fit."""
from __future__ import annotations

import pytest
import torch
from planted import assert_fails, planted

import servelab.reference.disaggregation as solution
from grader.labs import lab04_disagg as lab04

from servelab.workloads import mixed_trace

CLASSIC = [
    ("chunked: decodes not counted in the step's budget",
     [("        budget = step_tokens - len(decoding)\n", "        budget = step_tokens\n")],
     "chunked_budget", "the budget is step_tokens"),
    ("chunked: a whole prompt in one step, whatever the budget",
     [("            n = min(budget, r.prompt_len)\n", "            n = r.prompt_len\n")],
     "chunked_budget", "the budget is step_tokens"),
    ("chunked: every chunk at positions from 0",
     [("        positions[row, width - n:] = torch.arange(seq.computed, seq.computed + n)",
       "        positions[row, width - n:] = torch.arange(n)")],
     "chunked_identical", "diverged at token"),
    ("connector: V sent before K",
     [("    return [link.isend(cache.k[layer][index]), link.isend(cache.v[layer][index])]",
       "    return [link.isend(cache.v[layer][index]), link.isend(cache.k[layer][index])]")],
     "kv_transfer_bitwise", "differs at block"),
    ("connector: received blocks scattered in sorted order, not table order",
     [("    index = torch.tensor(table, device=cache.k[0].device)",
       "    index = torch.tensor(sorted(table), device=cache.k[0].device)")],
     "kv_transfer_bitwise", "differs at block"),
    ("decode worker: receives into every reserved block, not only the prompt's",
     [("recv_kv(link, cache, table[:blocks_for(header[\"num_tokens\"], block_size)])",
       "recv_kv(link, cache, table)")],
     "disagg_identical", "request"),
    ("decode worker: a timed-out transfer is not caught",
     [("                tail_handle.wait()\n            except TransferTimeout as err:",
       "                tail_handle.wait()\n            except KeyError as err:")],
     "disagg_robust", "the decode worker failed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,edits,criterion,words", CLASSIC, ids=[c[0] for c in CLASSIC])
def test_classic_bug_fails_its_criterion(name, edits, criterion, words):
    assert_fails(lab04.LAB, solution, name, edits, criterion, words)


def test_mixed_trace_is_seeded_and_mixed():
    a, b = mixed_trace(n_requests=20, corpus_tokens=list(range(2000))), mixed_trace(n_requests=20,
                                                                                     corpus_tokens=list(range(2000)))
    assert [(r.prompt_ids, r.max_new_tokens, r.arrival_s) for r in a.requests] == \
        [(r.prompt_ids, r.max_new_tokens, r.arrival_s) for r in b.requests]
    docs = [r for r in a.requests if r.prompt_len >= 384]
    assert len(docs) == 12 and all(2 <= r.max_new_tokens <= 4 for r in docs)
    assert all(96 <= r.max_new_tokens <= 128 for r in a.requests if r not in docs)
    assert [r.id for r in a.requests] == list(range(20))
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a.requests, a.requests[1:]))
    with pytest.raises(ValueError, match="doc_share"):
        mixed_trace(corpus_tokens=list(range(2000)), doc_share=1.0)


def test_after_each_layer_runs_once_per_layer_and_changes_nothing():
    from servelab import load_model
    from servelab.disagg.hooks import after_each_layer
    from servelab.paged.cache import PagedKVCache

    model = load_model()
    ids = torch.randint(1, 4000, (1, 9), generator=torch.Generator().manual_seed(0))
    plain, hooked = (PagedKVCache.for_model(model, 4, 4) for _ in range(2))
    seen = []
    want = model(ids, torch.arange(9)[None], plain.view([[0, 1, 2]]))
    got = model(ids, torch.arange(9)[None], after_each_layer(hooked.view([[0, 1, 2]]), seen.append))
    assert seen == list(range(model.config.num_layers))
    assert torch.equal(want, got) and all(torch.equal(a, b) for a, b in zip(plain.k + plain.v, hooked.k + hooked.v))


def test_serve_colocated_runs_here_and_restores_threads():
    from servelab import load_model
    from servelab.disagg.serve import serve_colocated
    from servelab.reference.paged import paged_continuous_batching
    from servelab.reference.warmup import greedy_decode

    model, before = load_model(), torch.get_num_threads()
    reqs = mixed_trace(n_requests=3, corpus_tokens=list(range(1, 2000)), rate_per_s=1000.0).requests
    run = serve_colocated(paged_continuous_batching, model, reqs, None, threads=1, max_running=4,
                          max_step_tokens=4096, num_blocks=256, block_size=16)
    assert torch.get_num_threads() == before
    for r in reqs:
        assert run.completions[r.id].tokens == greedy_decode(model, r.prompt_ids, r.max_new_tokens)


def test_counting_clock_marks_split_forwards_into_steps():
    from grader.probes import CountingClock, RecordingModel
    from servelab import load_model

    model = load_model()
    probe, clock = RecordingModel(model), CountingClock()
    for n in (1, 2, 0, 1):  # forwards per step; a step may run none
        for _ in range(n):
            probe(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))
        clock.step()
    steps = [sum(m < f.seq for m in clock.marks) for f in probe.forwards]
    assert steps == [0, 1, 1, 3] and clock.steps == 4


def test_the_last_rank_ending_ends_the_run():
    """serve_disaggregated's decode worker is the last rank: once it has returned, a prefill worker that still
    hangs is killed after the grace period, not at the deadline."""
    import time

    from servelab.disagg.launch import GRACE_S, run_ranks

    t0 = time.monotonic()
    hang, done = run_ranks([lambda ctx: time.sleep(60), lambda ctx: "done"], names=["prefill", "decode"],
                           timeout_s=30, last=1)
    assert done.ok and done.value == "done"
    assert not hang.ok and "after rank 1 (decode) ended" in hang.error
    assert time.monotonic() - t0 < GRACE_S + 5


def test_serve_colocated_runs_in_a_rank_on_a_gpu(monkeypatch):
    """The CUDA branch (the probe faked): the engine runs in a forked rank, its run comes back."""
    import servelab.device
    from servelab import load_model
    from servelab.disagg.serve import serve_colocated
    from servelab.reference.paged import paged_continuous_batching

    model = load_model()
    monkeypatch.setattr(servelab.device, "get_device", lambda request=None: torch.device("cuda", 0))
    monkeypatch.setattr(servelab.device, "rank_devices", lambda n, request=None: [torch.device("cpu")] * n)
    monkeypatch.setattr("servelab.disagg.serve._load", lambda m, device: m)  # the rank keeps the CPU model
    import os

    pid, seen = os.getpid(), []
    reqs = mixed_trace(n_requests=2, corpus_tokens=list(range(1, 2000)), rate_per_s=1000.0).requests

    def engine(m, requests, **kw):
        seen.append(os.getpid())  # in the rank: this list is the rank's copy, so it stays empty here
        return paged_continuous_batching(m, requests, **kw)

    run = serve_colocated(engine, model, reqs, None, max_running=2, max_step_tokens=4096, num_blocks=128,
                          block_size=16)
    assert seen == [] and os.getpid() == pid
    assert sorted(run.completions) == [0, 1] and all(c.tokens for c in run.completions.values())


SIM_BUGS = [
    ("simulator: the handover costs nothing",
     [("    ready = sorted(((end + costs.transfer_s(r.prompt_len), r) for end, r in handed),",
       "    ready = sorted(((end, r) for end, r in handed),")], "simulate_matches", "token 0"),
    ("simulator: a decode step priced at the batch it started with plus one",
     [("len(left), any(a <= t < b for a, b in busy), longest)", "len(left) + 1, any(a <= t < b for a, b in busy), longest)")],
     "simulate_matches", "decode step"),
    ("simulator: a decode step priced without the KV it reads",
     [("any(a <= t < b for a, b in busy), longest)", "any(a <= t < b for a, b in busy))")],
     "simulate_matches", "decode step"),
]

# the model checked against a real run: clearly wrong models miss it in every one of the criterion's runs
VALIDATE_BUGS = [
    ("simulator: a decode step priced without the KV it reads",
     [("any(a <= t < b for a, b in busy), longest)", "any(a <= t < b for a, b in busy))")],
     "simulate_validates", "not within 20%"),
    ("simulator: a decode step priced as one request's, whatever the batch",
     [("t += costs.decode_step_s(len(left), any(a <= t < b for a, b in busy), longest)",
       "t += costs.decode_step_s(1, any(a <= t < b for a, b in busy))")],
     "simulate_validates", "not within 20%"),
]


@pytest.mark.parametrize("name,edits,criterion,words", SIM_BUGS, ids=[c[0] for c in SIM_BUGS])
def test_simulator_bug_fails(name, edits, criterion, words):
    assert_fails(lab04.LAB, solution, name, edits, criterion, words, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("name,edits,criterion,words", VALIDATE_BUGS, ids=[c[0] for c in VALIDATE_BUGS])
def test_wrong_simulator_misses_the_real_run(name, edits, criterion, words):
    from grader.spec import Context, run_criterion
    from grader.thresholds import threshold

    ctx = Context(lab04.LAB.id, quick=True, seed=5, threshold=threshold("cpu", lab04.LAB.id, criterion))
    res = run_criterion(lab04.LAB.get(criterion), planted(solution, *edits), ctx)
    assert res.status == "failed" and words in res.message, f"{name}: {res.status}: {res.message}"
    assert "every simulated TPOT is too low" in res.message and not res.metrics.get("noise")


def test_costs_fit_medians_per_size():
    from servelab.disagg.costs import fit_line

    base, slope = fit_line([(1, 2.0), (1, 2.0), (1, 50.0), (3, 6.0), (5, 10.0)])  # the outlier is not a median
    assert abs(base) < 1e-12 and abs(slope - 2.0) < 1e-12
    assert fit_line([(4, 1.5), (4, 2.5)]) == (2.0, 0.0)
    with pytest.raises(ValueError):
        fit_line([])


def test_costs_from_run_fit_prefills_and_handovers():
    """A hand-made run: each prefill forward's time against its prompt, each handover from the end of the prefill
    forward to the first token; a run whose requests have one token each has no interval to fit a step to."""
    from servelab.disagg.costs import costs_from_run
    from servelab.engine import Completion, DisaggRun
    from servelab.workloads import Request

    reqs = [Request(0, list(range(100)), 6, 0.0), Request(1, list(range(200)), 3, 0.04)]
    run = DisaggRun("test", {}, 6, 4)
    run.prefill_forwards = [[1, 100, 0.0, 0.02], [1, 200, 0.05, 0.04]]
    run.decode_forwards = [[1, 1, 0.03, 0.01], [1, 1, 0.04, 0.01], [1, 1, 0.08, 0.01], [2, 1, 0.10, 0.01],
                           [2, 1, 0.11, 0.01], [1, 1, 0.12, 0.01]]
    run.completions = {0: Completion(0, [5] * 6, [0.025, 0.04, 0.05, 0.09, 0.11, 0.12]),
                       1: Completion(1, [5] * 3, [0.10, 0.11, 0.12])}
    costs = costs_from_run(run, reqs)
    assert (costs.prefill_base_s, costs.prefill_per_token_s) == pytest.approx((0.0, 0.0002))
    assert costs.transfer_s(100) == pytest.approx(0.005) and costs.transfer_s(200) == pytest.approx(0.01)
    assert min(costs.decode_base_s, costs.decode_per_seq_s, costs.decode_per_kv_token_s,
               costs.decode_slowdown_while_prefill) >= 0
    run.completions = {0: Completion(0, [5], [0.025])}
    with pytest.raises(ValueError, match="at least two tokens"):
        costs_from_run(run, reqs)


def test_a_prefill_turn_runs_to_the_next_forward_when_the_next_request_waited():
    from servelab.disagg.costs import prefill_turns
    from servelab.engine import Completion, DisaggRun
    from servelab.workloads import Request

    reqs = [Request(0, [1] * 100, 2, 0.0), Request(1, [1] * 50, 2, 0.01), Request(2, [1] * 80, 2, 0.5)]
    run = DisaggRun("test", {i: Completion(i, [5], [1.0]) for i in range(3)}, 0, 4)
    run.prefill_forwards = [[1, 100, 0.0, 0.02], [1, 50, 0.025, 0.01], [1, 80, 0.5, 0.015]]
    # request 1 waited for request 0: its turn ran on to 0.025 (the sends); request 2 came after the worker idled
    assert prefill_turns(run, reqs) == [(100, 0.025), (50, 0.01), (80, 0.015)]


def test_costs_from_run_recover_the_decode_costs_that_made_a_run():
    """A decode side whose every step cost exactly what Costs says (a whole batch; the longest context, a
    500-token prompt among 10- and 100-token ones; half as much again while a prefill runs): the fit gives back
    the decode line, its KV term and the slowdown, from the intervals between each request's tokens."""
    from servelab.disagg.costs import Costs, costs_from_run, decode_intervals
    from servelab.engine import Completion, DisaggRun
    from servelab.workloads import Request

    true = Costs(0.01, 2e-4, 0.004, 0.0005, 0.003, 1e-5, 0.5, 3e-6)
    reqs = [Request(0, [1] * 10, 31, 0.0), Request(1, [1] * 500, 9, 0.0), Request(2, [1] * 100, 21, 0.0)]
    joins = {0: 0, 1: 5, 2: 10}  # the step before which each is admitted
    run = DisaggRun("synthetic", {}, 0, 16)
    run.prefill_forwards = [[1, 10, -0.1, 0.01], [1, 500, 0.02, 0.11], [1, 100, 0.16, 0.03]]
    spans = [(f[2], f[2] + f[3]) for f in run.prefill_forwards]
    t, tokens = 0.0, {}
    for step in range(30):
        tokens.update({r.id: [t] for r in reqs if joins[r.id] == step})
        running = [r for r in reqs if r.id in tokens and len(tokens[r.id]) < r.max_new_tokens]
        longest = max(r.prompt_len + len(tokens[r.id]) for r in running)
        dt = true.decode_step_s(len(running), any(a <= t < b for a, b in spans), longest)
        run.decode_forwards.append([len(running), 1, t, dt * 0.9])  # the forward is most of a step
        t += dt
        for r in running:
            tokens[r.id].append(t)
    run.completions = {i: Completion(i, [5] * len(ts), ts) for i, ts in tokens.items()}
    steps = decode_intervals(run, reqs, spans)
    assert len(steps) == 30 + 8 + 20 and max(n for _, n, _, _ in steps) == 500 + 8
    got = costs_from_run(run, reqs)
    for field in ("decode_base_s", "decode_per_seq_s", "decode_per_kv_token_s", "decode_slowdown_while_prefill"):
        assert getattr(got, field) == pytest.approx(getattr(true, field), rel=1e-4), field


def test_fit_rising_drops_a_falling_slope():
    from servelab.disagg.costs import fit_rising

    rows = [(1, 10), (2, 5), (3, 40), (4, 20)]
    assert fit_rising(rows, [1 + 2 * a + 0.1 * b for a, b in rows]) == pytest.approx([1, 2, 0.1])
    rows = [(1, 5), (2, 1), (3, 4), (4, 2)]
    base, up, down = fit_rising(rows, [1 + 2 * a - 0.5 * b for a, b in rows])
    assert down == 0 and up > 0  # refitted without the falling one, never a negative cost per unit


def test_fit_line_weights_each_size_by_its_points():
    from servelab.disagg.costs import fit_line

    many = [(1, 1.0)] * 99 + [(2, 5.0)] + [(3, 3.0)] * 99  # a size seen once barely moves the line
    base, slope = fit_line(many)
    assert base + slope * 1 == pytest.approx(1.0, abs=0.05) and base + slope * 3 == pytest.approx(3.0, abs=0.05)
    falling = [(1, 8.0), (1, 8.0), (4, 2.0)]  # noise: a step of 4 sequences cheaper than one of 1
    assert fit_line(falling)[1] < 0 and fit_line(falling, rising=True) == (pytest.approx(6.0), 0.0)
