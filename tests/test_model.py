import json
import math

import pytest
import torch

from pipeline.errors import InputError
from sdm.models import build_model
from sdm.models.youtube_dnn import YouTubeDNN
from sdm.models.config import ModelConfig
from sdm.models.fusion import GatedFusion
from sdm.models.sdm import SDM
from sdm.models.attention import attention_mask
from sdm.models.short_term import user_attention_weights
from helpers.models import N_ITEMS, SIDE_VOCAB, make_batch, make_config, make_item_side, make_model, pad_right
from helpers.training import assert_memorises

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


def test_sdm_long_term_vector_of_an_empty_set_is_tanh_of_the_bias():
    # z_f = 0 for every empty set, so p = tanh(W 0 + b) = tanh(b).
    model = make_model("sdm")
    batch = make_batch(make_config())
    e_u = model.user_embedding(batch)
    with torch.no_grad():
        p = model.long_term(batch, e_u, model.item_embedding)
    torch.testing.assert_close(p[0], torch.tanh(model.long_term.combine.bias))


def test_long_term_encoder_matches_a_plain_reference():
    # Reference: project every set entry to d, softmax(h_k . e_u / sqrt(d)) over the non-padding
    # entries one user at a time, z_f = sum alpha_k h_k (0 for an empty set), p = tanh(W z + b).
    model = make_model("sdm")
    batch = make_batch(make_config())
    with torch.no_grad():
        e_u = model.user_embedding(batch)
        p = model.long_term(batch, e_u, model.item_embedding)
        expected = []
        for b in range(len(e_u)):
            z = []
            for f in model.long_term.features:
                ids = batch[f"long_{f}"][b]
                h = model.item_embedding.tables[f].weight[ids[ids != 0]]
                if f in model.long_term.to_dim:
                    h = h @ model.long_term.to_dim[f].weight.T
                alpha = torch.softmax(h @ e_u[b] / math.sqrt(16), 0)
                z.append(alpha @ h if len(h) else torch.zeros(16))
            expected.append(torch.tanh(model.long_term.combine(torch.cat(z))))
    torch.testing.assert_close(p, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_short_term_layers_match_plain_references():
    model = make_model("sdm")
    encoder = model.short_term
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    lengths = torch.tensor([5, 3, 1])
    with torch.no_grad():
        # Residual stack: h1 = LSTM_1(x), h2 = h1 + LSTM_2(h1).
        h1, _ = encoder.lstm.layers[0](x)
        h2, _ = encoder.lstm.layers[1](h1)
        torch.testing.assert_close(encoder.lstm(x), h1 + h2)

        # Multi-head self-attention, one head at a time, position t over valid keys k <= t.
        attention = encoder.self_attention
        q, k, v = attention.qkv(x).chunk(3, dim=-1)
        heads = []
        for head in range(4):
            part = slice(4 * head, 4 * head + 4)
            scores = q[..., part] @ k[..., part].transpose(1, 2) / 2.0  # [B, T, T], sqrt(d/H) = 2
            blocked = torch.ones(5, 5).triu(1).bool() | (torch.arange(5) >= lengths[:, None, None])
            blocked &= ~torch.eye(5, dtype=torch.bool)  # a padded position still sees itself
            heads.append(torch.softmax(scores.masked_fill(blocked, float("-inf")), -1) @ v[..., part])
        expected = attention.norm(x + attention.out(torch.cat(heads, -1)))
        actual = attention(x, attention_mask(lengths, 5))
        valid = torch.arange(5) < lengths[:, None]
        torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_gated_fusion_matches_hand_computation():
    fusion = GatedFusion(2)
    with torch.no_grad():
        fusion.W1.weight.copy_(torch.eye(2))
        fusion.W1.bias.copy_(torch.tensor([0.0, math.log(3)]))
        fusion.W2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        fusion.W3.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, -1.0]]))
    e_u = torch.tensor([[math.log(3), 0.0]])  # [B=1, 2]
    s = torch.tensor([[[-math.log(3), 2.0]]])  # [B=1, T=1, 2]
    p = torch.tensor([[4.0, 2 * math.log(3)]])  # [B=1, 2]
    # dim 0: W1 e_u + W2 s + W3 p + b = ln3 - ln3 + 0 + 0    = 0    -> G = 1/2
    # dim 1:                          = 0 + 0 - 2 ln3 + ln3  = -ln3 -> G = 1 / (1 + 3) = 1/4
    expected = torch.tensor([[[0.5 * 4.0 + 0.5 * -math.log(3), 0.75 * 2 * math.log(3) + 0.25 * 2.0]]])
    torch.testing.assert_close(fusion(e_u, s, p), expected)


