"""What every Recommender (SDM, its ablations and every baseline) must do, tested once for all:
shapes, right padding, causality (position t sees items 0..t only, and equals the truncated
session), empty long-term sets, and determinism under dropout."""

from __future__ import annotations

import pytest
import torch

from sdm.models import MODEL_NAMES
from helpers.models import ABLATIONS, N_ITEMS, make_batch, make_config, make_model, pad_right

TRAINED_MODELS = ("sdm", "youtube-dnn", "gru4rec", "sasrec")  # the models with parameters
# Every model at its defaults, and SDM's (and YouTube DNN's) variants that change its wiring.
CASES = [(name, {}) for name in MODEL_NAMES] + [("sdm", overrides) for overrides in ABLATIONS[1:7]] + [
    ("youtube-dnn", {"long_term": False})
]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see conftest.single_thread


def case_id(case) -> str:
    name, overrides = case
    return ",".join([name, *(f"{k}={v}" for k, v in overrides.items())])


def reads_the_session(name: str, overrides: dict) -> bool:
    return name != "popularity" and overrides.get("short_term", True)


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes(name, overrides):
    model = make_model(name, **overrides)
    config = make_config(**overrides)
    batch = make_batch(config)
    width = {"popularity": 1, "item-cf": N_ITEMS}.get(name, config.dim)  # item-cf scores through the catalogue
    with torch.no_grad():
        out = model(batch)
        assert out.shape == (6, 5, width)
        assert model.user_vectors(batch).shape == (6, width)
        assert model.item_vectors().shape == (N_ITEMS, width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_extra_padding_changes_nothing(case):
    name, overrides = case
    model = make_model(name, **overrides)
    batch = make_batch(make_config(**overrides))
    valid = torch.arange(5) < batch["lengths"][:, None]
    with torch.no_grad():
        out, padded_out = model(batch), model(pad_right(batch, 4))
        torch.testing.assert_close(padded_out[:, :5][valid], out[valid], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.user_vectors(pad_right(batch, 4)), model.user_vectors(batch), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(padded_out).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_position_equals_the_truncated_session(case):
    # forward trains all prefixes at once; position t must be what evaluation sees for items 0..t.
    name, overrides = case
    model = make_model(name, **overrides)
    batch = make_batch(make_config(**overrides))
    with torch.no_grad():
        out = model(batch)
        for t in range(5):
            truncated = dict(batch, items=batch["items"][:, : t + 1], lengths=batch["lengths"].clamp(max=t + 1))
            rows = batch["lengths"] > t
            torch.testing.assert_close(model.user_vectors(truncated)[rows], out[rows, t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_changing_a_later_item_leaves_earlier_positions_unchanged(case):
    name, overrides = case
    model = make_model(name, **overrides)
    batch = make_batch(make_config(**overrides))  # row 0 is a full session
    with torch.no_grad():
        out = model(batch)
        for t in range(4):
            changed = dict(batch, items=batch["items"].clone())
            changed["items"][0, t + 1] = changed["items"][0, t + 1] % (N_ITEMS - 1) + 1
            changed_out = model(changed)
            torch.testing.assert_close(changed_out[0, : t + 1], out[0, : t + 1], rtol=0, atol=0)
            if reads_the_session(name, overrides):
                assert not torch.allclose(changed_out[0, t + 1], out[0, t + 1])


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_empty_long_term_sets_give_finite_outputs_and_gradients(name):
    model = make_model(name).train()
    batch = make_batch(make_config())
    for key in batch:
        if key.startswith("long_"):
            batch[key] = torch.zeros_like(batch[key])
    out = model(batch)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", TRAINED_MODELS)
def test_same_seed_same_outputs_even_with_dropout(name):
    batch = make_batch(make_config())
    outputs = []
    for _ in range(2):
        model = make_model(name, seed=3).train()
        torch.manual_seed(11)
        outputs.append(model(batch))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    other = make_model(name, seed=4).train()
    torch.manual_seed(11)
    assert not torch.allclose(other(batch), outputs[0])
