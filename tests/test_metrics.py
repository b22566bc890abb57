"""Tests for lvlm_jax.evals.metrics: hand-computed cases and equality with pycocoevalcap."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lvlm_jax.evals import metrics

# Raw captions: several references each, with repeated words, short hypotheses, punctuation,
# contractions, possessives, brackets, quotes and numbers.
RAW_GTS: dict[int, list[str]] = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave!"],
    2: ["Two dogs playing with a frisbee in the park.", "Two dogs are chasing a red frisbee.",
        "A pair of dogs play in the grass, with a frisbee."],
    3: ["A cat sleeping on a laptop keyboard.", "The cat's asleep on the computer's keyboard.",
        "An orange cat lies on top of a laptop."],
    4: ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate.",
        "A white plate topped with rice, broccoli, and meat."],
    5: ["A train traveling down tracks next to a forest.", "A red and white train on the tracks.",
        "The train is going down the railroad tracks."],
    6: ["A giraffe standing next to a tree.", "A tall giraffe eating leaves from a tree.",
        "A giraffe is standing by some trees in a zoo."],
    7: ["People walking down a busy city street.", "A crowd of people walk along the sidewalk.",
        "Many people on a city street with buildings."],
    8: ["A bowl of fruit on a table.", "Bananas, apples and oranges in a bowl.",
        "A wooden table with a bowl full of fruit."],
    9: ["A stop sign at the corner of a street.", 'A red "STOP" sign on a pole.',
        "A stop sign near a street corner (in the city)."],
    10: ["A kitchen with a stove, a sink and a refrigerator.", "A small kitchen; white cabinets.",
         "The kitchen has a refrigerator and a stove."],
    11: ["A man is holding a tennis racket.", "A tennis player swings his racket at the ball.",
         "A man playing tennis on a court."],
    12: ["Two zebras standing in a grassy field.", "A couple of zebras grazing in the grass.",
         "Zebras in a field of tall grass."],
    13: ["A bathroom with a toilet and a sink.", "A white toilet next to a bathroom sink.",
         "This bathroom doesn't have a bathtub, only a toilet and a sink."],
    14: ["A little boy eating a slice of pizza.", "A child is eating pizza at a table.",
         "A young boy takes a bite of his pizza."],
    15: ["An airplane flying in a clear blue sky.", "A large jet flying through the sky.",
         "A plane is flying high in the blue sky."],
    16: ["A group of sheep grazing on a hill.", "Sheep, sheep and more sheep on a grassy hill.",
         "Several sheep eat grass on the hillside."],
    17: ["A clock tower in the middle of a town.", "A tall tower with a clock on it.",
         "The clock on the tower reads 3:30."],
    18: ["A woman holding an umbrella in the rain.", "A lady with an umbrella walks in the rain.",
         "A woman walks down the street with her umbrella."],
    19: ["A bus parked on the side of the road.", "A double-decker bus on a city street.",
         "A large bus is stopped at the bus stop."],
    20: ["A dog lying on a couch next to a pillow.", "A brown dog rests on the sofa.",
         "The dog is sleeping on a couch, isn't it?"],
    21: ["A man and woman cutting a cake.", "A couple cuts their wedding cake together.",
         "Bride and groom cutting the cake at the wedding."],
}  # fmt: skip
RAW_RES: dict[int, list[str]] = {
    1: ["A man riding a wave on a surfboard."],
    2: ["Dogs dogs dogs dogs."],  # repeated words: clipped counts
    3: ["A cat."],  # short hypothesis: brevity penalty, few n-grams
    4: ["A plate with broccoli, rice, and chicken."],
    5: ["A train on the tracks."],
    6: ["A giraffe standing next to a tree."],  # exact reference
    7: ["A man sitting on a bench."],  # unrelated
    8: ["A bowl of fruit on a wooden table."],
    9: ['A "stop" sign (red) on a pole.'],
    10: ["A kitchen with a stove and a refrigerator."],
    11: ["A man is playing tennis."],
    12: ["Zebras."],  # one word: no bigrams at all
    13: ["A toilet, a toilet and a sink in a bathroom."],
    14: ["A boy eats pizza."],
    15: ["A plane flying in the sky."],
    16: ["Sheep sheep sheep on the hill."],
    17: ["A clock tower at 3:30 in a town."],
    18: ["A woman with an umbrella."],
    19: ["A bus on a street."],
    20: ["A dog isn't sleeping on the couch."],
    21: ["A man and a woman cut a wedding cake together at the wedding."],
}


def test_tokenize_lowercases_and_strips_punctuation_like_the_coco_pipeline() -> None:
    assert metrics.tokenize("A man riding a wave, on a surfboard!") == (
        "a man riding a wave on a surfboard"
    )
    assert metrics.tokenize("The cat's toy isn't here.") == "the cat 's toy is n't here"
    assert metrics.tokenize('A "stop" sign (red) at 3:30...') == (
        "a stop sign -lrb- red -rrb- at 3:30"  # PTB brackets survive the lower-cased filter
    )
    assert metrics.tokenize("I can't see Mr. Smith's dogs' toys in the U.S.") == (
        "i ca n't see mr. smith 's dogs toys in the u.s."
    )


def test_tokenize_is_idempotent_on_the_test_captions() -> None:
    for caps in [*RAW_GTS.values(), *RAW_RES.values()]:
        for c in caps:
            once = metrics.tokenize(c)
            assert metrics.tokenize(once) == once


def _tokenized(d: dict[int, list[str]]) -> dict[int, list[str]]:
    return {k: [metrics.tokenize(c) for c in v] for k, v in d.items()}


def test_caption_metrics_equal_pycocoevalcap() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenized(RAW_GTS), _tokenized(RAW_RES)
    ref_cider, ref_cider_per = Cider().compute_score(gts, res)
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ref_rouge, ref_rouge_per = Rouge().compute_score(gts, res)

    # on pre-tokenized strings, and on the raw strings with our tokenizer
    for g, r, tok in [(gts, res, False), (RAW_GTS, RAW_RES, True)]:
        assert metrics.cider(g, r, tokenize=tok) == pytest.approx(ref_cider, abs=1e-6)
        assert metrics.bleu(g, r, tokenize=tok) == pytest.approx(ref_bleu, abs=1e-6)
        assert metrics.rouge_l(g, r, tokenize=tok) == pytest.approx(ref_rouge, abs=1e-6)
    per = metrics.cider_scores(gts, res, tokenize=False)
    assert list(per.values()) == pytest.approx(list(ref_cider_per), abs=1e-6)
    per = metrics.rouge_l_scores(gts, res, tokenize=False)
    assert list(per.values()) == pytest.approx(list(ref_rouge_per), abs=1e-6)
    assert 0.0 < ref_cider < 10.0 and 0.0 < ref_bleu[3] < ref_bleu[0] < 1.0  # a non-trivial case


def test_caption_metrics_equal_pycocoevalcap_on_small_corpora() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    # two images (idf from a tiny corpus), and a hypothesis longer than every reference
    gts = {"a": ["a cat on a mat", "the cat sat on the mat"], "b": ["a dog", "a big dog runs"]}
    res = {"a": ["a cat sat on a mat on a mat in a house"], "b": ["a dog"]}
    assert metrics.cider(gts, res, tokenize=False) == pytest.approx(
        Cider().compute_score(gts, res)[0], abs=1e-6
    )
    assert metrics.bleu(gts, res, tokenize=False) == pytest.approx(
        Bleu(4).compute_score(gts, res, verbose=0)[0], abs=1e-6
    )


def test_caption_metrics_known_values() -> None:
    # A perfect single-reference match: BLEU and ROUGE-L are 1.
    gts = {1: ["a cat on a mat"], 2: ["a dog in the park"]}
    res = {1: ["a cat on a mat"], 2: ["a dog in the park"]}
    assert metrics.bleu(gts, res) == pytest.approx([1.0] * 4, abs=1e-6)
    assert metrics.rouge_l(gts, res) == pytest.approx(1.0)
    # ROUGE-L by hand: LCS("a cat", "a cat on a mat") = 2, P = 1, R = 0.4, beta = 1.2.
    p, r, b2 = 1.0, 0.4, 1.44
    expected = (1 + b2) * p * r / (r + b2 * p)
    assert metrics.rouge_l({1: ["a cat on a mat"]}, {1: ["a cat"]}) == pytest.approx(expected)
    with pytest.raises(ValueError):
        metrics.cider({1: ["a"]}, {2: ["a"]})


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_tokenize_matches_java_ptbtokenizer_on_test_captions(tmp_path: Path) -> None:
    pytest.importorskip("pycocoevalcap")
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    extra = [
        "It's a black-and-white photo of a man who doesn't smile... really?",
        "There are 1,000 birds (roughly) at 3:30 p.m. near St. Louis' garage -- odd.",
        "I'm gonna eat 50% of the pizza's crust, e.g. this one; cannot wait!!",
        "“Curly quotes” and ‘single ones’ — dashes – too, they'll say; y'all I'd've.",
        "A $5 bill, [brackets] {braces} and a 'single quoted' phrase near Dr. No. 5's house.",
    ]
    sentences = [c for caps in [*RAW_GTS.values(), *RAW_RES.values()] for c in caps] + extra
    (tmp_path / "in.txt").write_text("\n".join(sentences))
    out = subprocess.run(
        ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
         "-lowerCase", "in.txt"],
        cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split("\n")  # fmt: skip
    for sentence, line in zip(sentences, out, strict=False):
        java = " ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS)
        assert metrics.tokenize(sentence) == java, sentence


# --- VQA -----------------------------------------------------------------------------------


def test_vqa_accuracy_leave_one_out_counts() -> None:
    others = ["three"] * 10
    # number words are normalised to digits on both sides
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["two"] * k + others[k:]
        assert metrics.vqa_accuracy("2", answers) == pytest.approx(expected, abs=1e-12), k
    # 2 of 10: 2 subsets keep 1 match (1/3), 8 keep 2 matches (2/3): (2/3 + 16/3) / 10 = 0.6
    assert metrics.vqa_accuracy("two", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)


def test_vqa_normalisation_follows_vqaeval() -> None:
    norm = metrics.normalize_vqa_answer
    assert norm("The Dog.") == "dog"
    assert norm("an apple") == "apple"
    assert norm("dont") == "don't"  # contractions map
    assert norm("yes!") == "yes"
    assert norm("2.5") == "2.5"  # a point before a digit stays
    assert norm("1,000") == "1000"  # "(digit),(digit)" text: marks are deleted, not spaced
    assert norm("black-and-white") == "black and white"  # no space next to "-": becomes a space
    assert norm("black - white") == "black white"  # a space next to "-": deleted
    assert norm("None") == "0"
    assert metrics.vqa_accuracy("Yes.", ["yes"] * 10) == 1.0


def test_vqa_accuracy_single_answer_is_exact_match() -> None:
    assert metrics.vqa_accuracy("A red car", "red car") == 1.0
    assert metrics.vqa_accuracy("red car", ["blue car"]) == 0.0
    with pytest.raises(ValueError):
        metrics.vqa_accuracy("x", [])


# --- multiple choice ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, expected",
    [("B", 1), ("(B)", 1), ("B.", 1), ("The answer is B", 1), ("The answer is (C).", 2),
     ("Answer: D", 3), ("C) bird", 2), ("I think it is C", 2), ("dog", 1), ("It is a fish.", 3),
     ("The answer is a dog", 1), ("E", None), ("cat or dog", None), ("", None)],
)  # fmt: skip
def test_multiple_choice_by_letter_parses_common_answer_forms(
    prediction: str, expected: int | None
) -> None:
    assert metrics.multiple_choice_by_letter(prediction, ["cat", "dog", "bird", "fish"]) == expected


def test_multiple_choice_by_likelihood_takes_argmax() -> None:
    assert metrics.multiple_choice_by_likelihood([-3.0, -1.5, -2.0]) == 1
    assert metrics.multiple_choice_by_likelihood([-1.0, -1.0]) == 0  # first on ties
    # per-token: -4/8 = -0.5 beats -1.5/1
    assert metrics.multiple_choice_by_likelihood([-1.5, -4.0], lengths=[1, 8]) == 1


# --- POPE -----------------------------------------------------------------------------------


def test_pope_parses_answers_like_the_pope_script() -> None:
    assert metrics.parse_yes_no("Yes, there is a dog in the image.") == "yes"
    assert metrics.parse_yes_no("No, there is no dog.") == "no"
    assert metrics.parse_yes_no("There is not a dog.") == "no"
    assert metrics.parse_yes_no("Yes. But no cat.") == "yes"  # only the first sentence counts
    assert metrics.parse_yes_no("Nothing suggests a dog") == "yes"  # "no" must be a word


def test_pope_figures_on_a_known_confusion_matrix() -> None:
    # TP=3, FN=1, FP=2, TN=4 -> acc 0.7, P 0.6, R 0.75, F1 2/3, yes-ratio 0.5
    preds = ["Yes"] * 3 + ["No"] + ["Yes, it is."] * 2 + ["No."] * 4
    labels = ["yes"] * 4 + ["no"] * 6
    out = metrics.pope(preds, labels)
    assert (out["tp"], out["fn"], out["fp"], out["tn"]) == (3, 1, 2, 4)
    assert out["accuracy"] == pytest.approx(0.7)
    assert out["precision"] == pytest.approx(0.6)
    assert out["recall"] == pytest.approx(0.75)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(0.5)


def test_pope_reports_each_split() -> None:
    preds = ["yes", "no", "yes", "yes"]
    labels = [True, False, False, True]
    out = metrics.pope(preds, labels, splits=["random", "random", "adversarial", "adversarial"])
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["splits"]["random"]["accuracy"] == 1.0
    assert out["splits"]["adversarial"]["accuracy"] == 0.5
    assert out["splits"]["adversarial"]["precision"] == 0.5
    assert "splits" not in metrics.pope(preds, labels)


# --- CHAIR ----------------------------------------------------------------------------------


def test_chair_counts_mentions_through_synonyms_and_plurals() -> None:
    captions = [
        "Two puppies and a man play frisbee on the grass.",  # dog (puppies), person, frisbee
        "A hot dog next to a cup of coffee.",  # "hot dog" is not a dog
        "A baby elephant with some knives.",  # "baby" only modifies; knives -> knife
        "An empty street.",
    ]
    present = [{"dog", "person"}, {"hot dog", "cup"}, {"elephant"}, set()]
    out = metrics.chair(captions, present)
    assert [c["mentioned"] for c in out["per_caption"]] == [
        ["dog", "person", "frisbee"], ["hot dog", "cup"], ["elephant", "knife"], [],
    ]  # fmt: skip
    assert [c["hallucinated"] for c in out["per_caption"]] == [["frisbee"], [], ["knife"], []]
    assert out["chair_i"] == pytest.approx(2 / 7)
    assert out["chair_s"] == pytest.approx(2 / 4)
    assert out["recall"] == pytest.approx(1.0)


def test_chair_with_a_custom_vocabulary() -> None:
    vocab = {"red circle": ["red disc", "red ball"], "blue square": ["blue box"]}
    captions = ["Two red discs and a blue box.", "A blue square and a green triangle."]
    out = metrics.chair(captions, [{"red circle"}, {"red circle"}], vocabulary=vocab)
    assert out["mentions"] == 3 and out["hallucinated_mentions"] == 2
    assert out["chair_i"] == pytest.approx(2 / 3)
    assert out["chair_s"] == pytest.approx(1.0)
    assert out["recall"] == pytest.approx(0.5)


def test_pluralize_common_object_names() -> None:
    assert [metrics.pluralize(w) for w in ["bus", "knife", "glass", "person", "pony", "toy"]] == [
        "buses", "knives", "glasses", "people", "ponies", "toys",
    ]  # fmt: skip
