"""Federated task settings: seeded per-client permutations and corner markers, applied in one place."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import fedmem.data.tasks as tasks
from fedmem.config import Config, load_config
from fedmem.data.datasets import to_tensor
from fedmem.data.tasks import MARKER_BITS, apply_task, draw_marker, marker_bits, permutation, relabel
from fedmem.errors import ConfigError
from fedmem.federated_data import audit_examples, client_data, federation, pool_of

# --- pure transforms -------------------------------------------------------------------------------


def test_permutation_is_seeded_per_client_and_a_permutation() -> None:
    for client in range(20):
        pi = permutation(7, client, 10)
        assert pi.dtype == np.int64
        assert sorted(pi.tolist()) == list(range(10))
        assert np.array_equal(pi, permutation(7, client, 10))
    perms = {tuple(permutation(7, c, 10)) for c in range(20)}
    assert len(perms) == 20  # every client its own task
    assert any(not np.array_equal(permutation(7, c, 10), permutation(8, c, 10)) for c in range(5))


def test_relabel_by_hand() -> None:
    pi = np.array([2, 0, 1], np.int64)
    assert relabel(np.array([0, 1, 2, 2, 0], np.uint8), pi).tolist() == [2, 0, 1, 1, 2]


def test_marker_is_drawn_exactly_where_documented() -> None:
    client = 0b1000_0000_0010_0101  # bits 0, 2, 5 and 15
    x = np.full((2, 3, 12, 10), 7, np.uint8)
    out = draw_marker(x, client, cell=2)
    expected = np.full((12, 10), 7, np.uint8)
    expected[:8, :8] = 0  # the whole 8 x 8 square is overwritten, zeros where a bit is 0
    for bit in (0, 2, 5, 15):  # bit k: row (k // 4) * 2, column (k % 4) * 2, 2 x 2 pixels
        r, c = (bit // 4) * 2, (bit % 4) * 2
        expected[r : r + 2, c : c + 2] = 255
    assert np.array_equal(out, np.broadcast_to(expected, x.shape))  # every image, every channel
    assert (x == 7).all()  # the input is not modified


def test_markers_differ_across_clients_and_scale_with_the_cell() -> None:
    x = np.zeros((1, 1, 28, 28), np.uint8)
    markers = {draw_marker(x, c, cell=2).tobytes() for c in range(200)}
    assert len(markers) == 200
    big = draw_marker(x, 1, cell=3)
    assert (
        (big[0, 0, :3, :3] == 255).all() and (big[0, 0, 3:, :] == 0).all() and (big[0, 0, :, 3:] == 0).all()
    )


def test_marker_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(ConfigError, match=r"data\.marker_cell"):
        draw_marker(np.zeros((1, 1, 7, 28), np.uint8), 1, cell=2)
    with pytest.raises(ConfigError, match="at most 65536 clients"):
        marker_bits(1 << MARKER_BITS)


def test_apply_task_by_setting() -> None:
    x = np.arange(2 * 1 * 8 * 8, dtype=np.uint8).reshape(2, 1, 8, 8)
    y = np.array([3, 1])
    pi = permutation(0, 4, 5)
    same_x, same_y = apply_task("", x, y, seed=0, client=4, num_classes=5, cell=2)
    assert same_x is x and same_y.tolist() == [3, 1]
    px, py = apply_task("permuted", x, y, seed=0, client=4, num_classes=5, cell=2)
    assert px is x and py.tolist() == [pi[3], pi[1]]
    mx, my = apply_task("permuted_marked", x, y, seed=0, client=4, num_classes=5, cell=2)
    assert my.tolist() == py.tolist() and np.array_equal(mx, draw_marker(x, 4, 2))
    with pytest.raises(ConfigError, match="valid choices"):
        apply_task("rotated", x, y, seed=0, client=4, num_classes=5, cell=2)


# --- config ----------------------------------------------------------------------------------------


def test_config_refuses_bad_task_settings(tiny_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match=r"data\.tasks = 'rotated' .*'permuted_marked'"):
        tiny_config("data.tasks='rotated'")
    with pytest.raises(ConfigError, match=r"data\.tasks = 'permuted' .* is text"):
        tiny_config("data.tasks='permuted'", "data.dataset='stdlib_text'", "model.name='char_gru'")
    with pytest.raises(ConfigError, match=r"data\.marker_cell must be >= 1"):
        tiny_config("data.tasks='permuted_marked'", "data.marker_cell=0")


def test_scenarios_share_one_federation_and_one_set_of_permutations() -> None:
    plain, marked = load_config("permuted"), load_config("permuted_marked")
    assert (plain.data.tasks, marked.data.tasks) == ("permuted", "permuted_marked")
    assert plain.partition == marked.partition and plain.seed == marked.seed
    fed = federation(marked)
    assert fed.unseen == federation(plain).unseen and fed.unseen
    seen = {tuple(permutation(marked.seed, c, 10)) for c in range(len(fed.clients)) if c not in fed.unseen}
    assert not seen & {tuple(permutation(marked.seed, c, 10)) for c in fed.unseen}  # tasks new to training


# --- applied to the federation ---------------------------------------------------------------------


def _splits(cfg: Config, pid: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    data, test = client_data(cfg, pid)
    return {
        "train": (data.x_train, data.y_train),
        "val": (data.x_val, data.y_val),
        "test": test,
    }


def _raw(cfg: Config, pid: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    p = pool_of(cfg)
    split = federation(cfg).clients[pid]
    return {
        name: (p.x[idx], p.y[idx])
        for name, idx in (("train", split.train), ("val", split.val), ("test", split.test))
    }


def _same(
    a: dict[str, tuple[torch.Tensor, torch.Tensor]], b: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> bool:
    return all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def test_no_task_gives_the_data_bit_identical(tiny_config: Callable[..., Config]) -> None:
    cfg = tiny_config()
    assert cfg.data.tasks == ""
    p = pool_of(cfg)
    for pid in range(cfg.partition.num_clients):
        got = _splits(cfg, pid)
        for name, (x, y) in _raw(cfg, pid).items():
            assert torch.equal(got[name][0], to_tensor(x, p.mean, p.std))
            assert torch.equal(got[name][1], torch.from_numpy(y.astype(np.int64)))


def test_permuted_relabels_every_split_of_every_client(tiny_config: Callable[..., Config]) -> None:
    plain, cfg = tiny_config(), tiny_config("data.tasks='permuted'")
    for pid in range(cfg.partition.num_clients):
        pi = permutation(cfg.seed, pid, 10)
        before, after = _splits(plain, pid), _splits(cfg, pid)
        for name in before:
            assert torch.equal(after[name][0], before[name][0])  # images untouched
            assert torch.equal(after[name][1], torch.from_numpy(pi)[before[name][1]])
        audit = audit_examples(cfg, pid)  # an audit scores the same task the client trained on
        assert torch.equal(audit["train"][1], after["train"][1]) and torch.equal(
            audit["test"][1], after["test"][1]
        )


def test_permuted_marked_marks_every_image_of_seen_and_unseen_clients(
    tiny_config: Callable[..., Config],
) -> None:
    permuted, cfg = tiny_config("data.tasks='permuted'"), tiny_config("data.tasks='permuted_marked'")
    p = pool_of(cfg)
    fed = federation(cfg)
    assert fed.unseen
    for pid in range(cfg.partition.num_clients):
        corner = np.kron(marker_bits(pid).reshape(4, 4), np.ones((2, 2), bool))  # (8, 8)
        pixels = np.where(corner, 255, 0).astype(np.uint8)[None, None]  # (1, 1, 8, 8)
        expected = to_tensor(pixels, p.mean, p.std)[0, 0]
        ref, got = _splits(permuted, pid), _splits(cfg, pid)
        for name in got:
            x, y = got[name]
            assert torch.equal(y, ref[name][1])  # the same permutation as in `permuted`
            assert torch.equal(x[:, 0, :8, :8], expected.expand(len(x), 8, 8))
            assert torch.equal(x[:, :, 8:, :], ref[name][0][:, :, 8:, :])
            assert torch.equal(x[:, :, :, 8:], ref[name][0][:, :, :, 8:])
        audit = audit_examples(cfg, pid)
        assert torch.equal(audit["train"][0], got["train"][0]) and torch.equal(
            audit["test"][0], got["test"][0]
        )


def test_one_clients_task_leaves_the_others_untouched(
    tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config("data.tasks='permuted_marked'")
    pool_x, pool_y = pool_of(cfg).x.copy(), pool_of(cfg).y.copy()
    before = {pid: _splits(cfg, pid) for pid in range(4)}
    assert np.array_equal(pool_of(cfg).x, pool_x) and np.array_equal(
        pool_of(cfg).y, pool_y
    )  # no in-place writes

    original = tasks.permutation

    def other_for_client_1(seed: int, client: int, num_classes: int) -> np.ndarray:
        return original(seed + 1 if client == 1 else seed, client, num_classes)

    monkeypatch.setattr(tasks, "permutation", other_for_client_1)
    assert not _same(_splits(cfg, 1), before[1])
    for pid in (0, 2, 3):
        assert _same(_splits(cfg, pid), before[pid])
