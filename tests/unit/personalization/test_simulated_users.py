"""The benchmark's simulated users: hidden preferences read from real text features."""

from __future__ import annotations

from bench.personalization_pool import trim
from bench.simulated_users import (
    CATEGORIES,
    Preference,
    formality,
    make_prompts,
    make_users,
    topic_vocabulary,
    utility,
)
from core.personalization import FeedbackKind

FORMAL = "Furthermore, the government has demonstrated considerable commitment to comprehensive policy reform."
CASUAL = "Wow, that's so cool! I'm gonna love it, lol."
LONG = " ".join(["The committee discussed the budget and its many detailed consequences for everyone."] * 5)


def test_features_separate_the_preference_dimensions() -> None:
    assert formality(FORMAL) > 0.8 > 0.2 > formality(CASUAL)
    short_casual, long_formal = Preference("short", "casual", "tech"), Preference("long", "formal", "tech")
    assert utility(CASUAL, short_casual) > utility(FORMAL, short_casual)
    assert utility(LONG, long_formal) > utility(CASUAL, long_formal)
    assert 0.0 <= utility("", short_casual) <= 1.0


def test_topic_vocabulary_comes_from_the_bbc_corpus() -> None:
    sports, tech = topic_vocabulary("sports"), topic_vocabulary("tech")
    assert len(sports) == 300 and not sports & tech
    assert {"coach", "injury"} <= sports and {"software", "broadband"} <= tech
    fan = Preference("short", "casual", "sports")
    assert utility("coach injury", fan) > utility("software broadband", fan)


def test_prompts_are_balanced_and_prefix_stable() -> None:
    prompts = make_prompts(20)
    assert [p.category for p in prompts[:5]] == list(CATEGORIES)
    assert make_prompts(7) == prompts[:7]
    assert len({p.text for p in prompts}) == 20


def test_reactions_are_deterministic_and_follow_the_feedback_contract() -> None:
    user = make_users(2, drift_at=10)[1]
    prompt = make_prompts(1)[0]
    bad_first = [CASUAL, LONG, FORMAL] if user.preference.length == "long" else [LONG, CASUAL, FORMAL]
    a, b = user.react(3, prompt, bad_first), user.react(3, prompt, bad_first)
    assert a == b
    kinds = [e.kind for e in a.events]
    assert kinds[0] is FeedbackKind.RATING
    assert all(e.user_id == user.user_id and e.response.prompt == prompt.text for e in a.events)
    assert a.served_by_adapter[0] == a.events[0].response.request_id
    assert user.drift_to is not None and user.preference_at(10) == user.drift_to != user.preference_at(9)


def test_regenerate_follows_a_poor_answer_when_the_user_is_not_satisfied() -> None:
    user = make_users(1)[0]  # short/casual
    prompt = make_prompts(1)[0]
    regenerated = 0
    for i in range(30):
        reaction = user.react(i, prompt, [LONG, CASUAL])
        if FeedbackKind.REGENERATE in [e.kind for e in reaction.events]:
            regenerated += 1
            assert len(reaction.served_by_adapter) == 2
    assert regenerated >= 20  # p_regenerate = 0.9 for an answer with utility < 0.5


def test_trim_keeps_one_sentence_for_short_and_whole_sentences_for_long() -> None:
    assert trim("First one. Second one. Third", "short-casual") == "First one."
    assert trim("First one. Second one. Third", "long-formal") == "First one. Second one."
    assert trim("  ", "long-formal") == "I am not sure."
