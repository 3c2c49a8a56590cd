"""``digits`` and ``digits-video``: synthetic scenes of real handwritten digits with ground-truth evidence.

Scenes look to a token dropper the way photos do: a few objects (scikit-learn's scanned 8×8
digits, upscaled and tinted) on a large, mildly textured background, so most vision tokens are
redundant and a few hold the answer. Every question records which vision tokens cover the
objects its answer depends on. Train, validation and test scenes use disjoint digit images and
are generated deterministically from a seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from v2drop.benchmarks.base import Benchmark, Sample, register_benchmark

IMAGE_SIZE = 64  # pixels
GRID = 4  # cells per side
CELL = IMAGE_SIZE // GRID  # 16 px
PATCH = 4  # vision patch size of the proxy: 16 x 16 = 256 tokens per image
PATCHES = IMAGE_SIZE // PATCH
DIGIT_PX = 14
COLOURS = {"white": (1.0, 1.0, 1.0), "red": (1.0, 0.25, 0.2), "green": (0.25, 1.0, 0.3), "blue": (0.3, 0.45, 1.0)}
ROW_WORDS = ("top", "upper", "lower", "bottom")
COL_WORDS = ("leftmost", "left", "right", "rightmost")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
LETTERS = ("A", "B", "C", "D")
SPLIT_SHARES = {"train": (0.0, 0.67), "validation": (0.67, 0.83), "test": (0.83, 1.0)}
SPLIT_SCENES = {"train": 2000, "validation": 120, "test": 120}
IMAGE_FAMILIES = ("exist", "ident", "count", "mc", "colour")
VIDEO_FAMILIES = ("frame", "first", "frames")
FRAMES = 8


@lru_cache(maxsize=1)
def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 scanned digits (8×8, 0–16) and labels, in a fixed shuffled order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(1234).permutation(len(data.target))
    return data.images[order] / 16.0, data.target[order]


def split_indices(split: str) -> np.ndarray:
    """Indices of the digit images a split may use; the three splits are disjoint."""
    if split not in SPLIT_SHARES:
        raise ValueError(f"Unknown split {split!r}; digits has splits {list(SPLIT_SHARES)}")
    n = len(_digit_images()[1])
    lo, hi = SPLIT_SHARES[split]
    return np.arange(int(lo * n), int(hi * n))


@dataclass
class Object:
    """A digit placed in a scene."""

    label: int
    colour: str
    row: int
    col: int
    mask: np.ndarray  # (IMAGE_SIZE, IMAGE_SIZE) bool: pixels of the digit

    def evidence(self, offset: int = 0) -> list[int]:
        """Vision-token indices (raster over the patch grid) whose patch holds digit pixels."""
        patches = self.mask.reshape(PATCHES, PATCH, PATCHES, PATCH).any(axis=(1, 3))
        return [offset + int(i) for i in np.flatnonzero(patches)]


def _background(rng: np.random.Generator) -> np.ndarray:
    """A dark, low-frequency colour texture with pixel noise (so empty tokens are not all equal)."""
    coarse = rng.uniform(0.0, 0.22, size=(5, 5, 3))
    img = (
        np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
        / 255.0
    )
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)


def render_scene(rng: np.random.Generator, pool: np.ndarray, n_objects: int) -> tuple[Image.Image, list[Object]]:
    """A scene with ``n_objects`` digits of distinct labels in distinct cells, drawn from ``pool``."""
    images, labels = _digit_images()
    canvas = _background(rng)
    cells = rng.choice(GRID * GRID, size=n_objects, replace=False)
    used: set[int] = set()
    objects = []
    for cell in cells:
        while True:
            idx = int(rng.choice(pool))
            if int(labels[idx]) not in used:
                break
        used.add(int(labels[idx]))
        glyph = (
            np.asarray(
                Image.fromarray((images[idx] * 255).astype(np.uint8)).resize((DIGIT_PX, DIGIT_PX), Image.BILINEAR)
            )
            / 255.0
        )
        colour = str(rng.choice(list(COLOURS))) if rng.random() < 0.6 else "white"
        row, col = divmod(int(cell), GRID)
        y = row * CELL + int(rng.integers(0, CELL - DIGIT_PX + 1))
        x = col * CELL + int(rng.integers(0, CELL - DIGIT_PX + 1))
        alpha = glyph[..., None]
        region = canvas[y : y + DIGIT_PX, x : x + DIGIT_PX]
        canvas[y : y + DIGIT_PX, x : x + DIGIT_PX] = region * (1 - alpha) + alpha * np.array(COLOURS[colour])
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        mask[y : y + DIGIT_PX, x : x + DIGIT_PX] = glyph > 0.25
        objects.append(Object(int(labels[idx]), colour, row, col, mask))
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8)), objects


def cell_evidence(row: int, col: int, offset: int = 0) -> list[int]:
    """The 16 vision tokens of a grid cell."""
    per = CELL // PATCH
    return [offset + (row * per + r) * PATCHES + col * per + c for r in range(per) for c in range(per)]


def ident_question(row: int, col: int) -> str:
    """The ``ident`` question about grid cell (``row``, ``col``): "What digit is in the lower row, left column?"."""
    return f"What digit is in the {ROW_WORDS[row]} row, {COL_WORDS[col]} column?"


def asked_cell(question: str) -> tuple[int, int]:
    """(row, column) of the grid cell an ``ident_question`` names."""
    where = question.split(" in the ", 1)[1]
    return ROW_WORDS.index(where.split(" row")[0]), COL_WORDS.index(where.split("row, ")[1].split(" column")[0])


def image_questions(
    rng: random.Random, objects: list[Object], visible: set[int] | None = None
) -> list[tuple[str, str, str, list[int], tuple]]:
    """One question of every image family: (family, question, answer, evidence, choices).

    ``visible`` (labels; None = every object) is for the proxy's training drops: questions are
    drawn from the whole scene, answers given as if only the visible objects were there
    (``yes``/``no``, the digit or ``none``, the visible count, a visible option — half of the time
    beside every dropped digit — the colour or ``none``). With None the questions and the RNG's
    use are the benchmark's own.
    """
    present = {o.label: o for o in objects}
    seen = set(present) if visible is None else set(visible)
    shown = [o for o in objects if o.label in seen]
    all_evidence = sorted({i for o in objects for i in o.evidence()})
    out = []
    # existence, balanced: half the time ask about a digit that is absent
    if rng.random() < 0.5:
        o = rng.choice(objects)
        out.append(
            ("exist", f"Is there a {o.label} in the image?", "yes" if o.label in seen else "no", o.evidence(), ())
        )
    else:
        d = rng.choice([d for d in range(10) if d not in present])
        out.append(("exist", f"Is there a {d} in the image?", "no", all_evidence, ()))
    # identification at a location (an empty cell a quarter of the time)
    if rng.random() < 0.75:
        o = rng.choice(objects)
        row, col, answer, ev = o.row, o.col, str(o.label) if o.label in seen else "none", o.evidence()
    else:
        taken = {(o.row, o.col) for o in objects}
        row, col = rng.choice([(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken])
        answer, ev = "none", cell_evidence(row, col)
    out.append(("ident", ident_question(row, col), answer, ev, ()))
    # counting
    out.append(("count", "How many digits are in the image?", str(len(shown)), all_evidence, ()))
    # multiple choice: exactly one option is in the image
    o = rng.choice(shown)
    dropped = [d for d in present if d not in seen]
    if dropped and rng.random() < 0.5:  # the dropped digits among the options: only the visible one is right
        distractors = rng.sample(dropped, min(3, len(dropped)))
        distractors += rng.sample([d for d in range(10) if d not in present], 3 - len(distractors))
    else:
        distractors = rng.sample([d for d in range(10) if d not in seen], 3)
    options = [o.label] + distractors
    rng.shuffle(options)
    letter = LETTERS[options.index(o.label)]
    text = " ".join(f"{l}. {d}" for l, d in zip(LETTERS, options))
    out.append(
        (
            "mc",
            f"Which digit is in the image? {text} Answer with the option's letter.",
            letter,
            o.evidence(),
            tuple(map(str, options)),
        )
    )
    # colour of a given digit
    o = rng.choice(objects)
    out.append(("colour", f"What colour is the {o.label}?", o.colour if o.label in seen else "none", o.evidence(), ()))
    return out


class _DigitsBase(Benchmark):
    """Scenes generated from ``seed``: ``scenes`` per split (default ``SPLIT_SCENES``), each giving a few questions.

    Splits: ``train``, ``validation`` and ``test`` (default), built from disjoint digit images.
    """

    splits = tuple(SPLIT_SHARES)
    default_split = "test"

    def __init__(self, seed: int = 0, scenes: int | None = None):
        self.seed = seed
        self.scenes = scenes

    def _n_scenes(self, split: str) -> int:
        return self.scenes or SPLIT_SCENES[split]

    def load_split(self, split: str, limit: int | None) -> list[Sample]:
        """Samples of ``split``, families interleaved scene by scene (so a prefix is balanced)."""
        out: list[Sample] = []
        for scene in range(self._n_scenes(split)):
            out.extend(self.scene_samples(split, scene))
            if limit is not None and len(out) >= limit:
                return out[:limit]
        return out

    def scene_samples(self, split: str, scene: int) -> list[Sample]:
        """The samples of scene (or clip) ``scene`` of ``split``."""
        raise NotImplementedError


def _scene_rng(seed: int, split: str, scene: int, salt: str) -> tuple[np.random.Generator, random.Random]:
    key = f"{salt}:{seed}:{split}:{scene}"
    s = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(s), random.Random(s)


@register_benchmark("digits")
class Digits(_DigitsBase):
    """Image questions about 1–4 digits on a 64×64 scene (POPE-, GQA-, MME-, MMBench-like and colour)."""

    modality = "image"
    families = IMAGE_FAMILIES

    def scene(self, split: str, scene: int) -> tuple[Image.Image, list[Object], random.Random]:
        """The image and objects of scene ``scene`` of ``split``, and the question generator's RNG."""
        nrng, qrng = _scene_rng(self.seed, split, scene, "digits")
        image, objects = render_scene(nrng, split_indices(split), int(nrng.integers(1, 5)))
        return image, objects, qrng

    def scene_samples(self, split: str, scene: int) -> list[Sample]:
        """One question of every image family about scene ``scene``."""
        image, objects, qrng = self.scene(split, scene)
        return [
            Sample(f"{split}-{scene}-{fam}", q, a, fam, (image,), tuple(ev), choices)
            for fam, q, a, ev, choices in image_questions(qrng, objects)
        ]


