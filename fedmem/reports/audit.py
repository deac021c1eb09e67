"""A leakage audit's analysis and rendering: what each predictor leaks, as tables and figures.

:func:`analyze` reads a complete audit directory (:mod:`fedmem.reports.directories`: the target,
its shadows and subsampled federations, each with its ``scores.npz``) and recomputes membership
from the seed (which examples each shadow kept, which clients each subsample trained, which canaries
went where: :mod:`fedmem.data.membership`, :mod:`fedmem.federated_data`); :func:`write_outputs`
writes ``leakage.csv``, ``per_client_leakage.csv``, ``report.md`` and ``plots/``. Running the
audit's federations is :mod:`fedmem.audit`'s job.

A new column is a statistic in :mod:`fedmem.leakage` that :func:`analyze` adds to each client's
row, plus its place in ``_ORDER`` (and in ``SHOWN`` to print it); both lists are below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmem import leakage
from fedmem.config import Config
from fedmem.data.membership import keep_mask, participants
from fedmem.data.partition import label_entropy
from fedmem.probes import expected_null_exposure
from fedmem.reports.directories import TARGET, audit_config, load_audit, member_dir, member_scores
from fedmem.reports.tables import write_csv
from fedmem.results import RunDir, atomic_write_text

__all__ = ["SHOWN", "Audit", "analyze", "table", "write_outputs"]


# --------------------------------------------------------------------------- columns

_CLIENT_COLUMNS = ("client", "seen", "n_train", "n_test", "label_entropy", "predictor")
_ORDER = (
    "client",
    "seen",
    "n_train",
    "n_test",
    "label_entropy",
    "predictor",
    "accuracy",
    "gain",
    "mia_auc",
    "mia_auc_se",
    "tpr_at_1pct_fpr",
    "tpr_at_0.1pct_fpr",
    "advantage",
    "yeom_advantage",
    "lira_auc",
    "lira_auc_se",
    "lira_tpr_at_1pct_fpr",
    "lira_tpr_at_0.1pct_fpr",
    "lira_advantage",
    "lira_offline_auc",
    "lira_offline_auc_se",
    "lira_offline_tpr_at_1pct_fpr",
    "lira_offline_tpr_at_0.1pct_fpr",
    "lira_offline_advantage",
    "shadow_loss_auc",
    "shadow_loss_auc_se",
    "shadow_loss_tpr_at_1pct_fpr",
    "shadow_loss_tpr_at_0.1pct_fpr",
    "shadow_loss_advantage",
    "exposure_never",
    "exposure_exact_never",
    "chosen_lambda",
    "chosen_k",
    "counterfactual_mem",
    "counterfactual_mem_se",
    "client_inference_auc",
    "client_inference_auc_se",
)


def _columns(rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> list[str]:
    """``first``'s columns that occur, then the others (exposure_r<r>...) in natural order."""
    present = {k for r in rows for k in r}
    ordered = [c for c in first if c in present]

    def natural(name: str) -> tuple[str, int]:
        head = name.rstrip("0123456789")
        return head, int(name[len(head) :] or 0)

    return ordered + sorted(present - set(ordered), key=natural)


# What the printed table and report.md show (leakage.csv has every column).
SHOWN = (
    ("accuracy", "acc %", 100.0),
    ("mia_auc", "MIA AUC", 1.0),
    ("mia_auc_se", "± se", 1.0),
    ("mia_auc_p90", "AUC p90", 1.0),
    ("tpr_at_1pct_fpr", "TPR@1%", 100.0),
    ("tpr_at_0.1pct_fpr", "TPR@0.1%", 100.0),
    ("advantage", "adv.", 1.0),
    ("lira_auc", "LiRA AUC", 1.0),
    ("lira_tpr_at_0.1pct_fpr", "LiRA TPR@0.1%", 100.0),
    ("shadow_loss_tpr_at_0.1pct_fpr", "loss TPR@0.1% (same targets)", 100.0),
)


# --------------------------------------------------------------------------- analysis


@dataclass
class Audit:
    """What an audit found: table rows and the arrays behind its figures."""

    leakage: list[dict[str, Any]]  # one row per predictor (seen clients)
    per_client: list[dict[str, Any]]  # one row per client and predictor
    roc: dict[str, tuple[np.ndarray, np.ndarray, float]]  # predictor -> pooled loss-attack ROC
    lira_roc: dict[str, tuple[np.ndarray, np.ndarray, float]]  # predictor -> pooled LiRA ROC
    predictors: list[str]
    cfg: Config
    references: int
    space: int = 0  # text canaries: secrets in the format (0: image canaries)
    exact: bool = False  # text canaries ranked against the whole space


