"""Log-perplexity of Secret-Sharer canaries under next-character predictors, and their exact ranks.

Carlini et al. ("The Secret Sharer", USENIX Security 2019) insert lines such as
"the random number is 281265" into a language model's training text and rank
the inserted secret's log-perplexity among every secret the format allows.
A canary is read from the zero state after a newline, as it was inserted
(:func:`fedmem.data.text.canary_windows` starts each occurrence a window), and
its log-perplexity, in bits, is

    -sum_t log2 p(c_t | newline, c_<t)   over the characters from the first slot to the line's end,

the characters before the first slot being common to every candidate, so they
shift every score equally and no rank. Scores are exact teacher forcing.

Two ways to compute them:

* :func:`log_perplexities` for given secrets (canaries, sampled references), batched. A
  :class:`~fedmem.strategy.PositionwisePredictor` on a model with a ``step`` method
  (:class:`~fedmem.models.CharGRU`) runs the common prefix once and then one step per
  character for all secrets at once; any other predictor scores whole windows with ``predict``.
* :func:`exact_log_perplexities` for every secret of the format: a walk down the tree of
  secrets, one level per slot, so the model makes ``sum_j A^j`` single-character steps
  (111,111 for six digits) instead of ``A^slots x length`` (28 million). Ranks against the
  whole space follow (:func:`exact_ranks`).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fedmem.data.text import encode
from fedmem.federated_data import TextCanaries
from fedmem.probes.canaries import CanaryFormat
from fedmem.strategy import PositionwisePredictor, Predictor

# The largest secret space scored exhaustively: 8 bytes a secret, and the level above holds
# one hidden state per node (10^5 x 128 floats = 51 MB at six digits).
EXACT_LIMIT = 10**6
_BATCH = 8192  # secrets (or tree nodes) stepped at once


def _pieces(fmt: CanaryFormat) -> tuple[str, list[str]]:
    """The text before the first slot (with the leading newline), and the literal text after each slot."""
    parts = [literal for literal, _, _, _ in string.Formatter().parse(fmt.template)]
    # parse yields one entry per slot, plus a trailing one when literal text follows the last slot
    head, tails = parts[0], [*parts[1:], *[""] * (fmt.n_slots - len(parts) + 1)]
    return "\n" + head, [*tails[: fmt.n_slots - 1], "".join(tails[fmt.n_slots - 1 :])]


def _check_alphabet(fmt: CanaryFormat) -> np.ndarray:
    if any(len(symbol) != 1 for symbol in fmt.alphabet):
        raise ValueError("next-character exposure needs single-character symbols in the canary alphabet")
    return encode("".join(fmt.alphabet)).astype(np.int64)


def _stepper(predictor: Predictor) -> Any | None:
    """The model to step through, when the predictor is a function of its per-position outputs."""
    if isinstance(predictor, PositionwisePredictor) and hasattr(predictor.model, "step"):
        return predictor.model
    return None


class _Walker:
    """Batched one-character steps of a recurrent model under a position-wise predictor."""

    def __init__(self, predictor: Predictor, model: Any) -> None:
        self.predictor = predictor
        self.model = model
        model.eval()

    @torch.inference_mode()
    def start(self, context: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden output at the last context character (1, D) and the state after it (1, 1, D)."""
        z, state = self.model.step(torch.from_numpy(encode(context).astype(np.int64))[None])
        return z[:, :, -1], state

    @torch.inference_mode()
    def log2_probs(self, z: torch.Tensor) -> np.ndarray:
        """log2 of the predictor's next-character probabilities at outputs ``z`` (n, D): (n, V)."""
        zs = z.numpy()
        logits = self.model.head(z).numpy()
        p = self.predictor.from_outputs(logits, zs)  # type: ignore[attr-defined]
        return np.log2(np.maximum(p, 1e-300))

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step every row by one token (n,): outputs (n, D), states (1, n, D)."""
        z, state = self.model.step(tokens[:, None], state)
        return z[:, :, 0], state


def _chunks(n: int, size: int = _BATCH) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def log_perplexities(predictor: Predictor, fmt: CanaryFormat, codes: np.ndarray) -> np.ndarray:
    """Log-perplexity in bits of each secret ``codes[i]`` (slot indices into ``fmt.alphabet``).

    Parameters
    ----------
    predictor:
        A client's next-character predictor.
    fmt:
        The canary format; its symbols must be single characters.
    codes:
        (n, n_slots) int64.

    Returns
    -------
    numpy.ndarray
        (n,) float64, lower = more likely.
    """
    codes = np.asarray(codes, np.int64)
    alphabet = _check_alphabet(fmt)
    context, tails = _pieces(fmt)
    model = _stepper(predictor)
    if model is None:
        return _by_windows(predictor, fmt, codes, len(context))
    out = np.zeros(len(codes))
    walker = _Walker(predictor, model)
    z0, s0 = walker.start(context)
    for part in _chunks(len(codes)):
        c = codes[part]
        n = len(c)
        z, state = z0.expand(n, -1), s0.expand(-1, n, -1).contiguous()
        lp = np.zeros(n)
        # Characters after the context: each slot, then the literal text that follows it.
        columns = [(alphabet[c[:, j]], tails[j]) for j in range(fmt.n_slots)]
        steps = [chars for slot, tail in columns for chars in (slot, *(np.full(n, t) for t in encode(tail)))]
        for i, chars in enumerate(steps):
            lp -= walker.log2_probs(z)[np.arange(n), chars]
            if i + 1 < len(steps):
                z, state = walker.feed(torch.from_numpy(np.asarray(chars, np.int64)), state)
        out[part] = lp
    return out


def _by_windows(predictor: Predictor, fmt: CanaryFormat, codes: np.ndarray, first: int) -> np.ndarray:
    """Teacher forcing on whole windows with ``predict`` (any predictor), scored from position ``first``."""
    lines = fmt.render(codes)
    out = np.zeros(len(codes))
    for part in _chunks(len(codes), 1024):
        tokens = np.stack([encode("\n" + line) for line in lines[part]]).astype(np.int64)  # (n, T + 1)
        x, y = tokens[:, :-1], tokens[:, 1:]
        p = predictor.predict(torch.from_numpy(x))  # (n, V, T)
        py = np.take_along_axis(p, y[:, None, :], axis=1)[:, 0]  # (n, T)
        out[part] = -np.log2(np.maximum(py[:, first - 1 :], 1e-300)).sum(axis=1)
    return out


def exact_log_perplexities(predictor: Predictor, fmt: CanaryFormat) -> np.ndarray | None:
    """Log-perplexity in bits of every secret of ``fmt``, indexed by the secret's number in base A.

    Returns None when the predictor cannot be stepped (not position-wise, or its model has no
    ``step``) or the space exceeds :data:`EXACT_LIMIT`; use sampled references then.
    """
    model = _stepper(predictor)
    if model is None or fmt.space_size > EXACT_LIMIT:
        return None
    alphabet = _check_alphabet(fmt)
    a = len(alphabet)
    context, tails = _pieces(fmt)
    walker = _Walker(predictor, model)
    z, state = walker.start(context)
    lp = np.zeros(1)
    for j in range(fmt.n_slots):
        last = j == fmt.n_slots - 1
        tail = encode(tails[j])
        m = len(lp)
        # Next-symbol scores of every node, in batches of _BATCH queries: FAISS's flat search
        # was 4x slower per query in batches of 819 than of 2,048 or more.
        node_lp = np.empty((m, a))
        for part in _chunks(m):
            node_lp[part] = walker.log2_probs(z[part])[:, alphabet]
        child_lp = (lp[:, None] - node_lp).reshape(-1)  # node-major: base-A numbering, most significant first
        if not last or len(tail):
            next_z, next_state = [], []
            for part in _chunks(m, max(1, _BATCH // a)):
                k = part.stop - part.start
                rows = slice(part.start * a, part.stop * a)
                cz, cs = walker.feed(
                    torch.from_numpy(np.tile(alphabet, k)), state[:, part].repeat_interleave(a, 1)
                )
                for i, t in enumerate(tail):
                    child_lp[rows] -= walker.log2_probs(cz)[:, t]
                    if not (last and i == len(tail) - 1):
                        cz, cs = walker.feed(torch.full((k * a,), int(t)), cs)
                if not last:
                    next_z.append(cz)
                    next_state.append(cs)
            if not last:
                z, state = torch.cat(next_z), torch.cat(next_state, dim=1)
        lp = child_lp
    return lp


def exact_ranks(all_log_perplexities: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """Rank of secrets ``numbers`` among all: 1 + how many other secrets are at least as likely.

    Ties count against the secret, as in :func:`fedmem.probes.exposure_by_rank`; exposure is
    ``log2(space) - log2(rank)`` (Secret Sharer, Definition 3).
    """
    ordered = np.sort(all_log_perplexities)
    return np.searchsorted(ordered, all_log_perplexities[numbers], side="right").astype(np.int64)


def code_numbers(fmt: CanaryFormat, codes: np.ndarray) -> np.ndarray:
    """Each secret's number: its slot indices read as base-A digits, most significant first."""
    a = len(fmt.alphabet)
    powers = a ** np.arange(fmt.n_slots - 1, -1, -1, dtype=np.int64)
    return np.asarray(codes, np.int64) @ powers


def canary_scores(predictor: Predictor, canaries: TextCanaries) -> dict[str, np.ndarray]:
    """What a client reports about an audit's text canaries under one predictor.

    ``canary/loss`` (log-perplexity in bits of every inserted and never-inserted canary, in
    plan order), ``reference/loss`` (the sampled reference secrets) and, where the whole space
    can be scored, ``canary/rank_exact`` (each canary's rank among all secrets of the format).
    """
    plan, fmt = canaries.plan, canaries.format
    mine, references = canaries.codes[plan.canaries], canaries.codes[plan.references]
    every = exact_log_perplexities(predictor, fmt)
    if every is None:
        return {
            "canary/loss": log_perplexities(predictor, fmt, mine),
            "reference/loss": log_perplexities(predictor, fmt, references),
        }
    # The tree scored every secret already: look the canaries and references up in it.
    numbers = code_numbers(fmt, mine)
    return {
        "canary/loss": every[numbers],
        "reference/loss": every[code_numbers(fmt, references)],
        "canary/rank_exact": exact_ranks(every, numbers).astype(np.float64),
    }
