"""Label noise in a federation: only chosen clients' train splits, recomputed at evaluation, reported."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from rich.console import Console

import fedmem.client
from fedmem.client import evaluate_client
from fedmem.config import Config, load_config
from fedmem.data.membership import keep_mask
from fedmem.errors import ConfigError
from fedmem.federated_data import client_data, federation, noisy_examples, pool_of
from fedmem.reports.tables import label_noise_table, print_summary
from fedmem.simulation import summarize
from fedmem.strategy import ClientContext, Predictor

NOISE = ("data.label_noise=0.4",)


def _count(n: int) -> int:
    return round(0.4 * n)


def test_only_the_chosen_clients_train_labels_change(tiny_config: Callable[..., Config]) -> None:
    clean, noisy = tiny_config(), tiny_config(*NOISE, "data.noisy_clients=[1]")
    for pid in range(4):
        (a, a_test), (b, b_test) = client_data(clean, pid), client_data(noisy, pid)
        assert torch.equal(a.x_train, b.x_train)
        assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_val, b.y_val)
        assert torch.equal(a_test[0], b_test[0]) and torch.equal(a_test[1], b_test[1])
        changed = int((a.y_train != b.y_train).sum())
        assert changed == (_count(len(a.y_train)) if pid == 1 else 0)


def test_by_default_every_seen_client_is_noisy_and_unseen_ones_are_not(
    tiny_config: Callable[..., Config],
) -> None:
    clean, noisy = tiny_config(), tiny_config(*NOISE)
    fed = federation(clean)
    assert len(fed.unseen) == 1
    for pid in range(4):
        a, b = client_data(clean, pid)[0], client_data(noisy, pid)[0]
        changed = int((a.y_train != b.y_train).sum())
        assert changed == (0 if pid in fed.unseen else _count(len(a.y_train)))


def test_a_shadow_trains_on_its_half_with_the_targets_flips(tiny_config: Callable[..., Config]) -> None:
    shadow = ("audit.role='shadow'", "audit.index=1", "audit.canary_clients=0")
    clean, noisy = tiny_config(*shadow), tiny_config(*shadow, *NOISE)
    split = federation(clean).clients[0]
    keep = keep_mask(clean.seed, 1, 0, len(split.train))
    x, y = pool_of(clean).take(split.train[keep])  # what a shadow read before label noise existed
    data = client_data(clean, 0)[0]
    assert torch.equal(data.x_train, x) and torch.equal(data.y_train, y)
    target = client_data(tiny_config(*NOISE), 0)[0]
    assert torch.equal(client_data(noisy, 0)[0].y_train, target.y_train[torch.from_numpy(keep)])
    examples = noisy_examples(noisy, 0)
    assert examples is not None and len(examples.noisy) == int((client_data(noisy, 0)[0].y_train != y).sum())


def test_flips_apply_after_the_clients_task(tiny_config: Callable[..., Config]) -> None:
    """With data.tasks, the noisy labels are the task's labels with exactly the expected flips."""
    task, both = tiny_config("data.tasks='permuted'"), tiny_config("data.tasks='permuted'", *NOISE)
    a, b = client_data(task, 0)[0], client_data(both, 0)[0]
    assert int((a.y_train != b.y_train).sum()) == _count(len(a.y_train))
    examples = noisy_examples(both, 0)
    assert examples is not None
    assert np.array_equal(examples.original, a.y_train.numpy()[(a.y_train != b.y_train).numpy()])