def analyze(root: Path) -> Audit:
    """Compute every table row of a complete audit directory (pure reading; writes nothing)."""
    # the data layer (and torch) only here: `fedmem report` on a run or a sweep never needs it
    from fedmem.federated_data import federation, held_out, pool_of, text_canaries

    cfg = load_audit(root)
    target_cfg = audit_config(cfg, TARGET)
    fed = federation(target_cfg)
    pool = pool_of(target_cfg)
    held = held_out(target_cfg)
    text = text_canaries(target_cfg)
    plan = held[1] if held is not None else text.plan if text is not None else None
    space = text.format.space_size if text is not None else 0
    target = member_scores(root / TARGET)
    recorded = RunDir(root / TARGET).summary().get("predictors", list(target[0]))
    predictors = [p for p in recorded if p in target[0]]
    first = predictors[0]
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    member_pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {p: [] for p in predictors}
    for pid, by_label in sorted(target.items()):
        split = fed.clients[pid]
        seen = pid not in fed.unseen
        base = {
            "client": pid,
            "seen": int(seen),
            "n_train": len(split.train),
            "n_test": len(split.test),
            "label_entropy": label_entropy(pool.y[split.train].reshape(-1), pool.num_classes),
        }
        for label in predictors:
            s = by_label[label]
            row: dict[str, Any] = {**base, "predictor": label, "accuracy": float(s["test/correct"].mean())}
            row["gain"] = row["accuracy"] - float(by_label[first]["test/correct"].mean())
            row.update(leakage.membership(s["train/loss"], s["test/loss"]))
            if plan is not None:
                exact = s.get("canary/rank_exact")
                row.update(
                    leakage.exposure(
                        s["canary/loss"], s["reference/loss"], plan, pid, exact_rank=exact, space=space
                    )
                )
            rows[pid, label] = row
            if seen:
                n1, n0 = len(s["train/loss"]), len(s["test/loss"])
                truth = np.concatenate([np.ones(n1, bool), np.zeros(n0, bool)])
                member_pairs[label].append((-np.concatenate([s["train/loss"], s["test/loss"]]), truth))
    _chosen(root / TARGET, predictors, rows)
    lira_pairs = _lira(root, cfg, fed.seen, predictors, rows)
    _counterfactual(root, cfg, fed.seen, first, rows)
    per_client = [rows[k] for k in sorted(rows)]
    columns = _columns(per_client, _ORDER)
    roc = {label: leakage.pooled_roc(member_pairs[label]) for label in predictors}
    table = []
    for label in predictors:
        seen_rows = [r for r in per_client if r["predictor"] == label and r["seen"]]
        summary = leakage.summarize(seen_rows, [c for c in columns if c not in _CLIENT_COLUMNS])
        fpr, tpr, summary["pooled_mia_auc"] = roc[label]
        summary["pooled_tpr_at_0.1pct_fpr"] = float(tpr[fpr <= 0.001].max())
        table.append({"predictor": label, **summary})
    lira_roc = {label: leakage.pooled_roc(p) for label, p in lira_pairs.items() if p}
    ranked = any(c.startswith("exposure_exact_") for c in columns)
    return Audit(table, per_client, roc, lira_roc, predictors, cfg, cfg.audit.references, space, ranked)


def _chosen(run: Path, predictors: Sequence[str], rows: dict[tuple[int, str], dict[str, Any]]) -> None:
    """Add what each predictor chose at the final evaluation (kNN-Per's ``chosen_lambda``, ``chosen_k``)."""
    final = [m for m in RunDir(run).metrics() if "clients" in m][-1]["clients"]
    for pid_text, metrics in final.items():
        for key, value in metrics.items():
            label, _, name = key.partition("/")
            if label in predictors and (int(pid_text), label) in rows and name != "loss":
                rows[int(pid_text), label][f"chosen_{name}"] = float(value)


