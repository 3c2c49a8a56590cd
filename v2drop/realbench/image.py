"""Image benchmarks in their lmms-eval schemas: POPE, MME, GQA, MMBench, ScienceQA-IMG, TextVQA."""

from __future__ import annotations

import math
import re
from itertools import combinations

from v2drop.benchmarks import Sample, normalize_answer, register_benchmark
from v2drop.realbench.common import (
    OPTION_ANSWER,
    SHORT_ANSWER,
    HFBenchmark,
    normalize_vqa,
    options_text,
    parse_option,
    per_family_accuracy,
)


def yes_no_pope(text: str) -> str:
    """POPE's parse: an answer containing the word "no" or "not" is no, anything else yes."""
    words = re.findall(r"[a-z']+", text.lower())
    return "no" if "no" in words or "not" in words else "yes"


@register_benchmark("pope")
class POPE(HFBenchmark):
    """POPE (``lmms-lab/POPE``, test): question_id, question, answer (yes/no), image, category (adversarial/popular/random).

    Metrics per category and overall: accuracy, precision, recall, F1 (positive = yes), yes ratio.
    """

    hf_name = "lmms-lab/POPE"
    families = ("adversarial", "popular", "random")

    def to_samples(self, row, index):
        """One yes/no question."""
        return [Sample(f"{row['category']}-{row['question_id']}", row["question"] + SHORT_ANSWER, row["answer"].strip().lower(),
                       row["category"], (self.image(row["image"]),))]

    def is_correct(self, prediction, sample):
        """The parsed yes/no equals the answer."""
        return yes_no_pope(prediction) == sample.answer

    def aggregate(self, records):
        """Accuracy, precision, recall, F1 and yes ratio per category and overall."""
        def scores(rs):
            pred = [yes_no_pope(r["prediction"]) == "yes" for r in rs]
            gold = [r["reference"] == "yes" for r in rs]
            tp = sum(p and g for p, g in zip(pred, gold))
            fp = sum(p and not g for p, g in zip(pred, gold))
            fn = sum(g and not p for p, g in zip(pred, gold))
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / len(rs), "precision": precision, "recall": recall,
                    "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0, "yes_ratio": sum(pred) / len(rs)}

        out = scores(records)
        out["per_family"] = per_family_accuracy(records)
        out["per_split"] = {c: scores([r for r in records if r["family"] == c]) for c in sorted({r["family"] for r in records})}
        out["n"] = len(records)
        return out


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def yes_no_mme(text: str) -> str:
    """MME's parse: the answer's first word if it is yes or no, else "other"."""
    word = normalize_answer(text)
    return word if word in ("yes", "no") else "other"


@register_benchmark("mme")
class MME(HFBenchmark):
    """MME (``lmms-lab/MME``, test): question_id (the image file), question (ends "Please answer yes or no."), answer, category, image.

    Score per subtask = (acc + acc+) × 100, acc+ counting an image right only when both of its
    questions are; perception and cognition are the sums over their subtasks.
    """

    hf_name = "lmms-lab/MME"
    families = MME_PERCEPTION + MME_COGNITION

    def to_samples(self, row, index):
        """One yes/no question; the image is remembered for acc+."""
        sid = f"{row['category']}-{index}"
        self.by_id[sid] = {"image": row["question_id"]}
        return [Sample(sid, row["question"], row["answer"].strip().lower(), row["category"], (self.image(row["image"]),))]

    def is_correct(self, prediction, sample):
        """The parsed yes/no equals the answer."""
        return yes_no_mme(prediction) == sample.answer

    def aggregate(self, records):
        """Per subtask acc, acc+ and score; perception and cognition totals."""
        subtasks = {}
        for cat in sorted({r["family"] for r in records}):
            rs = [r for r in records if r["family"] == cat]
            images: dict[str, list[bool]] = {}
            for r in rs:
                images.setdefault(self.by_id.get(r["id"], {}).get("image", r["id"]), []).append(bool(r["correct"]))
            acc = sum(bool(r["correct"]) for r in rs) / len(rs)
            acc_plus = sum(all(v) for v in images.values()) / len(images)
            subtasks[cat] = {"acc": acc, "acc_plus": acc_plus, "score": (acc + acc_plus) * 100}
        return {
            "perception": sum(v["score"] for k, v in subtasks.items() if k in MME_PERCEPTION),
            "cognition": sum(v["score"] for k, v in subtasks.items() if k in MME_COGNITION),
            "subtasks": subtasks,
            "accuracy": sum(bool(r["correct"]) for r in records) / len(records),
            "per_family": per_family_accuracy(records),
            "n": len(records),
        }


@register_benchmark("gqa")
class GQA(HFBenchmark):
    """GQA (``lmms-lab/GQA``, testdev_balanced): id, question, answer, imageId, image; exact match after VQA normalisation.

    The Hugging Face copy keeps images in a separate configuration; a local copy puts the image
    path (or base64) in an ``image`` column.
    """

    hf_name = "lmms-lab/GQA"
    hf_config = "testdev_balanced_instructions"
    hf_split = "testdev"
    families = ("gqa",)

    def rows(self, split):
        """Question rows; from the hub, joined with the images configuration on ``imageId``."""
        rows = super().rows(split)
        if self.data_dir is None:
            import datasets

            images = {r["id"]: r["image"] for r in datasets.load_dataset(self.hf_name, "testdev_balanced_images", split=self.hf_split)}
            rows = [{**r, "image": images[r["imageId"]]} for r in rows]
        return rows

    def to_samples(self, row, index):
        """One short-answer question."""
        return [Sample(str(row["id"]), row["question"] + SHORT_ANSWER, row["answer"], "gqa", (self.image(row["image"]),))]

    def is_correct(self, prediction, sample):
        """Exact match after the standard normalisation."""
        return normalize_vqa(prediction) == normalize_vqa(sample.answer)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value).strip() not in ("", "nan")


