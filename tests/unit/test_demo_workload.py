import random

from flywheel.demo.workload import DemoPrompt, SimulatedUser, last_number, load_prompts, make_users


def test_last_number_reads_final_answers():
    assert last_number("so she makes 9 * $2 = $18 every day") == "18"
    assert last_number("The total is 1,250.") == "1250"
    assert last_number("It is 3.0 hours") == "3"
    assert last_number("no digits here") is None


def test_prompts_are_real_and_math_has_references():
    prompts = load_prompts(limit=100)
    assert len(prompts) == 100
    math = [p for p in prompts if p.kind == "math"]
    assert len(math) == 50 and all(p.reference for p in math)
    assert any("Hawaii" in p.text or p.kind == "open" for p in prompts)


def test_users_grade_correctness_and_taste_without_noise():
    rng = random.Random(0)
    q = DemoPrompt("2+3?", "math", "5")
    strict = SimulatedUser("u", concise=True, noise=0.0)
    assert strict.grade(q, "The answer is 5.", rng) == 1.0
    assert strict.grade(q, "The answer is 6.", rng) == 0.0
    essay = " ".join(["word"] * 80)
    open_q = DemoPrompt("Tell me about Kafka.", "open")
    assert strict.grade(open_q, "Short answer.", rng) == 1.0
    assert strict.grade(open_q, essay, rng) == 0.3
    assert SimulatedUser("v", concise=False, noise=0.0).grade(open_q, essay, rng) == 1.0


def test_pairwise_prefers_the_better_answer():
    rng = random.Random(0)
    user = SimulatedUser("u", concise=True, noise=0.0)
    q = DemoPrompt("2+3?", "math", "5")
    a = {"request_id": "a", "model": "m1", "text": "5"}
    b = {"request_id": "b", "model": "m2", "text": "7"}
    assert user.compare(q, a, b, rng)["pairwise"]["winner"] == "a"
    assert user.compare(q, b, a, rng)["pairwise"]["winner"] == "b"
    assert len({u.user_id for u in make_users(6)}) == 6