def test_noisy_examples_are_the_flipped_train_examples(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config(*NOISE, "data.noisy_clients=[2]")
    data = client_data(cfg, 2)[0]
    clean = client_data(tiny_config(), 2)[0]
    examples = noisy_examples(cfg, 2)
    assert examples is not None
    flipped = (data.y_train != clean.y_train).numpy()
    assert len(examples.noisy) == int(flipped.sum()) == _count(len(data.y_train))
    assert torch.equal(examples.x, data.x_train[torch.from_numpy(flipped)])
    assert np.array_equal(examples.noisy, data.y_train.numpy()[flipped])
    assert np.array_equal(examples.original, clean.y_train.numpy()[flipped])
    assert np.all(examples.noisy != examples.original)
    assert noisy_examples(cfg, 1) is None and noisy_examples(tiny_config(), 2) is None


@dataclass
class LookupPredictor:
    """Predicts, for each input it was given, the label ``labels`` holds for it: a perfect memorizer."""

    x: torch.Tensor
    labels: np.ndarray
    num_classes: int = 10
    info: Mapping[str, float] = field(default_factory=dict)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        rows = {r.numpy().tobytes(): int(y) for r, y in zip(self.x, self.labels, strict=True)}
        out = np.full((len(x), self.num_classes), 1e-3)
        for i, r in enumerate(x):
            out[i, rows.get(r.numpy().tobytes(), 0)] = 1.0
        return out


def test_memorization_is_measured_against_the_noisy_labels(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(*NOISE, "data.noisy_clients=[0]")
    data = client_data(cfg, 0)[0]
    clean = client_data(tiny_config(), 0)[0]

    def predictors(ctx: ClientContext) -> Iterator[tuple[str, Predictor]]:
        yield "memorizer", LookupPredictor(data.x_train, data.y_train.numpy())  # fits the noise
        yield "truthful", LookupPredictor(clean.x_train, clean.y_train.numpy())  # ignores it

    monkeypatch.setattr(fedmem.client, "client_predictors", predictors)
    out = evaluate_client(cfg, 0, 1, {})
    assert out["n_noisy"] == _count(len(data.y_train))
    assert (out["noisy_memorized/memorizer"], out["noisy_true/memorizer"]) == (1.0, 0.0)
    assert (out["noisy_memorized/truthful"], out["noisy_true/truthful"]) == (0.0, 1.0)
    # a client without flipped labels reports neither
    other = evaluate_client(cfg, 1, 1, {})
    assert "n_noisy" not in other and not [k for k in other if k.startswith("noisy")]


def test_summary_weights_noisy_clients_by_their_flipped_examples() -> None:
    evals = {
        0: {
            "seen": 1.0,
            "n_test": 10.0,
            "acc/g": 0.5,
            "n_noisy": 1.0,
            "noisy_memorized/g": 1.0,
            "noisy_true/g": 0.0,
        },
        1: {
            "seen": 1.0,
            "n_test": 10.0,
            "acc/g": 0.7,
            "n_noisy": 3.0,
            "noisy_memorized/g": 0.0,
            "noisy_true/g": 1.0,
        },
        2: {"seen": 1.0, "n_test": 20.0, "acc/g": 0.9},
        3: {"seen": 0.0, "n_test": 5.0, "acc/g": 0.4},
    }
    out = summarize(evals, ["g"])
    assert out["noisy_memorized"]["g"]["weighted_mean"] == 0.25 and out["noisy_memorized"]["g"]["mean"] == 0.5
    assert out["noisy_true"]["g"]["weighted_mean"] == 0.75 and out["noisy_true"]["g"]["clients"] == 2
    assert out["unseen_noisy_memorized"] == {} and out["accuracy"]["g"]["clients"] == 3
    assert "noisy_memorized" not in summarize({p: evals[p] for p in (2, 3)}, ["g"])


def test_a_noisy_run_reports_memorization_every_evaluation(tiny_config: Callable[..., Config]) -> None:
    from fedmem.federation.sessions import run_on_engine

    cfg = tiny_config(*NOISE, "eval.personalizers=['finetune']")
    run = run_on_engine(cfg.with_runtime(engine="inprocess"))
    lines, summary = run.metrics(), run.summary()
    assert [m["round"] for m in lines] == [1, 2]
    for record in [*lines, summary]:
        for kind in ("noisy_memorized", "noisy_true"):
            assert set(record[kind]) == {"global", "finetune"}
            assert record[kind]["global"]["clients"] == 3  # the seen clients
            assert all(0 <= s["mean"] <= 1 and 0 <= s["weighted_mean"] <= 1 for s in record[kind].values())
        assert set(record["accuracy"]) == {"global", "finetune"}  # the clean test accuracy beside them
    assert all(c["n_noisy"] > 0 for c in lines[-1]["clients"].values() if c["seen"] == 1.0)
    # fedmem run prints them in a table of their own, one row per predictor
    console = Console(record=True, width=200)
    print_summary(summary, console)
    assert "flipped train labels" in console.export_text()
    table = label_noise_table(summary)
    assert table is not None and table.row_count == 2
    console.print(table)
    printed = console.export_text().splitlines()  # the noise table alone: exporting cleared the record
    (row,) = [line.split() for line in printed if line.strip().startswith("global")]
    memorized, true = summary["noisy_memorized"]["global"], summary["noisy_true"]["global"]
    cscore = summary["noisy_cscore_auc"]["global"]  # C-score AUC columns: recorded for "global" only
    assert row[1:] == [f"{100 * s[k]:.1f}" for s in (memorized, true) for k in ("mean", "weighted_mean")] + [
        f"{cscore[k]:.3f}" for k in ("mean", "pooled")
    ]
    (finetuned,) = [line.split() for line in printed if line.strip().startswith("fine-tuned")]
    assert finetuned[-2:] == ["-", "-"]
    assert label_noise_table({"accuracy": summary["accuracy"]}) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.label_noise=1.5"], r"data.label_noise must be in \[0, 1\] \(0 = off\), got 1.5"),
        (
            ["data.noisy_clients=[20]"],
            r"data.noisy_clients must list distinct partition ids in .* = \[0, 20\) .*got \[20\]",
        ),
        (["data.noisy_clients=[1, 1]"], "data.noisy_clients must list distinct partition ids"),
        (
            ["data.dataset='stdlib_text'", "model.name='char_gru'", "data.label_noise=0.1"],
            "data.label_noise = 0.1 flips class labels, but 'stdlib_text' is text",
        ),
    ],
)
def test_bad_label_noise_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("default", overrides)


