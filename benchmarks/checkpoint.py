"""What checkpoints cost: writing ``checkpoint.pt`` and pruning client files, per round.

Run ``python benchmarks/checkpoint.py [--clients 1000] [--repeats 5]``. Prints, for the default
scenario's CNN (and for a server state four times as large, as FedAdam / SCAFFOLD keep):

- the seconds to write one checkpoint (atomic: temporary file, fsync, rename) and to read it;
- the seconds to prune the folders of one round's sampled clients (80 of ``--clients``) that each
  hold two versions of a personal model (what the server does after a round), and of all clients
  (what a complete run does once).

Compare with a round of the default scenario (about 2-4 s on the 2-core development machine)
to judge ``runtime.checkpoint_every``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedmem.config import load_config
from fedmem.models import build_model
from fedmem.results import Checkpoint, RunDir, client_file, environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config("default")
    model = build_model(cfg.model.name, (1, 28, 28), 10, cfg.model.embedding_dim, cfg.seed)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    size = sum(v.nbytes for v in weights.values())
    with tempfile.TemporaryDirectory(prefix="fedmem-ckpt-") as tmp:
        run = RunDir.create_at(Path(tmp) / "run", cfg.to_toml())
        for copies in (1, 4):
            state = {f"arrays{i}": weights for i in range(copies)}
            checkpoint = Checkpoint(3, state, {"mean": {}, "weighted": {}}, cfg.to_json(), environment())
            writes, reads = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run.save_checkpoint(checkpoint)
                writes.append(time.perf_counter() - start)
                start = time.perf_counter()
                run.checkpoint()
                reads.append(time.perf_counter() - start)
            write, read = 1e3 * statistics.median(writes), 1e3 * statistics.median(reads)
            print(
                f"checkpoint of {copies * size / 2**20:.2f} MB: write {write:.1f} ms, read {read:.1f} ms "
                f"(median of {args.repeats})"
            )
        personal = {k: torch.as_tensor(v) for k, v in weights.items()}
        for pid in range(args.clients):
            folder = run.path / "clients" / f"{pid:05d}"
            folder.mkdir(parents=True)
            for r in (2, 3):
                torch.save(personal, client_file(folder, "personal", r))
        sampled = list(range(0, args.clients, max(1, args.clients // 80)))
        start = time.perf_counter()
        run.prune_clients(2, sampled)
        some = time.perf_counter() - start
        start = time.perf_counter()
        run.prune_clients(3)
        everyone = time.perf_counter() - start
        left = sum(1 for _ in run.path.glob("clients/*/personal@*.pt"))
        print(
            f"prune {len(sampled)} sampled client folders: {1e3 * some:.1f} ms; "
            f"all {args.clients} at the end of a run: {1e3 * everyone:.1f} ms "
            f"({1e3 * everyone / args.clients:.3f} ms per client; {left} files left)"
        )


if __name__ == "__main__":
    main()