def test_user_attention_weights_sum_to_one_over_allowed_keys_only():
    torch.manual_seed(0)
    e_u, keys = torch.randn(3, 4), torch.randn(3, 6, 4)
    allowed = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    alpha = user_attention_weights(e_u, keys, allowed)
    assert (alpha[~allowed] == 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.tensor([1.0, 1.0, 0.0]))
    # Against a plain softmax over the allowed keys of row 0.
    scores = keys[0, [0, 1, 3]] @ e_u[0] / 2.0  # / sqrt(d)
    torch.testing.assert_close(alpha[0, [0, 1, 3]], torch.softmax(scores, 0))


def test_causal_user_attention_sees_only_the_valid_prefix():
    torch.manual_seed(0)
    lengths = torch.tensor([4, 2])
    alpha = user_attention_weights(torch.randn(2, 4), torch.randn(2, 4, 4), attention_mask(lengths, 4))  # [B, T, T]
    for b, length in enumerate(lengths.tolist()):
        for t in range(length):
            assert alpha[b, t, : t + 1].sum().item() == pytest.approx(1.0)
            assert (alpha[b, t, t + 1 :] == 0).all()
    assert torch.isfinite(alpha).all()


@pytest.mark.parametrize("query", ["profile", "profile+current"])
def test_user_attention_query_decides_whether_prefix_weights_depend_on_the_position(query):
    # alpha[t, k] / alpha[t, k'] for k, k' <= t: with e_u alone the query is the same at every t,
    # so the ratio is too; with e_u + ĥ_t it follows the current position.
    model = make_model("sdm", attention_query=query)
    encoder = model.short_term
    torch.manual_seed(0)
    h_hat, e_u = torch.randn(1, 4, 16), torch.randn(1, 16)
    allowed = attention_mask(torch.tensor([4]), 4)
    per_position = e_u.unsqueeze(1) + h_hat if encoder.query_sees_current else e_u
    alpha = user_attention_weights(per_position, h_hat, allowed)[0]  # [T, T]
    ratios = alpha[1:, 0] / alpha[1:, 1]  # positions 1..3, keys 0 and 1
    assert torch.allclose(ratios, ratios[0].expand(3)) == (query == "profile")
    # The per-position query against a hand computation at t = 2.
    expected = torch.softmax(h_hat[0, :3] @ per_position.expand(1, 4, 16)[0, 2] / 4.0, 0)
    torch.testing.assert_close(alpha[2, :3], expected)


def parameter_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def test_ablations_change_the_parameter_set():
    full = parameter_names(make_model())
    side_tables = {f"item_embedding.tables.{f}.weight" for f in SIDE_VOCAB}
    assert side_tables <= full
    assert {"fusion.W1.weight", "long_term.combine.weight", "short_term.lstm.layers.1.weight_hh_l0"} <= full

    no_side = parameter_names(make_model(side_info=False))
    assert not side_tables & no_side
    assert not any(name.startswith("long_term.to_dim") for name in no_side)  # only the item set, already d wide

    no_long = parameter_names(make_model(long_term=False))
    assert not any(name.startswith(("long_term.", "fusion.")) for name in no_long)
    assert any(name.startswith("short_term.") for name in no_long)

    no_short = parameter_names(make_model(short_term=False, tie_output=False))
    assert not any(name.startswith(("short_term.", "fusion.", "item_embedding.project")) for name in no_short)
    assert side_tables <= no_short  # the long-term sets still use them

    untied = parameter_names(make_model(tie_output=False))
    assert "output_items.weight" in untied and "output_items.weight" not in full

    assert "user_embedding.user_table.weight" in parameter_names(make_model(user_id=True))
    assert parameter_names(make_model("popularity")) == set()


def test_every_parameter_gets_a_gradient():
    model = make_model().train()
    model(make_batch(make_config())).sum().backward()
    model.item_vectors().sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_padding_rows_get_no_gradient():
    # Padding entries of sessions, long-term sets and profiles must not move the padding embeddings.
    model = make_model().train()
    model(pad_right(make_batch(make_config()), 3)).square().sum().backward()
    for name, table in model.item_embedding.tables.items():
        assert table.weight.grad[1:].abs().sum() > 0, name
        assert (table.weight.grad[0] == 0).all(), name
    for table in model.user_embedding.profile_tables:
        assert (table.weight.grad[0] == 0).all()


