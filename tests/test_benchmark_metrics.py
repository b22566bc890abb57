"""Tests for the official benchmark scores: ANLS, ChartQA relaxed accuracy, MMBench/ScienceQA and
MMMU answer matching, and MMBench CircularEval. Expected values are worked out by hand."""

from __future__ import annotations

import pytest

from lvlm_jax.evals import metrics
from lvlm_jax.evals.metrics_choice import (
    circular_accuracy,
    circular_rotations,
    mmmu_open_correct,
    mmmu_parse_choice,
    parse_choice,
)
from lvlm_jax.evals.metrics_documents import anls, relaxed_accuracy

ANIMALS = ["cat", "dog", "bird", "fish"]


def test_new_metrics_are_reexported_from_the_metrics_module():
    for name in ("anls", "relaxed_accuracy", "parse_choice", "mmmu_parse_choice",
                 "mmmu_open_correct", "circular_rotations", "circular_accuracy"):  # fmt: skip
        assert name in metrics.__all__
        assert callable(getattr(metrics, name))


# --- ANLS ------------------------------------------------------------------------------------


def test_anls_is_zero_past_the_threshold_and_one_minus_distance_below():
    # One substitution in a 10-character answer: NL = 1/10.
    assert anls("abcdefghix", ["abcdefghij"]) == pytest.approx(0.9)
    # "axyz" vs "abcd": 3 substitutions / 4 = 0.75 > 0.5 -> 0.
    assert anls("axyz", "abcd") == 0.0
    # Exactly at the threshold: 2/4 = 0.5; the RRC script zeroes only similarity < 0.5.
    assert anls("abxy", "abcd") == pytest.approx(0.5)


def test_anls_ignores_case_and_surrounding_or_repeated_whitespace():
    assert anls("hello world", ["  Hello   World "]) == 1.0
    assert anls("PARIS", "paris") == 1.0


def test_anls_divides_by_the_raw_length_as_the_official_script_does():
    # Normalised "parix" vs "paris": 1 edit; the denominator is the raw reply's 8 characters.
    assert anls("parix   ", "paris") == pytest.approx(1 - 1 / 8)


def test_anls_of_an_empty_prediction_is_zero_and_of_two_empty_strings_one():
    assert anls("", ["abc"]) == 0.0
    assert anls("", [""]) == 1.0


def test_anls_takes_the_best_answer():
    # "colour" vs "color": 1 deletion / 6 -> 5/6; vs "colour": exact -> 1.
    assert anls("colour", ["color", "colour"]) == 1.0
    assert anls("colour", ["color", "shade"]) == pytest.approx(5 / 6)


def test_anls_rejects_an_empty_answer_list():
    with pytest.raises(ValueError):
        anls("x", [])


# --- ChartQA relaxed accuracy ----------------------------------------------------------------


def test_relaxed_accuracy_reads_a_trailing_percent_as_hundredths():
    assert relaxed_accuracy("12%", "0.12") == 1.0
    assert relaxed_accuracy("0.12", "12%") == 1.0
    assert relaxed_accuracy("12", "12%") == 0.0  # 12 vs 0.12


def test_relaxed_accuracy_accepts_five_percent_relative_error_and_no_more():
    assert relaxed_accuracy("105", "100") == 1.0  # |105 - 100| / 100 = 0.05
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("105.1", "100") == 0.0  # 0.051
    assert relaxed_accuracy("-10.4", "-10") == 1.0  # 0.4 / |-10| = 0.04


def test_relaxed_accuracy_treats_thousands_separators_as_text():
    # "1,000" is not a float, so only the identical string matches (official behaviour).
    assert relaxed_accuracy("1000", "1,000") == 0.0
    assert relaxed_accuracy("1,000", "1,000") == 1.0
    assert relaxed_accuracy("1,001", "1,000") == 0.0


def test_relaxed_accuracy_compares_a_zero_target_as_a_string():
    assert relaxed_accuracy("0", "0") == 1.0
    assert relaxed_accuracy("0.0", "0") == 0.0


def test_relaxed_accuracy_needs_a_case_insensitive_exact_match_for_text():
    assert relaxed_accuracy("Yes", "yes") == 1.0
    assert relaxed_accuracy("yes ", "yes") == 0.0  # no stripping in the reference
    assert relaxed_accuracy("Paris", "Lyon") == 0.0
    assert relaxed_accuracy("12 apples", "12") == 0.0


# --- MMBench / ScienceQA (VLMEvalKit can_infer) ----------------------------------------------


@pytest.mark.parametrize("reply", ["B", "B.", "(B)", "B)", "The answer is B", "Answer: B"])
def test_parse_choice_finds_a_standalone_letter(reply):
    assert parse_choice(reply, ANIMALS) == 1


def test_parse_choice_falls_back_to_the_text_of_exactly_one_option():
    assert parse_choice("a dog", ANIMALS) == 1
    assert parse_choice("cat or dog", ANIMALS) is None  # two options named


def test_parse_choice_gives_none_for_several_letters_or_a_refusal():
    assert parse_choice("A and B", ANIMALS) is None
    assert parse_choice("I'm sorry, but without the image provided, I can't tell", ANIMALS) is None
    assert parse_choice("hmm", ANIMALS) is None


def test_parse_choice_only_takes_a_letter_among_the_last_five_words():
    # B is word 1 of 12 and the reply is too long for the text step (2 * 14 characters).
    assert parse_choice("B is right because the picture shows a dog in the yard", ANIMALS) is None
    # "answer is **C**" is read even when an explanation follows.
    reply = "The correct answer is **C**. Here is why: the bird flies over the lake today"
    assert parse_choice(reply, ANIMALS) == 2


