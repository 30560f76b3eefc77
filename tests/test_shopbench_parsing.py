"""Official ShopBench parsers and the seed's repairs, against hand-worked expected values."""

from __future__ import annotations

import pytest

from llama3.tasks.shopbench.parsing import (parse_generation, parse_multiple_choice, parse_ner, parse_ranking,
                                            parse_response, parse_retrieval, repair_response)


@pytest.mark.parametrize("response,expected", [
    ("2", 2), ("  3 because the fabric is cotton", 3), ("\n1", 1),
    ("10", 1),  # only the first character counts
    ("a", -1), ("The answer is 2", -1), ("", -1), ("   ", -1),  # non-digit first character / nothing: -1
    ("-1", -1),
])
def test_multiple_choice(response, expected):
    assert parse_multiple_choice(response) == expected


@pytest.mark.parametrize("response,expected", [
    ("1, 2, 3, 4, 5", [1, 2, 3, 4, 5]),
    ("[1, 2, 3, 4, 5]", [1, 2, 3, 4, 5]),  # brackets are dropped with every other non-digit
    ("1, 2, 2, 3", []),  # any duplicate empties the ranking
    ("1, 4, 5, aicrowd, 6", [1, 4, 5]),  # the text field is dropped, 6 > 5 is dropped
    ("3,1,7,2,5,4", [3, 1, 2, 5, 4]),  # 7 dropped, then first five
    ("2,1,3,4,5,1", [2, 1, 3, 4, 5]),  # the duplicate lies past the first five: kept
    ("1 2, 3", [3]),  # "1 2" is not one integer
    ("", []),
    ("Ranking: 5,4,3", [5, 4, 3]),
])
def test_ranking(response, expected):
    assert parse_ranking(response) == expected


@pytest.mark.parametrize("response,expected", [
    ("100, 200, 300, 400", [100, 200, 300]),  # no bound, first three
    ("6,6,9", [6, 6, 9]),  # duplicates are kept
    ("100, 200, jjhg", [100, 200]),
    ("Answer: 3, 8 and 9", [3]),  # " 8  9" is not one integer
    ("none", []),
])
def test_retrieval(response, expected):
    assert parse_retrieval(response) == expected


@pytest.mark.parametrize("response,expected", [
    ("['New York', 'ShopBench', 'Amazon']", ["New York", "ShopBench", "Amazon"]),
    ("New York, ShopBench, Amazon", ["New York", "ShopBench", "Amazon"]),
    ("[New York, ShopBench]", ["[New York", "ShopBench]"]),  # not a literal: split on commas
    ("[4, 1, 2]", ["[4", "1", "2]"]),  # a literal list of non-strings falls back too
    ("a,, b , ", ["a", "b"]),  # empties dropped
    ("", []),
    ("cadbury", ["cadbury"]),
])
def test_ner(response, expected):
    assert parse_ner(response) == expected


def test_generation_and_cut():
    assert parse_generation("  A toggle switch.\n") == "A toggle switch."
    assert len(parse_response("generation", "x" * 6000)) == 5000
    assert parse_response("unknown-type", " hi ") == "hi"
    # The 5,000-character cut happens before parsing: a number after it is not seen.
    assert parse_response("retrieval", " " * 5000 + "1,2,3") == []


@pytest.mark.parametrize("task_type,response,kwargs,expected", [
    ("multiple-choice", "The answer is 2.", {}, "2"),
    ("multiple-choice", "none", {}, "none"),
    ("ranking", "I rank 3 first, then 1, 3, 9, 2", {"n_items": 5}, "3,1,2,4,5"),
    ("retrieval", "Products 12, 3 and 12 again, 7, 8", {"n_items": 15, "pick": 3}, "12,3,7"),
    ("retrieval", "16, 2", {"n_items": 15}, "2"),
    ("named_entity_recognition", "  cadbury \n", {}, "cadbury"),
    ("generation", " text ", {}, "text"),
])
def test_seed_repairs(task_type, response, kwargs, expected):
    assert repair_response(task_type, response, **kwargs) == expected
