"""Secret-Sharer scoring on text: three ways to the same log-perplexity, exact ranks, the null and the law."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fedmem.canary_scoring import (
    code_numbers,
    exact_log_perplexities,
    exact_ranks,
    log_perplexities,
)
from fedmem.config import MemoryConfig
from fedmem.data.text import encode
from fedmem.memory.datastore import Datastore
from fedmem.models import CharGRU
from fedmem.probes.canaries import CanaryFormat
from fedmem.strategy import ModelPredictor
from fedmem.training import logits_and_embeddings, to_rows
from strategies.knnper import KnnPredictor


def _model(seed: int = 0, hidden: int = 24) -> CharGRU:
    torch.manual_seed(seed)
    return CharGRU((16,), 98, hidden)


def _all_codes(fmt: CanaryFormat) -> np.ndarray:
    return np.array(np.unravel_index(np.arange(fmt.space_size), (len(fmt.alphabet),) * fmt.n_slots)).T


class WholeWindows:
    """A predictor that only offers ``predict``: scoring must fall back to whole windows."""

    info: Mapping[str, float] = {}

    def __init__(self, inner: ModelPredictor | KnnPredictor) -> None:
        self.inner = inner

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return self.inner.predict(x)


def _knn(model: CharGRU) -> KnnPredictor:
    x = torch.from_numpy(encode("the random number is 123\n" * 8 + "x = 1\n" * 20).astype(np.int64))
    windows = x[: len(x) // 16 * 16].reshape(-1, 16)
    _, z = logits_and_embeddings(model, windows[:, :-1])
    store = Datastore(
        to_rows(z), windows[:, 1:].numpy().reshape(-1), index="flat", rng=np.random.default_rng(0)
    )
    return KnnPredictor(model, store, 0.5, 3, 98, MemoryConfig(), 24.0, 256, {})


@pytest.mark.parametrize("template", ["n {}{}{}", "a {}{} b {}c", "the random number is {}{}{}{}"])
@pytest.mark.parametrize("kind", ["model", "knn"])
def test_stepping_whole_windows_and_the_tree_give_the_same_log_perplexity(template: str, kind: str) -> None:
    model = _model()
    predictor = ModelPredictor(model) if kind == "model" else _knn(model)
    fmt = CanaryFormat(template)
    codes = _all_codes(fmt)[np.random.default_rng(1).choice(fmt.space_size, 200, replace=False)]
    stepped = log_perplexities(predictor, fmt, codes)
    windows = log_perplexities(WholeWindows(predictor), fmt, codes)
    every = exact_log_perplexities(predictor, fmt)
    assert every is not None and every.shape == (fmt.space_size,)
    np.testing.assert_allclose(stepped, windows, atol=2e-5)
    np.testing.assert_allclose(every[code_numbers(fmt, codes)], stepped, atol=2e-5)
    # and by hand for the first secret: -sum log2 p over the characters from the first slot on
    line = "\n" + fmt.render(codes[:1])[0]
    tokens = torch.from_numpy(encode(line).astype(np.int64))[None]
    p = predictor.predict(tokens[:, :-1])[0]  # (V, T)
    first = line.index(fmt.render(codes[:1])[0][template.index("{")])
    hand = -sum(np.log2(p[tokens[0, t + 1], t]) for t in range(first - 1, tokens.shape[1] - 1))
    assert stepped[0] == pytest.approx(hand, abs=2e-5)


def test_whole_window_predictors_have_no_exact_space() -> None:
    assert exact_log_perplexities(WholeWindows(ModelPredictor(_model())), CanaryFormat("n {}{}")) is None


def test_exact_ranks_count_ties_against_the_secret() -> None:
    lp = np.array([3.0, 1.0, 2.0, 1.0, 5.0])
    assert exact_ranks(lp, np.array([1, 2, 4, 3])).tolist() == [2, 3, 5, 2]
    assert code_numbers(CanaryFormat("{}{}{}"), np.array([[0, 0, 7], [1, 2, 3]])).tolist() == [7, 123]


def test_secrets_drawn_at_random_have_null_exposure_one_over_ln_2() -> None:
    # A secret the model never saw has a uniform rank, so E[exposure] -> 1 / ln 2 = 1.44 bits; the
    # exposure of a uniform rank has standard deviation 1.44 too, so 2,000 draws give s.e. 0.032.
    fmt = CanaryFormat("n {}{}{}{}")
    every = exact_log_perplexities(ModelPredictor(_model(3)), fmt)
    assert every is not None
    numbers = np.random.default_rng(0).choice(fmt.space_size, 2000, replace=False)
    exposure = np.log2(fmt.space_size) - np.log2(exact_ranks(every, numbers))
    assert exposure.mean() == pytest.approx(1 / np.log(2), abs=0.13)  # 4 standard errors


def test_exposure_rises_with_repetitions() -> None:
    # Carlini et al.'s law on a small GRU: a canary seen 32 times is ranked far above one seen once.
    fmt = CanaryFormat("the number is {}{}{}{}")
    codes = np.array([[1, 9, 7, 3], [8, 0, 4, 2]])
    lines = fmt.render(codes)
    rng = np.random.default_rng(0)
    filler = "".join(rng.choice(list("abcdefgh \n"), 4000))
    chunks = [lines[0]] + [lines[1]] * 32 + [filler[i : i + 40] for i in range(0, 4000, 40)]
    order = rng.permutation(len(chunks))
    x = torch.from_numpy(
        np.stack([encode(("\n" + chunks[i] + "\n" + filler)[:41]) for i in order]).astype(np.int64)
    )
    torch.manual_seed(0)
    model = CharGRU((40,), 98, 48)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for epoch in range(15):
        for batch in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(16):
            loss = F.cross_entropy(model(x[batch, :-1]), x[batch, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    every = exact_log_perplexities(ModelPredictor(model), fmt)
    assert every is not None
    exposure = np.log2(fmt.space_size) - np.log2(exact_ranks(every, code_numbers(fmt, codes)))
    assert exposure[1] > 10.0 and exposure[1] > exposure[0] + 3.0, exposure
