"""Object-hallucination metrics: POPE (yes/no probing) and CHAIR (objects mentioned in captions)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """POPE's answer parsing (its evaluate.py, also LLaVA's eval_pope.py): keep the first
    sentence, drop commas, and read "no" if the words include "no", "No" or "not", else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _label_is_yes(label: str | bool | int) -> bool:
    if isinstance(label, str):
        return label.strip().lower() != "no"  # POPE: anything but "no" is a positive label
    return bool(label)


def _binary_figures(pred_yes: Sequence[bool], label_yes: Sequence[bool]) -> dict[str, float]:
    tp = sum(p and y for p, y in zip(pred_yes, label_yes, strict=True))
    fp = sum(p and not y for p, y in zip(pred_yes, label_yes, strict=True))
    tn = sum(not p and not y for p, y in zip(pred_yes, label_yes, strict=True))
    fn = sum(not p and y for p, y in zip(pred_yes, label_yes, strict=True))
    n = len(pred_yes)
    # POPE's script divides by zero on degenerate sets; 0.0 is reported instead.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
    }  # fmt: skip


def pope(
    predictions: Sequence[str],
    labels: Sequence[str | bool | int],
    splits: Sequence[str] | None = None,
) -> dict:
    """POPE figures (accuracy, precision, recall, f1, yes_ratio, and the confusion counts) over all
    questions; with `splits` (each question's split name: random/popular/adversarial), also
    `result["splits"][name]` with the same figures per split."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    pred_yes = [parse_yes_no(p) == "yes" for p in predictions]
    label_yes = [_label_is_yes(y) for y in labels]
    result: dict = _binary_figures(pred_yes, label_yes)
    if splits is not None:
        if len(splits) != len(predictions):
            raise ValueError("splits and predictions differ in length")
        result["splits"] = {}
        for name in dict.fromkeys(splits):  # first-seen order
            idx = [i for i, s in enumerate(splits) if s == name]
            result["splits"][name] = _binary_figures(
                [pred_yes[i] for i in idx], [label_yes[i] for i in idx]
            )
    return result


# ---------------------------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------------------------

# COCO's 80 categories with synonyms, after CHAIR's synonyms.txt (Rohrbach et al., 2018), minus
# a few words too ambiguous in captions (e.g. "bow", "sub", "meter", "container").
COCO_SYNONYMS: dict[str, list[str]] = {
    "person": "girl boy man woman kid child chef baker people adult rider baby worker passenger "
    "sister brother biker policeman cop officer lady cowboy bride groom male female guy traveler "
    "mother father gentleman pitcher player skier snowboarder skater skateboarder surfer "
    "teenager student driver soldier doctor bicyclist cyclist catcher batter umpire "
    "toddler infant pedestrian tourist spectator athlete".split(),
    "bicycle": "bike unicycle minibike trike".split(),
    "car": "automobile van minivan sedan suv hatchback cab jeep coupe taxicab limo taxi".split(),
    "motorcycle": ["scooter", "motor bike", "motor cycle", "motorbike", "moped"],
    "airplane": "jetliner plane monoplane aircraft jet airbus biplane seaplane airliner".split()
    + ["air plane"],
    "bus": ["minibus", "trolley", "double decker"],
    "train": "locomotive tramway caboose tram".split(),
    "truck": "pickup lorry hauler firetruck".split(),
    "boat": "ship sailboat motorboat dinghy powerboat speedboat canoe skiff yacht kayak catamaran "
    "pontoon houseboat vessel rowboat trawler ferryboat watercraft tugboat schooner barge ferry "
    "paddleboat lifeboat freighter steamboat riverboat battleship steamship".split(),
    "traffic light": ["street light", "traffic signal", "stop light", "streetlight", "stoplight"],
    "fire hydrant": ["hydrant"],
    "stop sign": [],
    "parking meter": [],
    "bench": ["pew"],
    "bird": "ostrich owl seagull goose duck parakeet falcon robin pelican waterfowl heron "
    "hummingbird mallard finch pigeon sparrow seabird osprey blackbird fowl shorebird woodpecker "
    "egret chickadee quail bluebird kingfisher buzzard gull swan bluejay flamingo cormorant parrot "
    "loon gosling waterbird pheasant rooster sandpiper crow raven oriole warbler magpie "
    "peacock cockatiel lorikeet puffin vulture condor macaw peafowl cockatoo songbird".split(),
    "cat": "kitten feline tabby kitty".split(),
    "dog": "puppy beagle pup chihuahua schnauzer dachshund rottweiler canine pitbull collie pug "
    "terrier poodle labrador doggie doberman mutt doggy spaniel bulldog sheepdog weimaraner corgi "
    "greyhound retriever hound whippet husky".split(),
    "horse": "colt pony racehorse stallion equine mare foal palomino mustang bronco".split()
    + ["clydesdale"],
    "sheep": "lamb ram goat ewe".split(),
    "cow": "cattle oxen ox calf holstein heifer buffalo bull zebu bison".split(),
    "elephant": [],
    "bear": ["grizzly"],
    "zebra": [],
    "giraffe": [],
    "backpack": ["knapsack"],
    "umbrella": ["parasol"],
    "handbag": "wallet purse briefcase".split(),
    "tie": ["necktie", "bow tie"],
    "suitcase": ["suit case", "luggage"],
    "frisbee": [],
    "skis": ["ski"],
    "snowboard": [],
    "sports ball": ["ball", "soccer ball", "football", "basketball", "baseball", "tennis ball"],
    "kite": [],
    "baseball bat": ["bat"],
    "baseball glove": ["glove", "mitt"],
    "skateboard": [],
    "surfboard": "longboard skimboard shortboard wakeboard".split() + ["surf board"],
    "tennis racket": ["racket", "racquet", "tennis racquet"],
    "bottle": [],
    "wine glass": [],
    "cup": ["mug"],
    "fork": [],
    "knife": ["pocketknife"],
    "spoon": [],
    "bowl": [],
    "banana": [],
    "apple": [],
    "sandwich": "burger cheeseburger hamburger".split(),
    "orange": [],
    "broccoli": [],
    "carrot": [],
    "hot dog": [],
    "pizza": [],
    "donut": ["doughnut", "bagel"],
    "cake": "cheesecake cupcake shortcake coffeecake pancake".split(),
    "chair": ["stool"],
    "couch": "sofa recliner futon loveseat settee".split(),
    "potted plant": ["houseplant", "house plant", "plant pot"],
    "bed": [],
    "dining table": ["table", "desk"],
    "toilet": "urinal commode lavatory potty".split() + ["toilet seat"],
    "tv": ["monitor", "television", "tv screen"],
    "laptop": ["computer", "netbook", "macbook", "laptop computer"],
    "mouse": [],
    "remote": ["remote control", "controller"],
    "keyboard": [],
    "cell phone": ["mobile phone", "phone", "cellphone", "telephone", "smartphone", "iphone"],
    "microwave": [],
    "oven": ["stovetop", "stove", "stove top oven"],
    "toaster": [],
    "sink": [],
    "refrigerator": ["fridge", "freezer"],
    "book": ["novel", "textbook"],
    "clock": [],
    "vase": [],
    "scissors": [],
    "teddy bear": ["teddybear"],
    "hair drier": "hairdryer blowdryer blowdrier".split()
    + ["hair dryer", "blow dryer", "blow drier"],
    "toothbrush": ["tooth brush"],
}

# A word mentioning an object that only modifies the next one ("baby elephant" is an elephant).
_MODIFIERS = frozenset({"baby", "adult"})
_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
    "goose": "geese", "ox": "oxen", "knife": "knives", "calf": "calves", "sheep": "sheep",
    "policeman": "policemen", "gentleman": "gentlemen", "bison": "bison", "buffalo": "buffaloes",
    "skis": "skis", "scissors": "scissors", "foot": "feet", "tooth": "teeth", "people": "people",
    "cattle": "cattle", "oxen": "oxen", "luggage": "luggage", "broccoli": "broccoli",
}  # fmt: skip


def pluralize(word: str) -> str:
    """English plural of a (last) noun, enough for object names."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def build_vocabulary(synonyms: Mapping[str, Iterable[str]]) -> dict[tuple[str, ...], str]:
    """Phrase (a word tuple) -> canonical name, covering each name, its synonyms and their
    plurals (the last word pluralised: "hot dogs", "wine glasses")."""
    phrases: dict[tuple[str, ...], str] = {}
    for canonical, syns in synonyms.items():
        for surface in [canonical, *syns]:
            words = tuple(_words(surface))
            if not words:
                continue
            phrases.setdefault(words, canonical)
            phrases.setdefault((*words[:-1], pluralize(words[-1])), canonical)
    return phrases


