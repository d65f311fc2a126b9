"""Tests for few-shot example selection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from emoprompt.labels import LABELS, to_spanish
from emoprompt.prompting import fewshot
from emoprompt.prompting.fewshot import (
    SELECTORS,
    Selector,
    ShotPlan,
    register_selector,
    select_shots,
    shots_frame,
)


def read_split(path: Path) -> pd.DataFrame:
    """A real split with the Spanish ``label`` column the product uses."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame["label"] = frame.pop("emotion").map(to_spanish)
    return frame


@pytest.fixture(scope="module")
def real_train(data_dir: Path) -> pd.DataFrame:
    return read_split(data_dir / "train.tsv")


@pytest.fixture(scope="module")
def real_dev(data_dir: Path) -> pd.DataFrame:
    return read_split(data_dir / "dev.tsv")


def make_frame(prefix: str, per_class: int, labels: tuple[str, ...] = LABELS) -> pd.DataFrame:
    rows = [
        {
            "id": f"{prefix}{label[:3]}{i}",
            "event": "Evento",
            "tweet": f"{prefix} tuit {i} sobre {label}",
            "offensive": "NO",
            "label": label,
        }
        for label in labels
        for i in range(per_class)
    ]
    return pd.DataFrame(rows)


@pytest.fixture
def train() -> pd.DataFrame:
    return make_frame("tr", per_class=5)


@pytest.fixture
def test() -> pd.DataFrame:
    return make_frame("te", per_class=1)


# --- random -------------------------------------------------------------------------------------


def test_random_is_seeded(train: pd.DataFrame, test: pd.DataFrame) -> None:
    first = select_shots(train, test, "random", n=8, seed=1)
    again = select_shots(train, test, "random", n=8, seed=1)
    other = select_shots(train, test, "random", n=8, seed=2)
    assert first.shared == again.shared
    assert first.shared != other.shared
    assert first.per_tweet is None and not first.is_per_tweet
    assert len(first.shared) == len(set(first.shared)) == 8
    assert set(first.shared) <= set(train["id"])
    assert (first.method, first.seed, first.n) == ("random", 1, 8)


def test_random_is_the_same_for_every_test_tweet(train: pd.DataFrame, test: pd.DataFrame) -> None:
    plan = select_shots(train, test, "random", n=4, seed=0)
    assert {tuple(plan.ids_for(i)) for i in test["id"]} == {tuple(plan.shared)}


def test_random_per_tweet_is_seeded_by_test_id(train: pd.DataFrame, test: pd.DataFrame) -> None:
    plan = select_shots(train, test, "random", n=4, seed=3, per_tweet=True)
    assert plan.shared is None and plan.is_per_tweet
    assert set(plan.per_tweet) == set(test["id"])
    # Different tweets get different draws...
    assert len({tuple(plan.ids_for(i)) for i in test["id"]}) > 1
    # ...and a tweet's draw does not depend on the other tweets of the run.
    alone = select_shots(train, test.iloc[[4]], "random", n=4, seed=3, per_tweet=True)
    test_id = test["id"].iloc[4]
    assert alone.ids_for(test_id) == plan.ids_for(test_id)
    reseeded = select_shots(train, test, "random", n=4, seed=4, per_tweet=True)
    assert reseeded.per_tweet != plan.per_tweet


