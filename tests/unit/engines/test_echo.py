"""The echo engine answers in the iteration that prefills a sequence, through the real serving loop."""

from workers.engines.base import EngineRequest, SamplingParams
from workers.engines.echo import EchoEngine
from workers.serving import FinalEvent, ServeRequest, ServingLoop


def test_the_serving_loop_answers_every_request_in_one_step_with_the_prompt_words():
    loop = ServingLoop(EchoEngine("smollm2-135m"))
    loop.admit(ServeRequest("a", "one two three", SamplingParams(max_tokens=16)))
    loop.admit(ServeRequest("b", "alpha beta gamma delta", SamplingParams(max_tokens=3)))
    finals = {e.request_id: e for e in loop.step() if isinstance(e, FinalEvent)}
    assert set(finals) == {"a", "b"}
    assert finals["a"].text == "user: one two three assistant:" and finals["a"].finish_reason == "stop"
    assert finals["b"].text == "user: alpha beta" and finals["b"].finish_reason == "length"
    assert finals["b"].output_tokens == 3
    assert not loop.has_work() and loop.engine.active == ()


def test_finished_sequences_are_padding_until_released():
    engine = EchoEngine("m")
    engine.submit(EngineRequest("x", tuple(engine.tokenizer.encode("hello world")), SamplingParams(max_tokens=8)))
    first = engine.execute(["x"])["x"]
    assert first.finished and engine.tokenizer.decode(first.token_ids) == "hello world"
    assert engine.execute(["x"])["x"] == first.__class__((), "", True, None)
    engine.release("x")
    assert engine.active == ()


def test_chat_template_and_word_ids_round_trip():
    tok = EchoEngine("m").tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "system: be brief\nuser: hi\nassistant:"
    assert tok.decode(tok.encode(text)) == " ".join(text.split())