def test_recurrent_weights_start_orthogonal():
    model = make_model()
    for lstm in model.short_term.lstm.layers:
        for gate in lstm.weight_hh_l0.detach().chunk(4):
            torch.testing.assert_close(gate @ gate.T, torch.eye(gate.shape[0]), atol=1e-5, rtol=0)


def test_popularity_ranks_items_by_count():
    counts = torch.tensor([0, 5, 50, 1, 7])
    config = make_config(n_items=5)
    model = build_model("popularity", config, make_item_side(config), counts)
    batch = make_batch(config, B=2, T=3)
    scores = model.user_vectors(batch) @ model.item_vectors().T  # [B, n_items]
    torch.testing.assert_close(scores[1], torch.log1p(counts.float()))
    assert scores[0, 1:].argsort(descending=True).tolist() == [1, 3, 0, 2]


def test_youtube_dnn_pools_the_session_prefix():
    # With one item repeated through the session the cumulative mean is constant, so every position
    # must produce the same vector.
    model = make_model("youtube-dnn")
    assert isinstance(model, YouTubeDNN)
    batch = make_batch(make_config(), B=2, T=4)
    batch["items"] = torch.tensor([[3, 3, 3, 3], [5, 0, 0, 0]])
    batch["lengths"] = torch.tensor([4, 1])
    with torch.no_grad():
        out = model(batch)
    torch.testing.assert_close(out[0], out[0, :1].expand(4, -1))


def test_config_round_trips_through_json():
    widths = {"item": 16, "leaf": 4, "category": 4, "shop": 8, "brand": 4}
    config = make_config(fusion="concat", user_id=True, embedding_widths=widths)
    restored = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.long_features == ("item", "leaf", "category", "shop", "brand")
    assert make_config(side_info=False).long_features == ("item",)
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**config.to_dict(), "hidden": 3})
    # A checkpoint from before --attention-query was trained with the paper's e_u query.
    older = {key: value for key, value in config.to_dict().items() if key != "attention_query"}
    assert config.attention_query == "profile+current" and ModelConfig.from_dict(older).attention_query == "profile"
    with pytest.raises(InputError, match="leave nothing to model"):
        make_config(long_term=False, short_term=False)


def test_sdm_overfits_eight_sessions():
    torch.manual_seed(0)
    config = make_config(dim=32, dropout=0.0)
    model = SDM(config, make_item_side(config))
    batch = make_batch(config, B=8, T=4, L=6, seed=1)
    valid = torch.arange(4) < batch["lengths"][:, None]  # [B, T]
    # Distinct items everywhere, so that no two training inputs coincide.
    batch["items"] = (torch.randperm(N_ITEMS - 1)[:32].view(8, 4) + 1) * valid
    targets = torch.randint(1, N_ITEMS, valid.shape, generator=torch.Generator().manual_seed(2))[valid]
    assert_memorises(model, batch, valid, targets, steps=200)


@pytest.mark.parametrize("tie_output", [True, False])
@pytest.mark.parametrize("name", ["sdm", "youtube-dnn", "popularity"])
def test_vectors_of_some_items_are_their_rows_of_the_catalogue(name, tie_output):
    model = make_model(name, tie_output=tie_output).eval()
    ids = torch.tensor([[3, 1, 3], [7, 2, 5]])
    with torch.no_grad():
        assert torch.allclose(model.vectors_of(ids), model.item_vectors()[ids], atol=1e-6)


@pytest.mark.parametrize("side_info", [True, False])
def test_catalogue_vectors_and_their_gradients_are_the_item_embedding_of_every_item(side_info):
    # The full softmax trains through catalogue(): it must be forward(all items), gradients included
    # (for the scores of real items: no loss scores the padding item 0).
    embedding = make_model("sdm", side_info=side_info).item_embedding
    embedding.item_side[3:6] = 0  # items without side values: padding ids, which add nothing and learn nothing
    all_items = torch.arange(N_ITEMS)
    weights = torch.randn(N_ITEMS, embedding.project.out_features, generator=torch.Generator().manual_seed(0))
    weights[0] = 0
    gradients = []
    for vectors in (embedding.catalogue(), embedding(all_items)):
        embedding.zero_grad()
        (vectors * weights).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in embedding.named_parameters()})
    assert torch.allclose(embedding.catalogue(), embedding(all_items), atol=1e-6)
    assert len(gradients[0]) == len(embedding.features) + 2  # every table, W and b
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradient, gradients[1][name], atol=1e-5), name
