"""CoMiGS mixture layer, tail model and federated client behaviour on tiny Llama models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from core.moe.comigs import Client, CoMiGSConfig, Split, UserData, aggregate, train_federated
from core.moe.lora_moe import MoELoRAConfig, MoELoRAMLP, average_states, balance_loss
from core.moe.tail import TailLM, cache_hidden_states
from workers.trainer.models import tiny_llama_config


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(num_layers=3, hidden_size=32, intermediate_size=48, vocab_size=64))


def trained_like(layer: MoELoRAMLP) -> MoELoRAMLP:
    with torch.no_grad():  # non-zero B so experts differ from the base and from each other
        for name, p in layer.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.2)
    return layer


def merged_mlp(layer: MoELoRAMLP, e: int) -> LlamaMLP:
    """A plain LlamaMLP whose weights are the base plus expert ``e``'s merged LoRA."""
    mlp: LlamaMLP = copy.deepcopy(layer.base)
    expert = layer.expert(e)
    with torch.no_grad():
        mlp.gate_proj.weight += expert.gate.delta_weight()
        mlp.up_proj.weight += expert.up.delta_weight()
        mlp.down_proj.weight += expert.down.delta_weight()
    return mlp


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("winner", [0, 2])
def test_moe_equals_dense_expert_when_one_expert_gets_all_weight(top_k: int, winner: int) -> None:
    base = tiny_model().model.layers[0].mlp
    layer = trained_like(MoELoRAMLP(base, MoELoRAConfig(n_generalists=1, n_specialists=2, top_k=top_k)))
    assert layer.router is not None
    direction = torch.ones(32) / 32**0.5
    x = torch.randn(2, 5, 32)
    x = x - (x @ direction).unsqueeze(-1) * direction + 5.0 * direction  # every token projects +5
    with torch.no_grad():  # only `winner` gets a (huge) logit: softmax over the top-k gives it 1.0
        layer.router.weight.zero_()
        layer.router.weight[winner] = direction * 1e4
    assert torch.allclose(layer(x), merged_mlp(layer, winner)(x), atol=1e-5)


def test_sparse_dispatch_equals_dense_reference() -> None:
    base = tiny_model().model.layers[1].mlp
    layer = trained_like(MoELoRAMLP(base, MoELoRAConfig(n_generalists=1, n_specialists=3, top_k=2)))
    x = torch.randn(3, 7, 32)
    assert torch.allclose(layer(x), layer.dense_reference(x), atol=1e-5)


def test_fresh_mixture_equals_the_frozen_base() -> None:
    base = tiny_model().model.layers[0].mlp
    x = torch.randn(2, 4, 32)
    for cfg in (MoELoRAConfig(n_generalists=1, n_specialists=0), MoELoRAConfig(n_generalists=1, n_specialists=2)):
        assert torch.allclose(MoELoRAMLP(base, cfg)(x), base(x), atol=1e-6)


def test_state_dict_holds_only_lora_and_router() -> None:
    layer = MoELoRAMLP(tiny_model().model.layers[0].mlp, MoELoRAConfig(n_generalists=1, n_specialists=1))
    keys = set(layer.state_dict())
    assert keys == {f"experts.{e}.{p}.{m}" for e in (0, 1) for p in ("gate", "up", "down") for m in "AB"} | {
        "router.weight"
    }
    assert set(layer.generalist_state()) == {k for k in keys if k.startswith("experts.0.")}


def test_balance_loss_is_one_at_the_target_routing() -> None:
    # 4 tokens, 2 experts, top-1, routed half/half with matching probabilities, uniform targets.
    top = torch.tensor([[0], [0], [1], [1]])
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert float(balance_loss(top, probs, torch.tensor([0.5, 0.5]))) == pytest.approx(1.0)
    skewed = torch.tensor([[0], [0], [0], [0]])
    assert float(balance_loss(skewed, torch.tensor([[1.0, 0.0]] * 4), torch.tensor([0.5, 0.5]))) == 2.0


