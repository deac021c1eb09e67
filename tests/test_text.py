"""Natural federated text: the shipped corpus, windows, the natural partition, the character model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmem.config import load_config
from fedmem.data import text
from fedmem.data.partition import build_federation, natural
from fedmem.data.text import VOCABULARY, canary_windows, decode, encode, windows
from fedmem.errors import ConfigError, DataError
from fedmem.federated_data import client_data, federation, new_model, pool
from strategies import STRATEGIES

TEXT = [
    "data.dataset='stdlib_text'",
    "data.seq_len=40",
    "partition.scheme='natural'",
    "partition.num_clients=4",
    "partition.min_size=40",
    "partition.unseen_fraction=0.25",
    "model.name='char_gru'",
    "model.embedding_dim=32",
]


def test_vocabulary_is_oov_tab_newline_then_printable_ascii() -> None:
    assert (
        len(VOCABULARY) == 98
        and VOCABULARY[:3] == "\x00\t\n"
        and VOCABULARY[3:] == "".join(chr(c) for c in range(32, 127))
    )
    assert encode("a\tb\n é~").tolist() == [68, 1, 69, 2, 3, 0, 97]
    assert decode(encode("def f(x):\n\treturn x")) == "def f(x):\n\treturn x"


def test_windows_are_disjoint_blocks_with_shifted_targets() -> None:
    x, y = windows(np.arange(10, dtype=np.uint8), 3)
    assert x.tolist() == [[0, 1, 2], [4, 5, 6]] and y.tolist() == [[1, 2, 3], [5, 6, 7]]


def test_snapshot_is_pinned_and_a_changed_archive_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = text.SnapshotSource("stdlib_text", text.STDLIB_ARCHIVE, text.STDLIB_SHA256).load(
        tmp_path, download=False
    )
    assert len(corpus.documents) == 168 and sum(len(t) for t in corpus.tokens) == 4_698_280
    assert "typing" in corpus.documents and (text.CORPORA / "stdlib-3.11.7.LICENSE.txt").is_file()
    changed = tmp_path / "corpora"
    changed.mkdir()
    data = (text.CORPORA / text.STDLIB_ARCHIVE).read_bytes()
    (changed / text.STDLIB_ARCHIVE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    monkeypatch.setattr(text, "CORPORA", changed)
    text._read_snapshot.cache_clear()
    with pytest.raises(DataError, match=r"SHA-256 .* not the pinned"):
        text.SnapshotSource("stdlib_text", text.STDLIB_ARCHIVE, text.STDLIB_SHA256).load(
            tmp_path, download=False
        )
    text._read_snapshot.cache_clear()


def test_natural_partition_drops_small_clients_and_draws_the_rest() -> None:
    groups = np.array([0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3])
    parts = natural(groups, num_clients=3, seed=0, alpha=1.0, classes_per_client=1, min_size=3)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [4, 5, 6, 7], [8, 9, 10]]
    with pytest.raises(DataError, match=r"partition.num_clients = 4 but only 3 of the 4 natural clients"):
        natural(groups, num_clients=4, seed=0, alpha=1.0, classes_per_client=1, min_size=3)


def test_natural_clients_are_split_into_contiguous_runs() -> None:
    groups = np.repeat(np.arange(3), 20)
    fed = build_federation(
        groups,
        scheme="natural",
        num_clients=3,
        seed=0,
        alpha=1.0,
        classes_per_client=1,
        min_size=10,
        train_fraction=0.7,
        val_fraction=0.15,
        unseen_fraction=0.0,
    )
    for c, split in enumerate(fed.clients):
        order = np.concatenate([split.train, split.val, split.test])
        assert order.tolist() == list(range(20 * c, 20 * c + 20))  # train, then val, then test
        assert (len(split.train), len(split.val), len(split.test)) == (14, 3, 3)


def test_text_federation_gives_token_windows_and_a_recurrent_model() -> None:
    cfg = load_config("default", TEXT)
    data, (x_test, y_test) = client_data(cfg, 0)
    assert data.x_train.dtype == torch.int64 and data.x_train.shape[1:] == (40,) and data.in_shape == (40,)
    assert data.num_classes == 98 and y_test.shape == x_test.shape
    # targets are the inputs shifted by one inside each window
    assert torch.equal(data.y_train[:, :-1], data.x_train[:, 1:])
    p = pool(cfg.data, cfg.seed)
    split = federation(cfg).clients[0]
    assert len({int(g) for g in p.groups[np.concatenate([split.train, split.val, split.test])]}) == 1  # type: ignore[index]
    model = new_model(cfg)
    logits = model(data.x_train[:2])
    assert logits.shape == (2, 98, 40) and model.features(data.x_train[:2]).shape == (2, 32, 40)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["partition.scheme='dirichlet'"],
            r"partition.scheme = 'dirichlet' needs one class label .* natural, iid",
        ),
        (["model.name='cnn'"], r"model.name = 'cnn' reads image inputs .* valid models for it: char_gru"),
    ],
)
def test_image_only_choices_on_text_fail_with_one_sentence(overrides: list[str], message: str) -> None:
    cfg = load_config("default", [*TEXT, *overrides])
    with pytest.raises(ConfigError, match=message):
        federation(cfg) if "scheme" in message else new_model(cfg)


def test_a_model_that_cannot_read_text_is_refused_before_a_run_directory_exists(tmp_path: Path) -> None:
    from fedmem.jobs import preflight

    cfg = load_config("default", [*TEXT, "model.name='cnn'", f"runtime.output_dir='{tmp_path}'"])
    with pytest.raises(ConfigError, match=r"model.name = 'cnn' reads image inputs"):
        preflight(cfg)
    assert not any(tmp_path.iterdir())


def test_natural_scheme_on_images_names_the_valid_schemes() -> None:
    cfg = load_config("default", ["partition.scheme='natural'", "data.max_samples=500"])
    with pytest.raises(ConfigError, match=r"'fashion_mnist' has none; valid schemes for it: iid, dirichlet"):
        federation(cfg)


def test_canary_windows_start_with_the_line_and_continue_with_the_clients_text() -> None:
    line = encode("\nthe number is 42\n")
    filler = encode("abcdefghijklmnopqrstuvwxyz" * 4)
    x, y = canary_windows([line, line], filler, 30, np.random.default_rng(0))
    assert x.shape == (2, 30)
    for row_x, row_y in zip(x, y, strict=True):
        block = np.concatenate([row_x, row_y[-1:]])
        assert decode(block[: len(line)]) == "\nthe number is 42\n"
        assert decode(block[len(line) :]) in decode(filler)


def test_a_canary_line_longer_than_a_window_stops_before_anything_runs(tmp_path: Path) -> None:
    from fedmem.audit import run_audit

    cfg = load_config("text_canaries", [*TEXT, "data.seq_len=20", f"runtime.output_dir='{tmp_path}'"])
    with pytest.raises(ConfigError, match=r"a canary line takes 29 characters but a window has data.seq_len"):
        run_audit(cfg)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_config_rejects_a_canary_format_without_slots() -> None:
    with pytest.raises(ConfigError, match=r"audit.canary_format: template 'no slots' has no \{\} slot"):
        load_config("default", ["audit.canary_format='no slots'"])


def test_shipped_archive_is_in_the_package_data() -> None:
    # setuptools must ship the corpus and its license with the wheel
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"data/corpora/*"' in pyproject


TINY_TEXT = [
    *TEXT,
    "data.seq_len=20",
    "rounds=1",
    "eval_every=1",
    "strategy.local_steps=2",
    "strategy.batch_size=8",
    "finetune.epochs=1",
    "memory.capacity=2000",
    "memory.k_grid=[3]",
    "memory.lambda_grid=[0.0, 0.5]",
    "runtime.engine='inprocess'",
]


@pytest.mark.parametrize("strategy", STRATEGIES.names())  # every registered one, new ones too
def test_every_strategy_runs_unchanged_on_text(strategy: str, tmp_path: Path) -> None:
    from fedmem.federation.sessions import run_on_engine as run

    cfg = load_config(
        "default", [*TINY_TEXT, f"strategy.name='{strategy}'", f"runtime.output_dir='{tmp_path}'"]
    )
    if strategy == "fedbn":  # no BatchNorm in the text model: refused before anything starts
        with pytest.raises(ConfigError, match="'char_gru' has none"):
            run(cfg)
        assert not list(tmp_path.iterdir())
        return
    summary = run(cfg).summary()
    for label, stats in summary["accuracy"].items():
        assert 0.0 <= stats["mean"] <= 1.0, (strategy, label)
    if strategy == "fedavg":
        # a memory of the client's own text beats a barely trained model on its next characters
        acc = summary["accuracy"]
        assert acc["knn"]["mean"] > acc["global"]["mean"] + 0.05, acc


def test_a_text_audit_reports_exact_and_sampled_exposure(tmp_path: Path) -> None:
    from fedmem.audit import run_audit

    cfg = load_config(
        "text_canaries",
        [
            *TINY_TEXT,
            "audit.references=300",
            "audit.canaries_per_repetition=2",
            "audit.repetitions=[1, 8]",
            "audit.canary_format='the random number is {}{}{}{}'",
            "data.seq_len=30",
            f"runtime.output_dir='{tmp_path}'",
        ],
    )
    root, audit = run_audit(cfg)
    assert audit.exact and audit.space == 10_000
    rows = {r["predictor"]: r for r in audit.leakage}
    assert set(rows) == {"global", "finetune", "knn"}
    for r in rows.values():
        # the exact rank is among 10^4 secrets, the sampled one among 300 references
        assert 0.0 <= r["exposure_exact_never"] <= np.log2(10_000)
        assert np.log2(300) - np.log2(301) <= r["exposure_never"] <= np.log2(300)
        assert {"exposure_exact_r1", "exposure_exact_r8", "exposure_r8", "exposure_extrapolated_r8"} <= set(r)
    report = (root / "report.md").read_text()
    assert "exact rank among all 10,000 secrets" in report and (root / "plots" / "exposure.png").is_file()


def test_with_local_training_only_the_inserting_client_exposes_its_canary(tmp_path: Path) -> None:
    # Local models never see another client's text, so a canary is exposed by its owner's model
    # (64 insertions, 20 local epochs' worth of steps) and has null exposure for everyone else.
    from fedmem.audit import run_audit

    cfg = load_config(
        "text_canaries",
        [
            *TINY_TEXT,
            "strategy.name='local'",
            "strategy.lr=2.0",
            "strategy.local_steps=300",
            "strategy.batch_size=16",
            "partition.num_clients=6",
            "partition.unseen_fraction=0.0",
            "audit.canary_clients=2",
            "audit.repetitions=[64]",
            "audit.canaries_per_repetition=3",
            "audit.references=300",
            "audit.canary_format='the random number is {}{}{}{}'",
            "data.seq_len=30",
            "eval.personalizers=[]",
            f"runtime.output_dir='{tmp_path}'",
        ],
    )
    _, audit = run_audit(cfg)
    rows = [r for r in audit.per_client if r["predictor"] == "local"]
    owners = [r["exposure_exact_r64"] for r in rows if "exposure_exact_r64" in r]
    others = [r["exposure_exact_other_r64"] for r in rows if "exposure_exact_r64" not in r]
    assert len(owners) == 2 and len(others) == 4
    # null: 1/ln 2 = 1.44 bits on average with a spread of ~1.4 per canary; 4 clients x 6 canaries
    assert np.mean(others) < 1.44 + 3 * 1.44 / np.sqrt(24)
    assert min(owners) > 8.0, owners
