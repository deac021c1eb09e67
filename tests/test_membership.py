"""The audit's membership plans: seeded, disjoint, the right counts; and how they change clients' data."""

from __future__ import annotations

import numpy as np
import pytest

from fedmem.config import load_config
from fedmem.data.membership import (
    INSERTED,
    NEVER_INSERTED,
    REFERENCE,
    canary_clients,
    hold_out,
    keep_mask,
    participants,
    plan_canaries,
)
from fedmem.errors import ConfigError
from fedmem.federated_data import (
    audit_examples,
    client_data,
    federation,
    held_out,
    pool,
    pool_of,
    training_clients,
)


def test_hold_out_gives_wrong_labels_distinct_images_and_is_seeded() -> None:
    labels = np.arange(1000) % 10
    index, wrong = hold_out(labels, 10, n_canaries=6, references=50, seed=3)
    assert len(index) == 62 and len(set(index.tolist())) == 62
    assert np.all(wrong != labels[index]) and wrong.min() >= 0 and wrong.max() < 10
    again = hold_out(labels, 10, n_canaries=6, references=50, seed=3)
    assert np.array_equal(index, again[0]) and np.array_equal(wrong, again[1])
    assert not np.array_equal(index, hold_out(labels, 10, n_canaries=6, references=50, seed=4)[0])
    with pytest.raises(ConfigError, match=r"audit.references"):
        hold_out(labels, 10, n_canaries=6, references=600, seed=3)


def test_plan_assigns_each_client_its_repetitions() -> None:
    index, label = np.arange(40), np.zeros(40, np.int64)
    plan = plan_canaries(index, label, [5, 9], repetitions=(1, 4), per_repetition=3)
    assert (plan.kind == INSERTED).sum() == 12 and (plan.kind == NEVER_INSERTED).sum() == 12
    assert (plan.kind == REFERENCE).sum() == 16
    assert plan.inserted_by(5).tolist() == [0, 1, 2, 3, 4, 5]
    assert plan.repetitions[plan.inserted_by(9)].tolist() == [1, 1, 1, 4, 4, 4]
    assert plan.canaries.tolist() == list(range(24)) and plan.references.tolist() == list(range(24, 40))
    assert np.all(plan.owner[12:] == -1) and np.all(plan.repetitions[12:] == 0)


def test_keep_masks_are_half_independent_and_seeded() -> None:
    masks = np.stack([keep_mask(0, m, 3, 4000) for m in range(8)])
    assert abs(masks.mean() - 0.5) < 0.02  # 32,000 Bernoulli(1/2): sd 0.003
    assert abs(np.corrcoef(masks[0], masks[1])[0, 1]) < 0.06
    assert np.array_equal(masks[2], keep_mask(0, 2, 3, 4000))
    assert not np.array_equal(keep_mask(0, 2, 3, 4000), keep_mask(0, 2, 4, 4000))


def test_participants_are_half_of_the_seen_clients() -> None:
    seen = [0, 2, 3, 5, 7, 8]
    chosen = [participants(1, f, seen) for f in range(40)]
    assert all(len(c) == 3 and set(c) <= set(seen) for c in chosen)
    share = np.mean([[p in c for p in seen] for c in chosen], axis=0)
    assert np.all((share > 0.2) & (share < 0.8))
    assert canary_clients(0, seen, 2) == canary_clients(0, seen, 2)
    with pytest.raises(ConfigError, match=r"audit.canary_clients"):
        canary_clients(0, seen, 7)


SMOKE = ["data.max_samples=3000", "partition.num_clients=6", "audit.references=100"]


def test_a_plain_run_is_unchanged_by_the_audit_table() -> None:
    plain = load_config("default", [*SMOKE, "audit.canary_clients=3"])
    assert pool_of(plain) is pool(plain.data, plain.seed)
    assert held_out(plain) is None
    assert training_clients(plain) == federation(plain).seen


def test_target_inserts_canaries_shadow_keeps_half_subsample_trains_half() -> None:
    target = load_config("default", [*SMOKE, "audit.role='target'"])
    held = held_out(target)
    assert held is not None
    images, plan = held
    assert len(pool_of(target).y) == 3000 - len(images.y)
    fed = federation(target)
    inserting = sorted(set(plan.owner[plan.owner >= 0].tolist()))
    assert len(inserting) == 2 and set(inserting) <= set(fed.seen)
    pid = inserting[0]
    data, _ = client_data(target, pid)
    extra = int(plan.repetitions[plan.inserted_by(pid)].sum())  # 4 x (1 + 4 + 16)
    assert extra == 84
    assert len(data.y_train) == len(fed.clients[pid].train) + extra
    assert np.array_equal(data.y_train[-16:].numpy(), np.repeat(images.y[plan.inserted_by(pid)[-1]], 16))
    other = next(p for p in fed.seen if p not in inserting)
    assert len(client_data(target, other)[0].y_train) == len(fed.clients[other].train)
    ex = audit_examples(target, pid)
    assert len(ex["train"][1]) == len(fed.clients[pid].train)  # members: the split, not the canaries
    assert len(ex["canary"][1]) == 48 and len(ex["reference"][1]) == 100

    shadow = load_config("default", [*SMOKE, "audit.role='shadow'", "audit.index=3"])
    assert federation(shadow).clients[pid].train.tolist() == fed.clients[pid].train.tolist()
    kept = keep_mask(shadow.seed, 3, pid, len(fed.clients[pid].train))
    assert len(client_data(shadow, pid)[0].y_train) == kept.sum()

    sub = load_config("default", [*SMOKE, "audit.role='subsample'", "audit.index=1"])
    assert list(training_clients(sub)) == participants(sub.seed, 1, fed.seen)


def test_audit_keys_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"audit.role = 'victim'.*valid choices"):
        load_config("default", ["audit.role='victim'"])
    with pytest.raises(ConfigError, match=r"audit.index must be in \[0, audit.shadows\)"):
        load_config("default", ["audit.role='shadow'", "audit.index=16"])
    with pytest.raises(ConfigError, match=r"audit.shadows must be 0 or at least 4"):
        load_config("default", ["audit.shadows=1"])
    with pytest.raises(ConfigError, match=r"audit.repetitions"):
        load_config("default", ["audit.repetitions=[4, 4]"])
