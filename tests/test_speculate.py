"""The drafting policy (edge/speculate.py): lookup drafts, the draft model's turn, the adaptive length."""

from __future__ import annotations

from nomoat.edge.speculate import DraftLength, Drafts, lookup_draft


class Recording:
    """Stands in for a draft model: proposes token 7, and records how many tokens it was asked for."""

    def __init__(self):
        self.asked: list[int] = []

    def __call__(self, history: list[int], n: int) -> list[int]:
        self.asked.append(n)
        return [7] * n


def test_lookup_drafts_what_followed_the_latest_match_of_the_last_tokens():
    assert lookup_draft([1, 2, 3, 9, 8, 1, 2, 3], 3) == [9, 8, 1]
    assert lookup_draft([5, 1, 2, 4, 1, 2, 6, 1, 2], 2) == [6, 1]  # the latest occurrence of "1 2"
    assert lookup_draft([1, 2, 3, 4], 3) == []  # nothing seen twice
    assert lookup_draft([5, 1, 2, 9, 1, 2], 3, sizes=(3,)) == []  # a 2-token match is not a 3-token one


def test_with_a_draft_model_a_three_token_match_drafts_by_lookup_and_anything_else_by_the_model():
    model = Recording()
    drafts = Drafts(4, model)
    assert drafts.next([1, 2, 3, 9, 8, 1, 2, 3], room=4)[0] == 9 and not model.asked  # copying costs nothing
    assert drafts.last is drafts.by_match[3]
    assert drafts.next([5, 1, 2, 9, 1, 2], room=4)[0] == 7 and model.asked  # a weak match: the model drafts
    assert drafts.last is drafts.by_model
    assert Drafts(4).next([5, 1, 2, 9, 1, 2], room=4)[0] == 9  # without a model, the 2-token match drafts
    assert len(drafts.next([1, 2, 3, 4], room=1)) == 1  # never past the room left


def test_each_source_learns_its_own_acceptance():
    """Refused lookup drafts shorten lookup drafts only; a model whose drafts are taken keeps drafting long."""
    model = Recording()
    drafts = Drafts(6, model)
    lookups = 0
    for _ in range(20):
        for history in ([1, 2, 3, 9, 8, 1, 2, 3], [4, 5, 6]):  # text that copies; text that does not
            draft = drafts.next(history, room=6)
            by_lookup = drafts.last is drafts.by_match[3]
            lookups += by_lookup
            drafts.update(len(draft), 0 if by_lookup else len(draft))  # lookup refused at once; the model taken
    assert lookups >= 2 and drafts.by_match[3].rate < 0.3 and drafts.by_model.now == 6


def test_each_match_length_learns_its_own_acceptance():
    """Refused drafts after 1-token matches do not shorten the drafts after 3-token matches, which are taken whole
    (one acceptance for all match lengths drafted 3 tokens here instead of 6)."""
    drafts = Drafts(6)
    copying = [1, 2, 3, 9, 8, 7, 6, 5, 4, 1, 2, 3]  # ends with a 3-token match: 9 8 7 6 5 4 follow it
    weak = [11, 12, 13, 12]  # ends with a 1-token match only
    for _ in range(20):
        for history in (copying, weak):
            draft = drafts.next(history, room=6)
            drafts.update(len(draft), len(draft) if history is copying else 0)
    assert drafts.next(copying, room=6) == [9, 8, 7, 6, 5, 4]
    assert drafts.next(weak, room=6) == []  # 1-token matches stopped drafting
    assert drafts.by_match[1].rate < 0.3 < 0.9 < drafts.by_match[3].rate


def test_the_length_counts_what_a_drafted_token_costs():
    """The same acceptance, dearer drafts: shorter ones."""
    cheap, dear = DraftLength(8), DraftLength(8)
    for length in (cheap, dear):
        for _ in range(10):
            length.update(4, 3)
        length.cost.timed(1, 0.010)
    dear.drafting(4, 0.040)  # each drafted token costs a whole step of the model
    assert dear.gamma == 1.0 and dear.now < cheap.now