def _lira(
    root: Path,
    cfg: Config,
    seen: Sequence[int],
    predictors: Sequence[str],
    rows: dict[tuple[int, str], dict[str, Any]],
) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Add LiRA columns to the seen clients' rows; return each predictor's pooled (scores, truth)."""
    m = cfg.audit.shadows
    pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {p: [] for p in predictors}
    if m < 2:
        return pairs
    shadows = [member_scores(member_dir(root, "shadow", i)) for i in range(m)]
    for pid in seen:
        n = len(shadows[0][pid][predictors[0]]["train/loss"])
        keep = np.stack([keep_mask(cfg.seed, i, pid, n) for i in range(m)])
        for label in predictors:
            conf = np.stack([s[pid][label]["train/confidence"] for s in shadows])
            loss = np.stack([s[pid][label]["train/loss"] for s in shadows])
            scored = leakage.lira_scores(conf, loss, keep)
            rows[pid, label].update(leakage.lira_columns(scored))
            if "lira" in scored:
                pairs[label].append(scored["lira"])
    return pairs


def _counterfactual(
    root: Path, cfg: Config, seen: Sequence[int], first: str, rows: dict[tuple[int, str], dict[str, Any]]
) -> None:
    """Add client-level counterfactual memorization to the first predictor's rows of seen clients."""
    f = cfg.audit.subsamples
    if f < 2:
        return
    part = np.zeros((f, len(seen)), bool)
    acc = np.zeros((f, len(seen)))
    loss = np.zeros((f, len(seen)))
    for i in range(f):
        took_part = set(participants(cfg.seed, i, seen))
        scores = member_scores(member_dir(root, "subsample", i))
        for j, pid in enumerate(seen):
            s = next(iter(scores[pid].values()))  # subsampled federations score one predictor
            part[i, j] = pid in took_part
            acc[i, j] = s["train/correct"].mean()
            loss[i, j] = s["train/loss"].mean()
    for pid, extra in zip(seen, leakage.client_counterfactual(part, acc, loss), strict=True):
        rows[pid, first].update(extra)


# --------------------------------------------------------------------------- outputs