def video_questions(
    rng: random.Random, contents: list[list[Object]], visible: set[int] | None = None
) -> list[tuple[str, str, str, list[int]]]:
    """The video questions of a clip: (family, question, answer, evidence); ``contents[f]`` = frame f's objects (0 or
    1).

    ``visible`` (frame indices; None = every frame) is for the proxy's training drops: a frame
    whose digit lost every token counts as empty. With None the questions and the RNG's use are
    the benchmark's own.
    """
    per = PATCHES * PATCHES
    with_digit = [f for f in range(len(contents)) if contents[f]]
    seen = [f for f in with_digit if visible is None or f in visible]
    all_ev = [i for f in with_digit for i in contents[f][0].evidence(f * per)]
    out = []
    f = rng.randrange(len(contents))
    answer = str(contents[f][0].label) if f in seen else "none"
    ev = contents[f][0].evidence(f * per) if contents[f] else list(range(f * per, (f + 1) * per))
    out.append(("frame", f"What digit is shown in frame {NUMBER_WORDS[f + 1]}?", answer, ev))
    if with_digit:
        labels = [contents[f][0].label for f in with_digit]
        d = rng.choice(labels)
        first = next((f for f in seen if contents[f][0].label == d), None)
        out.append(
            (
                "first",
                f"In which frame does the {d} first appear?",
                "none" if first is None else NUMBER_WORDS[first + 1],
                [i for f in with_digit if contents[f][0].label == d for i in contents[f][0].evidence(f * per)],
            )
        )
    out.append(("frames", "How many frames contain a digit?", str(len(seen)), all_ev))
    return out