def test_a_comparison_shows_the_memorized_noise_over_seeds() -> None:
    from fedmem.reports.directories import Result
    from fedmem.reports.tables import comparison_markdown, result_rows

    def summary(memorized: float, true: float) -> dict:
        stats = {"mean": 0.8, "weighted_mean": 0.8, "p10": 0.7, "clients": 2}
        flipped = {"global": {"mean": memorized, "weighted_mean": memorized, "p10": memorized, "clients": 2}}
        return {
            "strategy": "fedavg",
            "accuracy": {"global": stats},
            "predictors": ["global"],
            "rounds": 2,
            "noisy_memorized": flipped,
            "noisy_true": {"global": {**flipped["global"], "mean": true}},
        }

    results = [
        Result("ce-s0", "fedavg", 0, {"strategy.loss": "ce"}, summary(0.2, 0.7), []),
        Result("ce-s1", "fedavg", 1, {"strategy.loss": "ce"}, summary(0.1, 0.8), []),
        Result("rll-s0", "fedavg", 0, {"strategy.loss": "rll"}, summary(0.05, 0.9), []),
    ]
    lines = comparison_markdown(results).splitlines()
    assert "| flipped memorized | flipped true |" in lines[0]
    assert "| 15.0 ± 5.0 | 75.0 ± 5.0 |" in lines[2]  # mean ± population std over the two seeds
    assert "| 5.0 | 90.0 |" in lines[3]
    assert "flipped memorized / true" in comparison_markdown(results)
    rows = [
        r for r in result_rows(results) if r["group"] == "flipped_noisy_label" and r["statistic"] == "mean"
    ]
    assert [r["value"] for r in rows] == [0.2, 0.1, 0.05]
    plain = [Result("x", "fedavg", 0, {}, {**summary(0.2, 0.7), "noisy_memorized": {}}, [])]
    assert "flipped" not in comparison_markdown(plain)  # no label noise: no columns