def table(audit: Audit) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leakage table as printed (TPRs and accuracy in %, exposures in bits)."""
    rows = audit.leakage
    shown = [(k, h, f) for k, h, f in SHOWN if any(k in r for r in rows)]
    # Exact exposure (text, the whole secret space ranked) where there is one, else the sampled rank.
    kind = "exposure_exact_" if audit.exact else "exposure_"
    exposures = [c for c in _columns(rows, ()) if c == f"{kind}never" or c.startswith(f"{kind}r")]
    header = ["predictor", *(h for _, h, _ in shown), *(c.replace(kind, "exp. ") for c in exposures)]
    body = []
    for r in rows:
        cells = [str(r["predictor"])]
        for key, _, factor in shown:
            v = r.get(key)
            cells.append("" if v is None else f"{factor * v:.1f}" if factor != 1.0 else f"{v:.3f}")
        cells.extend("" if c not in r else f"{r[c]:.2f}" for c in exposures)
        body.append(cells)
    return header, body


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def write_outputs(root: Path, audit: Audit) -> None:
    """``leakage.csv``, ``per_client_leakage.csv``, ``report.md`` and ``plots/`` of an audit directory."""
    write_csv(root / "leakage.csv", audit.leakage, _columns(audit.leakage, ("predictor", "clients", *_ORDER)))
    write_csv(root / "per_client_leakage.csv", audit.per_client, _columns(audit.per_client, _ORDER))
    plots = _plots(root / "plots", audit)
    cfg = audit.cfg
    a = cfg.audit
    header, body = table(audit)
    cf = sorted(
        (r for r in audit.per_client if "counterfactual_mem" in r),
        key=lambda r: -float(r["counterfactual_mem"]),
    )
    lines = [
        f"# Leakage audit: {cfg.name} ({cfg.strategy.name}, seed {cfg.seed}, {cfg.rounds} rounds)",
        "",
        f"Target federation: final round; every figure is a mean over the {int(audit.leakage[0]['clients'])} "
        "seen clients (per-client values in per_client_leakage.csv). Membership inference: the loss "
        "attack, members = a client's train split, non-members = its test split; ± se is the standard "
        "error of the mean AUC (Hanley-McNeil per client). "
        + (
            f"LiRA: {a.shadows} shadow federations, leave-one-out (each shadow the target of the others), "
            "with the loss attack on the same targets beside it. "
            if a.shadows >= 2
            else "LiRA: off (audit.shadows = 0). "
        )
        + _canary_sentence(audit),
        "",
        _markdown(header, body),
        "",
        *_chosen_lines(audit),
    ]
    if cf:
        lines += [
            f"## Client-level counterfactual memorization ({a.subsamples} federations on half the clients)",
            "",
            "| client | memorization (pp) | ± se | client-inference AUC | train size "
            "| label entropy (bits) |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['client']} | {100 * r['counterfactual_mem']:.2f} | {100 * r['counterfactual_mem_se']:.2f} "
            f"| {r.get('client_inference_auc', float('nan')):.2f} | {r['n_train']} "
            f"| {r['label_entropy']:.2f} |"
            for r in cf
        ]
        if len(cf) >= 3:
            mem = [r["counterfactual_mem"] for r in cf]
            size = leakage.spearman(mem, [r["n_train"] for r in cf])
            ent = leakage.spearman(mem, [r["label_entropy"] for r in cf])
            lines += [
                "",
                f"Spearman rank correlation of memorization with train size: {size:+.2f}, with label "
                f"entropy: {ent:+.2f} ({len(cf)} clients; |rho| below about {2 / np.sqrt(len(cf) - 1):.2f} "
                "is within two standard errors of no relation).",
            ]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    atomic_write_text(root / "report.md", "\n".join(lines) + "\n")


def _chosen_lines(audit: Audit) -> list[str]:
    """What predictors chose per client (kNN-Per's lambda and k), as mean [min, max] over seen clients."""
    lines = []
    for label in audit.predictors:
        rows = [r for r in audit.per_client if r["predictor"] == label and r["seen"]]
        names = sorted({k for r in rows for k in r if k.startswith("chosen_")})
        parts = []
        for name in names:
            v = np.array([r[name] for r in rows if name in r])
            parts.append(f"{name.removeprefix('chosen_')} {v.mean():.2f} [{v.min():.3g}, {v.max():.3g}]")
        if parts:
            lines += [
                f"{label} chose (mean [min, max] over seen clients, on validation): {', '.join(parts)}.",
                "",
            ]
    return lines


def _canary_sentence(audit: Audit) -> str:
    a = audit.cfg.audit
    if not a.canary_clients:
        return "Canaries: off."
    plural = "s" if a.canary_clients > 1 else ""
    who = f"Canaries: {a.canary_clients} client{plural} insert {a.canaries_per_repetition} "
    what = f"lines {a.canary_format.replace('{}', '#')!r}" if audit.space else "wrong-label images"
    if audit.exact:
        return (
            who + f"{what} per repetition count {list(a.repetitions)} "
            "(Secret Sharer); exposure in bits from each canary's exact rank among all "
            f"{audit.space:,} secrets, by log-perplexity (never-inserted canaries expect "
            f"{expected_null_exposure(audit.space - 1):.2f}, at most {np.log2(audit.space):.2f}); "
            f"leakage.csv also has the rank against {a.references} sampled references and its "
            "skew-normal extrapolation."
        )
    return (
        who + f"{what} per repetition count {list(a.repetitions)}; exposure in bits against {a.references} "
        f"references (never-inserted canaries expect {expected_null_exposure(a.references):.2f}, "
        f"at most log2 N = {np.log2(a.references):.2f} is measurable)."
    )


def _plots(folder: Path, audit: Audit) -> list[Path]:
    # matplotlib is imported only when figures are drawn
    from fedmem.reports.leakage_figures import (
        counterfactual_ranking,
        exposure_vs_repetitions,
        privacy_vs_gain,
        roc_curves,
    )

    folder.mkdir(exist_ok=True)
    out = [
        roc_curves(audit.roc, folder / "roc_loss_attack.png", title="Loss attack, members vs test (pooled)")
    ]
    if audit.lira_roc:
        out.append(
            roc_curves(
                audit.lira_roc, folder / "roc_lira.png", title="LiRA on shadow federations (leave-one-out)"
            )
        )
    kind = "exposure_exact_r" if audit.exact else "exposure_r"
    reps = sorted({int(c[len(kind) :]) for r in audit.per_client for c in r if c.startswith(kind)})
    if reps:
        series = {}
        for label in audit.predictors:
            rows = [r for r in audit.per_client if r["predictor"] == label]
            vals = [[r[f"{kind}{k}"] for r in rows if f"{kind}{k}" in r] for k in reps]
            series[label] = (reps, [float(np.mean(v)) for v in vals], [float(np.std(v)) for v in vals])
        candidates = audit.space - 1 if audit.exact else audit.references
        out.append(
            exposure_vs_repetitions(
                series,
                folder / "exposure.png",
                null=expected_null_exposure(candidates),
                max_exposure=float(np.log2(candidates)),
            )
        )
    seen = [r for r in audit.per_client if r["seen"]]
    if len(audit.predictors) > 1:  # the first predictor (gain 0 by definition) is the baseline cloud
        points = {
            p: (
                [r["gain"] for r in seen if r["predictor"] == p],
                [r["mia_auc"] for r in seen if r["predictor"] == p],
            )
            for p in audit.predictors
        }
        out.append(privacy_vs_gain(points, folder / "privacy_vs_gain.png"))
    cf = [r for r in seen if "counterfactual_mem" in r]
    if cf:
        out.append(
            counterfactual_ranking(
                [r["client"] for r in cf],
                [r["counterfactual_mem"] for r in cf],
                [r["counterfactual_mem_se"] for r in cf],
                folder / "counterfactual.png",
                sizes=[r["n_train"] for r in cf],
            )
        )
    return out