def mentioned_objects(caption: str, vocabulary: Mapping[tuple[str, ...], str]) -> list[str]:
    """Canonical names of the objects a caption mentions, once per mention, in order; the
    longest phrase wins ("hot dog" is a hot dog, not a dog)."""
    words = _words(caption)
    longest = max((len(p) for p in vocabulary), default=0)
    found: list[tuple[int, int, str]] = []  # (start, end, canonical)
    i = 0
    while i < len(words):
        for size in range(min(longest, len(words) - i), 0, -1):
            name = vocabulary.get(tuple(words[i : i + size]))
            if name is not None:
                prev = found[-1] if found else None
                if (
                    prev
                    and prev[1] == i
                    and prev[1] - prev[0] == 1
                    and words[prev[0]] in _MODIFIERS
                ):
                    found.pop()  # "baby elephant": the modifier is not a person
                found.append((i, i + size, name))
                i += size
                break
        else:
            i += 1
    return [name for _, _, name in found]


def chair(
    captions: Sequence[str],
    objects_present: Sequence[Iterable[str]],
    vocabulary: Mapping[str, Iterable[str]] | None = None,
) -> dict:
    """CHAIR_i (hallucinated object mentions / all object mentions) and CHAIR_s (captions with a
    hallucinated object / all captions), plus recall (present objects mentioned / present
    objects in the vocabulary) and per-caption detail.

    `objects_present[i]` holds the canonical names of the objects in image i; `vocabulary` maps
    each canonical name to its synonyms (plurals are added), by default COCO's 80 categories.
    """
    if len(captions) != len(objects_present):
        raise ValueError("captions and objects_present differ in length")
    phrases = build_vocabulary(COCO_SYNONYMS if vocabulary is None else vocabulary)
    canonical = set(phrases.values())
    mentions = hallucinated = bad_captions = covered = present_total = 0
    per_caption = []
    for caption, present in zip(captions, objects_present, strict=True):
        present = set(present)
        names = mentioned_objects(caption, phrases)
        wrong = [n for n in names if n not in present]
        mentions += len(names)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        in_vocab = present & canonical
        covered += len(in_vocab & set(names))
        present_total += len(in_vocab)
        per_caption.append({"mentioned": names, "hallucinated": wrong})
    n = len(captions)
    return {
        "chair_i": hallucinated / mentions if mentions else 0.0,
        "chair_s": bad_captions / n if n else 0.0,
        "recall": covered / present_total if present_total else 0.0,
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "captions": n,
        "hallucinated_captions": bad_captions,
        "per_caption": per_caption,
    }