@register_benchmark("digits-video")
class DigitsVideo(_DigitsBase):
    """Video questions over 8 frames (2,048 vision tokens): a frame's digit, first appearance, frames with a digit."""

    modality = "video"
    families = VIDEO_FAMILIES

    def clip(
        self, split: str, scene: int, frames: int = FRAMES
    ) -> tuple[list[Image.Image], list[list[Object]], random.Random]:
        """The ``frames`` frames of clip ``scene`` of ``split`` (each with one digit half of the time), their objects,
        and the question RNG.
        """
        nrng, qrng = _scene_rng(self.seed, split, scene, "video")
        pool = split_indices(split)
        images, contents = [], []
        for _ in range(frames):
            image, objects = render_scene(nrng, pool, 1 if nrng.random() < 0.5 else 0)
            images.append(image)
            contents.append(objects)
        return images, contents, qrng

    def scene_samples(self, split: str, scene: int) -> list[Sample]:
        """The video questions about clip ``scene``."""
        frames, contents, qrng = self.clip(split, scene)
        images = tuple(frames)
        return [
            Sample(f"{split}-{scene}-{fam}", q, a, fam, images, tuple(e))
            for fam, q, a, e in video_questions(qrng, contents)
        ]


def vocabulary() -> list[str]:
    """Every word the digits questions and answers use (for the proxy's tokenizer)."""
    words = set()
    for bench in (Digits(), DigitsVideo()):
        for s in bench.load("validation", 60):
            words.update(s.question.replace("?", " ? ").replace(",", " , ").replace(".", " . ").split())
            words.add(s.answer)
    words.update(str(d) for d in range(10))
    words.update(["yes", "no", "none", *COLOURS, *LETTERS, *ROW_WORDS, *COL_WORDS, *NUMBER_WORDS, "'s"])
    return sorted(words)
