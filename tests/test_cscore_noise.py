"""C-score (learning speed) ranking of flipped labels: the AUC of finding them, recorded resumably."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedmem.client import CORRECTNESS, correctness_histories, record_correctness
from fedmem.config import Config
from fedmem.federated_data import client_data, federation, new_model, noisy_train
from fedmem.federation.sessions import run_on_engine
from fedmem.jobs import run_config
from fedmem.probes.cscore import noisy_cscore_auc
from fedmem.results import RunDir
from fedmem.strategy import ClientContext, ModelPredictor, set_weights
from tests.test_resume import _assert_same_run, _interrupted

NOISE = ("data.label_noise=0.4",)
FLIPPED = np.array([True, False, True, False, False])


def _history(flipped_first: bool) -> np.ndarray:
    """Correctness over 3 evaluations: clean examples learned at once, flipped ones late (or the reverse)."""
    early, late = np.array([1, 1, 1]), np.array([0, 0, 1])
    first, last = (early, late) if flipped_first else (late, early)
    return np.stack([first if f else last for f in FLIPPED], axis=1).astype(bool)  # (3, 5)


def test_flipped_labels_learned_last_are_found_exactly() -> None:
    learned_last = {0: {"flipped": FLIPPED, "g": _history(flipped_first=False)}}
    assert noisy_cscore_auc(learned_last, ["g"]) == {"g": {"mean": 1.0, "pooled": 1.0, "clients": 1}}
    learned_first = {0: {"flipped": FLIPPED, "g": _history(flipped_first=True)}}
    assert noisy_cscore_auc(learned_first, ["g"]) == {"g": {"mean": 0.0, "pooled": 0.0, "clients": 1}}


def test_clients_are_averaged_and_pooled() -> None:
    flipped = np.array([True, False])
    histories = {
        # learning speeds: flipped 0, clean 1 -> AUC 1
        3: {"flipped": flipped, "g": np.array([[0, 1], [0, 1]], bool)},
        # flipped 1, clean 1/2 -> AUC 0
        5: {"flipped": flipped, "g": np.array([[1, 0], [1, 1]], bool)},
        # all clean, or no history for "g": left out
        7: {"flipped": np.array([False, False]), "g": np.ones((2, 2), bool)},
        8: {"flipped": flipped},
    }
    # pooled: flipped speeds {0, 1} against clean {1, 1/2}: wins 0<1, 0<1/2, tie 1=1 -> 2.5 / 4
    out = noisy_cscore_auc(histories, ["g", "h"])
    assert out == {"g": {"mean": 0.5, "pooled": 0.625, "clients": 2}}


def test_a_repeated_evaluation_replaces_its_row(tiny_config: Callable[..., Config], tmp_path: Path) -> None:
    cfg = tiny_config().with_runtime(run_dir=str(tmp_path))
    data = client_data(cfg, 0)[0]
    flipped = np.array([True, False, False])

    def record(server_round: int, row: list[bool]) -> dict[str, torch.Tensor]:
        ctx = ClientContext(cfg, 0, server_round, data)
        record_correctness(ctx, flipped, {"g": np.array(row)})
        saved = ctx.load(CORRECTNESS)
        assert saved is not None
        return dict(saved)

    record(2, [False, True, True])
    record(4, [False, False, True])
    saved = record(4, [True, True, True])  # evaluated again: replaces round 4
    assert saved["rounds"].tolist() == [2, 4]
    assert saved["g"].tolist() == [[False, True, True], [True, True, True]]
    assert saved["flipped"].tolist() == flipped.tolist()
    again = record(3, [True, False, True])  # a resume from round 2 reads the version of round 2
    assert again["rounds"].tolist() == [2, 3]


def test_a_noisy_run_ranks_its_flipped_labels(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(*NOISE, "strategy.name=ditto").with_runtime(engine="inprocess")
    run = run_on_engine(cfg)
    summary = run.summary()
    cscore = summary["noisy_cscore_auc"]
    assert set(cscore) == {"global", "ditto"}  # the global model and the strategy's own predictor
    seen = federation(cfg).seen
    for stats in cscore.values():
        assert stats["clients"] == len(seen) and 0 <= stats["mean"] <= 1 and 0 <= stats["pooled"] <= 1
    # what the clients recorded is the final global model's correctness against the noisy labels
    shipped = run_config(run.path).with_runtime(run_dir=str(run.path))
    histories = correctness_histories(shipped, cfg.rounds)
    assert sorted(histories) == sorted(seen)
    model = new_model(cfg)
    set_weights(model, {k: v.numpy() for k, v in torch.load(run.path / "model.pt").items()})
    for pid, h in histories.items():
        train = noisy_train(cfg, pid)
        assert train is not None
        assert h["rounds"].tolist() == [1, 2] and np.array_equal(h["flipped"], train.flipped)
        predicted = np.argmax(ModelPredictor(model, cfg.eval.batch_size).predict(train.x), axis=1)
        assert np.array_equal(h["global"][-1], predicted == train.labels)
    assert noisy_cscore_auc(histories, ["global", "ditto"]) == cscore


def test_without_label_noise_there_is_no_cscore(tiny_config: Callable[..., Config]) -> None:
    run = run_on_engine(tiny_config("rounds=1").with_runtime(engine="inprocess"))
    assert "noisy_cscore_auc" not in run.summary()
    assert not list(run.path.glob(f"clients/*/{CORRECTNESS}@*.pt"))


def test_a_resumed_noisy_run_ranks_as_an_uninterrupted_one(
    tiny_config: Callable[..., Config], tmp_path: Path
) -> None:
    settings = [
        *NOISE,
        "rounds=4",
        "eval_every=1",
        "runtime.engine=inprocess",
        "runtime.checkpoint_every=2",
    ]
    whole = run_on_engine(tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'whole'}'"))
    # round 3 evaluated (its histories saved) after the checkpoint of round 2, then the run stopped
    cut = _interrupted(tiny_config(*settings, f"runtime.output_dir='{tmp_path / 'cut'}'"), at=3)
    assert list(cut.path.glob(f"clients/*/{CORRECTNESS}@3.pt"))
    resumed = run_on_engine(run_config(cut.path), resume=cut.path)
    _assert_same_run(whole, resumed)
    assert "global" in resumed.summary()["noisy_cscore_auc"]
    a, b = (_histories(r) for r in (whole, resumed))
    assert a.keys() == b.keys() and a
    for pid in a:
        assert a[pid]["rounds"].tolist() == [1, 2, 3, 4]
        assert all(np.array_equal(a[pid][k], b[pid][k]) for k in a[pid])


def _histories(run: RunDir) -> dict[int, dict[str, np.ndarray]]:
    return correctness_histories(run_config(run.path).with_runtime(run_dir=str(run.path)), 4)