# --- balanced -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 10, 14, 20])
def test_balanced_covers_all_classes_evenly(
    train: pd.DataFrame, test: pd.DataFrame, n: int
) -> None:
    plan = select_shots(train, test, "balanced", n=n, seed=0)
    labels = shots_frame(train, plan.shared)["label"]
    counts = Counter(labels)
    assert len(plan.shared) == len(set(plan.shared)) == n
    assert set(counts) == set(LABELS)
    assert max(counts.values()) - min(counts.values()) <= 1
    # The extra shots go to the first classes in LABELS order.
    expected = [n // 7 + (1 if i < n % 7 else 0) for i in range(7)]
    assert [counts[label] for label in LABELS] == expected


def test_balanced_with_fewer_shots_than_classes(train: pd.DataFrame, test: pd.DataFrame) -> None:
    plan = select_shots(train, test, "balanced", n=3, seed=0)
    labels = shots_frame(train, plan.shared)["label"]
    assert sorted(labels) == sorted(LABELS[:3])


def test_balanced_is_seeded_and_interleaved(train: pd.DataFrame, test: pd.DataFrame) -> None:
    plans = [select_shots(train, test, "balanced", n=14, seed=s).shared for s in range(5)]
    assert plans[0] == select_shots(train, test, "balanced", n=14, seed=0).shared
    assert len({tuple(p) for p in plans}) == 5
    # Shuffled after the round-robin: the class sequence is not the same in every seed.
    class_orders = {tuple(shots_frame(train, p)["label"]) for p in plans}
    assert len(class_orders) > 1
    # And not grouped by class (two blocks of the seven classes in LABELS order).
    assert tuple(LABELS) * 2 not in class_orders


def test_balanced_fills_up_when_a_class_runs_out(test: pd.DataFrame) -> None:
    train = make_frame("tr", per_class=4)
    # Keep a single Miedo tweet: it is used once and the other classes fill the rest.
    train = train[(train["label"] != "Miedo") | (train["id"] == "trMie0")]
    plan = select_shots(train, test, "balanced", n=14, seed=0)
    counts = Counter(shots_frame(train, plan.shared)["label"])
    assert counts["Miedo"] == 1
    assert sum(counts.values()) == 14
    assert all(counts[label] in (2, 3) for label in LABELS if label != "Miedo")


def test_balanced_on_real_train(real_train: pd.DataFrame, real_dev: pd.DataFrame) -> None:
    plan = select_shots(real_train, real_dev, "balanced", n=21, seed=0)
    counts = Counter(shots_frame(real_train, plan.shared)["label"])
    assert counts == Counter({label: 3 for label in LABELS})


# --- manual -------------------------------------------------------------------------------------


def test_manual_keeps_the_given_order(train: pd.DataFrame, test: pd.DataFrame) -> None:
    ids = ["trOtr2", "trAle0", "trIra4"]
    plan = select_shots(train, test, "manual", n=3, seed=0, manual_ids=ids)
    assert plan.shared == ids
    assert plan.ids_for("teAle0") == ids
    # The seed plays no part.
    assert select_shots(train, test, "manual", n=3, seed=9, manual_ids=ids).shared == ids
    assert shots_frame(train, plan.shared)["id"].tolist() == ids


def test_manual_unknown_id_is_named(train: pd.DataFrame, test: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="nope-42"):
        select_shots(train, test, "manual", n=2, seed=0, manual_ids=["trAle0", "nope-42"])


def test_manual_rejects_wrong_count_and_repeats(train: pd.DataFrame, test: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="n=3 but 2 ids"):
        select_shots(train, test, "manual", n=3, seed=0, manual_ids=["trAle0", "trAle1"])
    with pytest.raises(ValueError, match="more than once: trAle0"):
        select_shots(train, test, "manual", n=2, seed=0, manual_ids=["trAle0", "trAle0"])


def test_manual_is_always_shared(train: pd.DataFrame, test: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="per_tweet=False"):
        select_shots(train, test, "manual", n=1, seed=0, manual_ids=["trAle0"], per_tweet=True)


# --- similar ------------------------------------------------------------------------------------


def test_similar_finds_the_edited_copy(real_train: pd.DataFrame, real_dev: pd.DataFrame) -> None:
    sources = real_train.iloc[[10, 500, 2500, 4000, 5700]]
    edits = [
        lambda t: t.upper(),
        lambda t: t + " #hoy",
        lambda t: t.replace(" ", "  ", 3)[:-3],
        lambda t: "Ojo: " + t.lower(),
        lambda t: t.replace("a", "á", 2),
    ]
    test = pd.DataFrame(
        {
            "id": [f"edited-{i}" for i in range(len(sources))],
            "event": sources["event"].tolist(),
            "tweet": [edit(t) for edit, t in zip(edits, sources["tweet"], strict=True)],
            "offensive": "NO",
            "label": sources["label"].tolist(),
        }
    )
    plan = select_shots(real_train, test, "similar", n=5, seed=0)
    assert plan.is_per_tweet and plan.shared is None
    for test_id, source_id in zip(test["id"], sources["id"], strict=True):
        ids = plan.ids_for(test_id)
        assert len(ids) == len(set(ids)) == 5
        # Least similar first: the copy sits last, next to the question.
        assert ids[-1] == source_id


def test_similar_orders_least_similar_first() -> None:
    train = pd.DataFrame(
        {
            "id": ["far", "near", "mid"],
            "event": "e",
            "tweet": [
                "el partido de fútbol terminó empatado",
                "qué miedo me dan las tormentas de noche",
                "las tormentas de verano son bonitas",
            ],
            "offensive": "NO",
            "label": ["Otras", "Miedo", "Alegría"],
        }
    )
    test = pd.DataFrame(
        {
            "id": ["q"],
            "event": "e",
            "tweet": ["qué miedo las tormentas de noche"],
            "offensive": "NO",
            "label": ["Miedo"],
        }
    )
    assert select_shots(train, test, "similar", n=3, seed=0).ids_for("q") == ["far", "mid", "near"]
    assert select_shots(train, test, "similar", n=1, seed=0).ids_for("q") == ["near"]


def test_similar_breaks_ties_by_train_order(test: pd.DataFrame) -> None:
    # Three identical tweets: the earliest in train order counts as the most similar.
    train = make_frame("tr", per_class=2)
    train.loc[:, "tweet"] = "exactamente el mismo tuit"
    test = test.assign(tweet="exactamente el mismo tuit de prueba")
    plan = select_shots(train, test, "similar", n=3, seed=0)
    assert plan.ids_for(test["id"].iloc[0]) == train["id"].iloc[:3].tolist()[::-1]
    # Deterministic: the seed plays no part in a similarity ranking.
    assert select_shots(train, test, "similar", n=3, seed=5).per_tweet == plan.per_tweet


def test_similar_covers_every_test_tweet(train: pd.DataFrame, test: pd.DataFrame) -> None:
    plan = select_shots(train, test, "similar", n=2, seed=0)
    assert set(plan.per_tweet) == set(test["id"])
    # The synthetic tweets name their class, so the nearest shot has the same class.
    for test_id, label in zip(test["id"], test["label"], strict=True):
        assert shots_frame(train, plan.ids_for(test_id)[-1:])["label"].item() == label


def test_similar_needs_per_tweet(train: pd.DataFrame, test: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="per_tweet=True"):
        select_shots(train, test, "similar", n=2, seed=0, per_tweet=False)


# --- guards -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["random", "balanced", "similar"])
def test_test_tweets_are_never_shots(method: str) -> None:
    train = make_frame("tr", per_class=2)
    test = pd.DataFrame(
        {
            "id": ["trAle0", "new-1"],  # same id as a train row
            "event": "e",
            "tweet": ["otro texto", "  " + train["tweet"].iloc[3] + "\n"],  # same text
            "offensive": "NO",
            "label": ["Alegría", "Tristeza"],
        }
    )
    leaked = {"trAle0", train["id"].iloc[3]}
    available = len(train) - len(leaked)
    # Asking for every remaining tweet must give exactly the remaining tweets.
    plan = select_shots(train, test, method, n=available, seed=0)
    for test_id in test["id"]:
        ids = plan.ids_for(test_id)
        assert len(ids) == available
        assert not leaked & set(ids)
    with pytest.raises(ValueError, match="2 removed"):
        select_shots(train, test, method, n=available + 1, seed=0)


def test_manual_refuses_a_test_tweet(train: pd.DataFrame) -> None:
    test = train.iloc[[0]].assign(tweet="distinto")
    with pytest.raises(ValueError, match=train["id"].iloc[0]):
        select_shots(train, test, "manual", n=1, seed=0, manual_ids=[train["id"].iloc[0]])


@pytest.mark.parametrize("method", ["random", "balanced", "similar"])
def test_too_many_shots_raise(train: pd.DataFrame, test: pd.DataFrame, method: str) -> None:
    assert len(select_shots(train, test, method, n=len(train), seed=0).ids_for("teAle0")) == 35
    with pytest.raises(ValueError, match="36 shots asked but only 35"):
        select_shots(train, test, method, n=len(train) + 1, seed=0)


def test_zero_shots_and_bad_arguments(train: pd.DataFrame, test: pd.DataFrame) -> None:
    assert select_shots(train, test, "random", n=0, seed=0).shared == []
    assert select_shots(train, test, "similar", n=0, seed=0).ids_for("teIra0") == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        select_shots(train, test, "random", n=-1, seed=0)
    with pytest.raises(ValueError, match="unknown few-shot method 'nearest'"):
        select_shots(train, test, "nearest", n=1, seed=0)


def test_duplicated_train_ids_are_rejected(train: pd.DataFrame, test: pd.DataFrame) -> None:
    doubled = pd.concat([train, train.iloc[[0]]], ignore_index=True)
    with pytest.raises(ValueError, match="duplicated ids in the train split: trAle0"):
        select_shots(doubled, test, "random", n=1, seed=0)


# --- ShotPlan, shots_frame and the registry -----------------------------------------------------


def test_shot_plan_needs_exactly_one_form() -> None:
    with pytest.raises(ValueError):
        ShotPlan(method="x", seed=0, n=0)
    with pytest.raises(ValueError):
        ShotPlan(method="x", seed=0, n=1, shared=["a"], per_tweet={"t": ["a"]})


def test_shot_plan_ids_for_and_round_trip() -> None:
    plan = ShotPlan(method="similar", seed=1, n=2, per_tweet={"t1": ["a", "b"], "t2": ["c", "d"]})
    assert plan.ids_for("t2") == ["c", "d"]
    # ids_for hands out a copy: callers cannot alter the plan.
    plan.ids_for("t1").append("z")
    assert plan.ids_for("t1") == ["a", "b"]
    with pytest.raises(KeyError, match="t3"):
        plan.ids_for("t3")
    assert ShotPlan.from_dict(plan.to_dict()) == plan
    shared = ShotPlan(method="random", seed=0, n=1, shared=["a"])
    assert ShotPlan.from_dict(shared.to_dict()) == shared


def test_shots_frame(train: pd.DataFrame) -> None:
    frame = shots_frame(train, ["trIra1", "trAle0", "trIra1"])
    assert frame["id"].tolist() == ["trIra1", "trAle0", "trIra1"]
    assert frame.columns.tolist() == train.columns.tolist()
    assert frame.index.tolist() == [0, 1, 2]
    assert frame.loc[1, "tweet"] == "tr tuit 0 sobre Alegría"
    with pytest.raises(ValueError, match="missing-id"):
        shots_frame(train, ["trAle0", "missing-id"])


def test_new_methods_can_be_registered(
    monkeypatch: pytest.MonkeyPatch, train: pd.DataFrame, test: pd.DataFrame
) -> None:
    monkeypatch.setattr(fewshot, "SELECTORS", dict(SELECTORS))

    def first_n(pool: pd.DataFrame, n: int, rng: object, manual_ids: object) -> list[str]:
        return pool["id"].head(n).tolist()

    register_selector("first", Selector(shared=first_n))
    assert select_shots(train, test, "first", n=2, seed=0).shared == ["trAle0", "trAle1"]
    with pytest.raises(ValueError, match="already registered"):
        register_selector("first", Selector(shared=first_n))
    assert "first" not in SELECTORS  # the module's own registry is untouched