def test_parse_choice_ignores_letters_past_the_option_count():
    assert parse_choice("E", ANIMALS) is None
    assert parse_choice("C", ["yes", "no"]) is None


# --- MMMU multiple choice --------------------------------------------------------------------


def test_mmmu_parse_choice_finds_a_bracketed_letter_inside_text():
    assert mmmu_parse_choice("The answer is (B) because the dog barks.", ANIMALS) == 1


def test_mmmu_parse_choice_finds_a_bare_letter():
    assert mmmu_parse_choice("B", ANIMALS) == 1
    assert mmmu_parse_choice("B.", ANIMALS) == 1  # the trailing "." is stripped first


def test_mmmu_parse_choice_takes_the_last_of_several_letters():
    assert mmmu_parse_choice("(A) or (C)? I pick (C)", ANIMALS) == 2
    # Both " B " and " A " stand alone; A occurs later, so A wins (official behaviour).
    assert mmmu_parse_choice("The answer is B because A is wrong", ANIMALS) == 0


def test_mmmu_parse_choice_reads_option_text_only_in_replies_over_five_words():
    assert mmmu_parse_choice("I think the animal shown is a dog", ANIMALS) == 1
    # Two options named: the one whose text occurs last wins.
    assert mmmu_parse_choice("The picture shows a cat and then a dog here", ANIMALS) == 1


def test_mmmu_parse_choice_draws_a_reproducible_valid_index_when_nothing_parses():
    for seed in ("validation_Art_1", "validation_Math_7", ""):
        first = mmmu_parse_choice("hmm", ANIMALS, seed=seed)
        assert 0 <= first < len(ANIMALS)
        assert all(mmmu_parse_choice("hmm", ANIMALS, seed=seed) == first for _ in range(5))
    # The short reply "dog" (one word) is not matched by text, so it is drawn too.
    drawn = {mmmu_parse_choice("dog", ANIMALS, seed=str(i)) for i in range(50)}
    assert drawn <= {0, 1, 2, 3} and len(drawn) > 1


# --- MMMU open questions ---------------------------------------------------------------------


def test_mmmu_open_correct_matches_numbers_after_the_answer_indicator():
    assert mmmu_open_correct("The answer is 42", "42")
    assert mmmu_open_correct("The answer is 42", ["41", "42"])
    assert not mmmu_open_correct("The answer is 43", "42")
    # Commas are removed before the number is read: "1,000" == 1000.0.
    assert mmmu_open_correct("The answer is 1,000.", "1000")
    # Both sides are rounded to 2 decimals: 3.14159 -> 3.14, while 3.146 -> 3.15.
    assert mmmu_open_correct("The result is 3.14159", "3.14")
    assert not mmmu_open_correct("The result is 3.146", "3.14")


def test_mmmu_open_correct_keeps_percent_answers_as_text_and_their_digits_as_numbers():
    assert mmmu_open_correct("x = 5%", "5%")  # the string "5%" contains "5%"
    assert mmmu_open_correct("x = 5%", "5")  # the extracted number 5.0
    assert not mmmu_open_correct("x = 5%", "0.05")


def test_mmmu_open_correct_finds_a_string_answer_inside_the_key_phrase():
    assert mmmu_open_correct("It is the cat.", "cat")  # key phrase "the cat"
    assert mmmu_open_correct("It is the Cat.", "CAT")  # both lower-cased
    assert not mmmu_open_correct("It is a dog", "cat")


def test_mmmu_open_correct_checks_every_line_of_a_reply():
    reply = "The value is 12.\nSo the answer is 7"
    assert mmmu_open_correct(reply, "12") and mmmu_open_correct(reply, "7")
    assert not mmmu_open_correct(reply, "8")


# --- MMBench CircularEval --------------------------------------------------------------------


def test_circular_rotations_of_two_three_and_four_options():
    assert circular_rotations(["x", "y"], 0) == [(["x", "y"], 0), (["y", "x"], 1)]
    assert circular_rotations(["a", "b", "c"], 0) == [
        (["a", "b", "c"], 0),
        (["b", "c", "a"], 2),
        (["c", "a", "b"], 1),
    ]
    assert circular_rotations(ANIMALS, 1) == [
        (["cat", "dog", "bird", "fish"], 1),
        (["dog", "bird", "fish", "cat"], 0),
        (["bird", "fish", "cat", "dog"], 3),
        (["fish", "cat", "dog", "bird"], 2),
    ]


def test_circular_rotations_keep_the_answer_text_at_the_answer_index():
    for options, answer in circular_rotations(ANIMALS, 2):
        assert options[answer] == "bird"


def test_circular_rotations_reject_an_answer_out_of_range():
    with pytest.raises(ValueError):
        circular_rotations(["x", "y"], 2)


def test_circular_accuracy_needs_every_rotation_right():
    # Question 1: three of four rotations right -> wrong; question 2: all right.
    correct = {1: [True, True, False, True], 2: [True, True, True, True]}
    assert circular_accuracy(correct) == 0.5
    assert circular_accuracy({"q": [True, True, True, False]}) == 0.0
    assert circular_accuracy({"q": [True, True]}) == 1.0


def test_circular_accuracy_of_no_groups_is_zero():
    assert circular_accuracy({}) == 0.0
