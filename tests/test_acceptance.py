import pytest

from servelab.acceptance import replay_rounds


def test_replay_rounds_counts_up_to_first_rejection():
    # round 1: T T F -> 2 accepted, 3 checked, advance 3 ; round 2 (pos 3): T T T T -> 4/4, advance 5 (bonus)
    matches = [True, True, False] + [True] * 4 + [False] + [True, False]
    assert replay_rounds(matches, gamma=4) == (2 + 4 + 1, 3 + 4 + 2, 3)


def test_replay_rounds_all_rejected_and_all_accepted():
    assert replay_rounds([False] * 6, gamma=4) == (0, 6, 6)
    assert replay_rounds([True] * 10, gamma=4) == (8, 8, 2)  # positions 4 and 9 are bonus tokens
    assert replay_rounds([], gamma=4) == (0, 0, 0)


def test_gamma_must_be_positive():
    from servelab.acceptance import measure_acceptance

    with pytest.raises(ValueError, match="gamma"):
        measure_acceptance(None, None, [[1]], 4, gamma=0)