@register_benchmark("mmbench")
class MMBench(HFBenchmark):
    """MMBench (``lmms-lab/MMBench``, en dev): index, question, hint, A–D, answer (letter), category, image.

    ``circular=True`` asks every question once per rotation of its options; a question counts as
    right only if every rotation is (MMBench's CircularEval).
    """

    hf_name = "lmms-lab/MMBench"
    hf_config = "en"
    hf_split = "dev"

    def __init__(self, data_dir: str | None = None, circular: bool = False):
        super().__init__(data_dir)
        self.circular = circular

    def to_samples(self, row, index):
        """One sample, or one per rotation of the options."""
        letters = [c for c in "ABCD" if _present(row.get(c))]
        options = [str(row[c]) for c in letters]
        answer = letters.index(row["answer"])
        hint = f"{row['hint']}\n" if _present(row.get("hint")) else ""
        image = self.image(row["image"])
        out = []
        for shift in range(len(options) if self.circular else 1):
            rotated = options[shift:] + options[:shift]
            gold = "ABCD"[(answer - shift) % len(options)]
            sid = f"{row['index']}@{shift}"
            self.by_id[sid] = {"question": str(row["index"])}
            out.append(Sample(sid, hint + row["question"] + "\n" + options_text(rotated) + OPTION_ANSWER, gold,
                              str(row.get("category", "mmbench")), (image,), choices=tuple(rotated)))
        return out

    def is_correct(self, prediction, sample):
        """The parsed option letter is the answer."""
        return parse_option(prediction, "ABCD"[: len(sample.choices)]) == sample.answer

    def aggregate(self, records):
        """Accuracy per question (all rotations right when circular) overall and per category."""
        questions: dict[str, list[dict]] = {}
        for r in records:
            questions.setdefault(self.by_id.get(r["id"], {}).get("question", r["id"].split("@")[0]), []).append(r)
        per_q = [{"family": rs[0]["family"], "correct": all(bool(r["correct"]) for r in rs)} for rs in questions.values()]
        return {"accuracy": sum(q["correct"] for q in per_q) / len(per_q), "per_family": per_family_accuracy(per_q),
                "circular": self.circular, "n": len(per_q)}


@register_benchmark("scienceqa-img")
class ScienceQAImg(HFBenchmark):
    """ScienceQA-IMG (``lmms-lab/ScienceQA``, ScienceQA-IMG test): question, choices, answer (index), hint, image, subject."""

    hf_name = "lmms-lab/ScienceQA"
    hf_config = "ScienceQA-IMG"

    def to_samples(self, row, index):
        """One multiple-choice question with its context."""
        choices = list(row["choices"])
        hint = f"Context: {row['hint']}\n" if _present(row.get("hint")) else ""
        return [Sample(f"sqa-{index}", hint + row["question"] + "\n" + options_text(choices) + OPTION_ANSWER,
                       "ABCDE"[int(row["answer"])], str(row.get("subject", "scienceqa")), (self.image(row["image"]),),
                       choices=tuple(choices))]

    def is_correct(self, prediction, sample):
        """The parsed option letter is the answer."""
        return parse_option(prediction, "ABCDE"[: len(sample.choices)]) == sample.answer


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy: the mean over the ten leave-one-out subsets of min(1, matches / 3)."""
    pred = normalize_vqa(prediction)
    gold = [normalize_vqa(a) for a in answers]
    subsets = list(combinations(range(len(gold)), len(gold) - 1)) or [()]
    return sum(min(1.0, sum(gold[i] == pred for i in s) / 3) for s in subsets) / len(subsets)


@register_benchmark("textvqa")
class TextVQA(HFBenchmark):
    """TextVQA (``lmms-lab/textvqa``, validation): question_id, question, answers (ten), image; VQA accuracy."""

    hf_name = "lmms-lab/textvqa"
    hf_split = "validation"
    families = ("textvqa",)

    def to_samples(self, row, index):
        """One open question; the ten answers are kept for the soft accuracy."""
        sid = str(row["question_id"])
        answers = [str(a) for a in row["answers"]]
        self.by_id[sid] = {"answers": answers}
        return [Sample(sid, row["question"] + SHORT_ANSWER, max(set(answers), key=answers.count), "textvqa", (self.image(row["image"]),))]

    def is_correct(self, prediction, sample):
        """Full credit (three or more annotators agree on the normalised answer)."""
        return vqa_accuracy(prediction, self.by_id[sample.id]["answers"]) >= 1.0

    def aggregate(self, records):
        """Mean VQA accuracy (soft), plus the share with full credit."""
        soft = [vqa_accuracy(r["prediction"], self.by_id[r["id"]]["answers"]) for r in records]
        return {"vqa_accuracy": sum(soft) / len(soft), "accuracy": sum(soft) / len(soft),
                "full_credit": sum(bool(r["correct"]) for r in records) / len(records),
                "per_family": {"textvqa": sum(soft) / len(soft)}, "n": len(records)}