def test_tail_model_reproduces_the_full_model() -> None:
    model = tiny_model()
    ids = torch.randint(3, 60, (2, 9))
    hidden = cache_hidden_states(model, ids, first_layer=1)
    tail = TailLM(model, first_layer=1)
    with torch.no_grad():
        assert torch.allclose(tail.logits(hidden), model(input_ids=ids).logits, atol=1e-5)
        layers = [MoELoRAMLP(mlp, MoELoRAConfig()) for mlp in tail.base_mlps()]
        assert torch.allclose(tail.logits(hidden, layers), model(input_ids=ids).logits, atol=1e-5)


def make_user(model: LlamaForCausalLM, offset: int, n: int = 6) -> UserData:
    """A user whose text is a noisy arithmetic sequence: next token = previous + ``offset``."""
    gen = torch.Generator().manual_seed(offset)

    def split(k: int) -> Split:
        start = torch.randint(3, 60, (k, 1), generator=gen)
        ids = (start + offset * torch.arange(12)) % 61 + 3
        return Split(cache_hidden_states(model, ids, first_layer=2), ids)

    return UserData(train=split(n), val=split(3), test=split(3))


def test_bilevel_updates_touch_only_their_own_parameters() -> None:
    model = tiny_model()
    tail = TailLM(model, first_layer=2)
    client = Client("u", tail, make_user(model, 1), MoELoRAConfig(n_specialists=1), CoMiGSConfig(), seed=0)
    router = [p.detach().clone() for p in client.router_params]
    experts = [p.detach().clone() for layer in client.layers for p in layer.experts.parameters()]
    client.expert_step()
    assert all(torch.equal(a, b) for a, b in zip(router, client.router_params, strict=True))
    moved = [p.detach().clone() for layer in client.layers for p in layer.experts.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(experts, moved, strict=True))
    client.router_step()
    assert any(not torch.equal(a, b) for a, b in zip(router, client.router_params, strict=True))
    after = [p.detach() for layer in client.layers for p in layer.experts.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(moved, after, strict=True))


def test_heterogeneous_users_share_generalists_and_keep_specialists() -> None:
    model = tiny_model()
    tail = TailLM(model, first_layer=2)
    cfg = CoMiGSConfig(rounds=2, local_steps=2, router_every=1, router_steps=1, batch_size=2)
    clients = [
        Client(f"u{s}", tail, make_user(model, s + 1), MoELoRAConfig(n_specialists=s), cfg, seed=s) for s in (0, 1, 3)
    ]
    report = train_federated(clients, cfg)
    assert report["bytes_sent"] > 0
    first = clients[0].generalist_states()
    for client in clients[1:]:
        for a, b in zip(first, client.generalist_states(), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
    specialists = [list(c.layers[0].specialist_parameters()) for c in clients]
    assert [len(s) for s in specialists] == [0, 6, 18]
    for client in clients:
        ppl, share = client.perplexity(client.data.test)
        assert ppl > 1.0 and 0.0 <= share <= 1.0


def test_local_clients_never_communicate() -> None:
    model = tiny_model()
    tail = TailLM(model, first_layer=2)
    cfg = CoMiGSConfig(rounds=1, local_steps=1, share_generalists=False)
    local = MoELoRAConfig(n_generalists=0, n_specialists=1)
    clients = [Client(f"u{i}", tail, make_user(model, i + 1), local, cfg, seed=i) for i in range(2)]
    assert aggregate(clients) == 0
    assert train_federated(clients, cfg)["bytes_sent"] == 0.0


def test_training_lowers_held_out_perplexity() -> None:
    model = tiny_model()
    tail = TailLM(model, first_layer=1)
    cfg = CoMiGSConfig(rounds=4, local_steps=5, batch_size=4, expert_lr=1e-2, router_lr=1e-2)
    clients = [
        Client(f"u{o}", tail, make_user(model, o, n=8), MoELoRAConfig(n_specialists=1), cfg, seed=o) for o in (1, 2)
    ]
    before = [c.perplexity(c.data.test)[0] for c in clients]
    train_federated(clients, cfg)
    after = [c.perplexity(c.data.test)[0] for c in clients]
    assert all(a < b for a, b in zip(after, before, strict=True))


def test_average_states_rejects_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="disagree"):
        average_states([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
