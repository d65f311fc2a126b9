"""Choosing few-shot examples from the train split.

Every method is seeded and returns a :class:`ShotPlan`: either one fixed list of train ids for
the whole run (``shared``) or one list per test tweet (``per_tweet``). Methods live in the
:data:`SELECTORS` registry, so a new one is a function plus one :func:`register_selector` call.

Built-in methods:

* ``random``: ``n`` train tweets drawn with ``random.Random(seed)``.
* ``balanced``: round-robin over the classes in ``LABELS`` order (so the counts differ by at most
  one, the first classes getting the extra shots), each class drawn with the seed; the shots are
  then shuffled with the seed so that classes are interleaved in the prompt.
* ``manual``: exactly the given train ids, in the given order.
* ``similar``: for each test tweet the ``n`` nearest train tweets by TF-IDF cosine similarity
  over character n-grams, least similar first so the most similar sits next to the question.

``random`` and ``balanced`` can also draw a fresh set per test tweet (``per_tweet=True``), seeded
by the seed and the test id, so a tweet's shots do not depend on which other tweets are run.

No train row whose id or tweet text (ignoring surrounding whitespace) appears in the test frame
is ever chosen: a shot that is the question itself would leak its label.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from emoprompt.labels import LABELS
from emoprompt.prompting.prompt_file import PromptError

# Rows of similarity computed at once: bounds memory to chunk x train floats.
_SIMILARITY_CHUNK = 512
# Similarities are rounded before ranking so that ties (duplicated train tweets) are broken by
# train order alone, not by floating-point noise.
_SIMILARITY_DECIMALS = 10


@dataclass(frozen=True)
class ShotPlan:
    """The few-shot examples (train ids) for a run: one shared list or one list per test id."""

    method: str
    seed: int
    n: int
    shared: list[str] | None = None
    per_tweet: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        if (self.shared is None) == (self.per_tweet is None):
            raise ValueError("a ShotPlan needs exactly one of shared and per_tweet")

    @property
    def is_per_tweet(self) -> bool:
        """Whether each test tweet has its own shots."""
        return self.per_tweet is not None

    def ids_for(self, test_id: str) -> list[str]:
        """The train ids to show before test tweet ``test_id``, in prompt order."""
        if self.shared is not None:
            return list(self.shared)
        assert self.per_tweet is not None
        try:
            return list(self.per_tweet[str(test_id)])
        except KeyError:
            raise KeyError(f"no shots planned for test id {test_id!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (for logging the exact shots of a run)."""
        return {
            "method": self.method,
            "seed": self.seed,
            "n": self.n,
            "shared": self.shared,
            "per_tweet": self.per_tweet,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShotPlan:
        """The inverse of :meth:`to_dict`."""
        return cls(
            method=data["method"],
            seed=int(data["seed"]),
            n=int(data["n"]),
            shared=data.get("shared"),
            per_tweet=data.get("per_tweet"),
        )


SharedFn = Callable[[pd.DataFrame, int, random.Random, Sequence[str]], list[str]]
PerTweetFn = Callable[[pd.DataFrame, pd.DataFrame, int, int], dict[str, list[str]]]


@dataclass(frozen=True)
class Selector:
    """A selection method.

    ``shared(pool, n, rng, manual_ids)`` picks one list of ids; ``per_tweet(pool, test, n,
    seed)`` picks one list per test id. A method without ``per_tweet`` gets it from ``shared``
    with one generator per test tweet. ``default_per_tweet`` is used when the caller passes
    ``per_tweet=None``.
    """

    shared: SharedFn | None = None
    per_tweet: PerTweetFn | None = None
    default_per_tweet: bool = False
    # Whether ``per_tweet`` may be derived from ``shared`` (pointless for a fixed manual list).
    derive_per_tweet: bool = True


SELECTORS: dict[str, Selector] = {}


def register_selector(name: str, selector: Selector) -> None:
    """Add a selection method under ``name`` (refuses to replace an existing one)."""
    if name in SELECTORS:
        raise ValueError(f"few-shot method {name!r} is already registered")
    if selector.shared is None and selector.per_tweet is None:
        raise ValueError(f"few-shot method {name!r} selects nothing")
    SELECTORS[name] = selector


def select_shots(
    train: pd.DataFrame,
    test: pd.DataFrame,
    method: str,
    n: int,
    seed: int,
    manual_ids: Sequence[str] = (),
    per_tweet: bool | None = None,
) -> ShotPlan:
    """Choose ``n`` few-shot examples from ``train`` for the tweets of ``test``.

    ``per_tweet=None`` uses the method's default (one shared set, except ``similar``).
    Raises ``ValueError`` for an unknown method, a mode the method cannot give, or ``n``
    larger than the train tweets available (after removing anything that is in ``test``).
    """
    if method not in SELECTORS:
        raise ValueError(f"unknown few-shot method {method!r}; expected one of {sorted(SELECTORS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    selector = SELECTORS[method]
    if per_tweet is None:
        per_tweet = selector.default_per_tweet
    pool = _candidate_pool(train, test)
    _check_count(pool, train, n)

    if not per_tweet:
        if selector.shared is None:
            raise ValueError(f"few-shot method {method!r} needs per_tweet=True")
        ids = selector.shared(pool, n, random.Random(seed), manual_ids)
        return ShotPlan(method=method, seed=seed, n=n, shared=ids)

    if selector.per_tweet is not None:
        plan = selector.per_tweet(pool, test, n, seed)
    elif selector.derive_per_tweet:
        assert selector.shared is not None
        # A string seed is hashed deterministically (sha512), independent of PYTHONHASHSEED.
        plan = {
            test_id: selector.shared(pool, n, random.Random(f"{seed}/{test_id}"), manual_ids)
            for test_id in _ids(test)
        }
    else:
        raise ValueError(f"few-shot method {method!r} gives one shared set; use per_tweet=False")
    return ShotPlan(method=method, seed=seed, n=n, per_tweet=plan)


def shots_frame(train: pd.DataFrame, ids: Sequence[str]) -> pd.DataFrame:
    """The rows of ``train`` with ``ids``, in that order (repeats allowed), fresh index."""
    by_id = train.set_index(train["id"].astype(str), drop=False)
    unknown = [i for i in ids if str(i) not in by_id.index]
    if unknown:
        raise ValueError(f"ids not in the train split: {', '.join(map(str, unknown))}")
    return by_id.loc[[str(i) for i in ids]].reset_index(drop=True)


def _ids(frame: pd.DataFrame) -> list[str]:
    return frame["id"].astype(str).tolist()


def _candidate_pool(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Train rows that may be shots: not in ``test`` by id or by tweet text."""
    if train["id"].astype(str).duplicated().any():
        dupes = train.loc[train["id"].astype(str).duplicated(), "id"].astype(str).unique()
        raise ValueError(f"duplicated ids in the train split: {', '.join(dupes[:5])}")
    test_ids = set(_ids(test))
    test_texts = set(test["tweet"].astype(str).str.strip())
    leak = train["id"].astype(str).isin(test_ids) | train["tweet"].astype(str).str.strip().isin(
        test_texts
    )
    return train.loc[~leak].reset_index(drop=True)


def _select_random(
    pool: pd.DataFrame, n: int, rng: random.Random, manual_ids: Sequence[str]
) -> list[str]:
    return rng.sample(_ids(pool), n)


def _select_balanced(
    pool: pd.DataFrame, n: int, rng: random.Random, manual_ids: Sequence[str]
) -> list[str]:
    labels = pool["label"].astype(str)
    present = set(labels)
    # LABELS order first, then any other label (a custom label set) in sorted order.
    order = [label for label in LABELS if label in present] + sorted(present - set(LABELS))
    queues: list[list[str]] = []
    for label in order:
        ids = pool.loc[labels == label, "id"].astype(str).tolist()
        queues.append(rng.sample(ids, len(ids)))
    chosen: list[str] = []
    # Round-robin: one per class per round, skipping classes that have run out, so the counts
    # differ by at most one unless a class is too small.
    for round_index in range(max(map(len, queues), default=0)):
        if len(chosen) == n:
            break
        for queue in queues:
            if len(chosen) < n and round_index < len(queue):
                chosen.append(queue[round_index])
    rng.shuffle(chosen)
    return chosen


def _select_manual(
    pool: pd.DataFrame, n: int, rng: random.Random, manual_ids: Sequence[str]
) -> list[str]:
    ids = [str(i) for i in manual_ids]
    if len(ids) != n:
        raise ValueError(f"manual shots: n={n} but {len(ids)} ids given")
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"manual shots: ids given more than once: {', '.join(repeated)}")
    available = set(_ids(pool))
    missing = [i for i in ids if i not in available]
    if missing:
        raise ValueError(
            "manual shots: ids not in the train split (or also in the test split): "
            + ", ".join(missing)
        )
    return ids


def _select_similar(
    pool: pd.DataFrame, test: pd.DataFrame, n: int, seed: int
) -> dict[str, list[str]]:
    # scikit-learn only here: the other selections run without it (a GPU machine)
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Character n-grams within word boundaries cope with hashtags, elongations and typos.
    vectorizer = TfidfVectorizer(
        analyzer="char_wb", ngram_range=(2, 5), lowercase=True, sublinear_tf=True
    )
    pool_matrix = vectorizer.fit_transform(pool["tweet"].astype(str))
    test_matrix = vectorizer.transform(test["tweet"].astype(str))
    pool_ids = np.array(_ids(pool), dtype=object)
    test_ids = _ids(test)
    plan: dict[str, list[str]] = {}
    for start in range(0, len(test_ids), _SIMILARITY_CHUNK):
        block = (test_matrix[start : start + _SIMILARITY_CHUNK] @ pool_matrix.T).toarray()
        block = np.round(block, _SIMILARITY_DECIMALS)
        for offset, sims in enumerate(block):
            # Stable sort on -similarity: equal similarities keep train order.
            nearest = np.argsort(-sims, kind="stable")[:n]
            plan[test_ids[start + offset]] = pool_ids[nearest[::-1]].tolist()
    return plan


register_selector("random", Selector(shared=_select_random))
register_selector("balanced", Selector(shared=_select_balanced))
register_selector("manual", Selector(shared=_select_manual, derive_per_tweet=False))
register_selector("similar", Selector(per_tweet=_select_similar, default_per_tweet=True))


def check_settings(prompt: Any, train: pd.DataFrame | None = None, test=None) -> None:
    """Refuse few-shot settings that cannot give their shots, naming the prompt file and
    the key: fewer than one shot, an unknown selection, manual ids that do not match the
    number of shots; with the splits, ids or shot counts the train split cannot give.

    ``prompt`` is a few-shot :class:`emoprompt.prompting.prompt_file.PromptFile`.
    """
    settings, path = prompt.settings, prompt.path
    shots, method = settings["shots"], settings["selection"]
    if shots < 1:
        raise PromptError(
            f"{path}: 'shots' is {shots}; the few-shot strategies need at least 1 "
            "(the zero-shot strategies run without examples)"
        )
    if method not in SELECTORS:
        raise PromptError(
            f"{path}: 'selection' {method!r} is not a few-shot method; "
            f"expected one of {', '.join(sorted(SELECTORS))}"
        )
    manual = [str(i) for i in settings.get("manual_ids") or []]
    if method == "manual" and len(manual) != shots:
        raise PromptError(f"{path}: 'manual_ids' holds {len(manual)} ids but 'shots' is {shots}")
    if train is None:
        return
    test = train.iloc[:0] if test is None else test
    try:
        if SELECTORS[method].shared is None:  # per-tweet only (similar): the count suffices
            _check_count(_candidate_pool(train, test), train, shots)
        else:
            select_shots(train, test, method, shots, settings.get("seed", 0), manual, False)
    except ValueError as exc:
        key = "manual_ids" if method == "manual" and "ids" in str(exc) else "shots"
        raise PromptError(f"{path}: {key!r}: {exc}") from None


def _check_count(pool: pd.DataFrame, train: pd.DataFrame, n: int) -> None:
    if n > len(pool):
        raise ValueError(
            f"{n} shots asked but only {len(pool)} train tweets are available "
            f"({len(train) - len(pool)} removed as they are in the test split)"
        )


def check_calibration(prompt: Any, calibrate: bool, setting: str = "scoring.calibrate") -> None:
    """Refuse contextual calibration with shots chosen per tweet: the content-free prompts
    would carry one tweet's shots, and their prior would be applied to prompts with
    other shots."""
    method = prompt.settings["selection"]
    if calibrate and method in SELECTORS and SELECTORS[method].shared is None:
        raise PromptError(
            f"{prompt.path}: 'selection' {method!r} chooses the shots per tweet, so "
            f"contextual calibration (config {setting}) would apply one content-free "
            "prior to prompts with other shots; leave it out, or choose shots shared "
            "by every tweet (random, balanced, manual)"
        )
