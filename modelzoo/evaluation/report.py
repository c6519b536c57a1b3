"""results.json (every figure) and results.md (the table a README quotes) of one harness run."""

from __future__ import annotations

import json
import math

from modelzoo.evaluation.ngram import SMOOTHINGS
from modelzoo.evaluation.harness import SMOOTHING_NAMES, Row

JSON = "results.json"
MARKDOWN = "results.md"
WORST = 5  # records listed where the model fares worst against the n-gram (per-record figures: results.json)


def _plain(value):
    """JSON-ready: Rows as dicts, NaN and infinities as null."""
    if isinstance(value, Row):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(header: dict, results: dict) -> str:
    return json.dumps(_plain({**header, "tasks": results}), indent=1) + "\n"


def _figure(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _verdict(row: Row) -> str:
    beats = row.model_beats_baseline
    if beats is None:
        return "-" if row.better is None else "n/a"
    return f"{'yes' if beats else 'no'} ({row.better} is better)"


def _table(head: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(_figure(x) for x in row) + " |" for row in rows]


def to_markdown(header: dict, results: dict) -> str:
    model = header["model"]
    lines = [f"# Evaluation of {model['name']} {model['source']} (step {model['step']})", "",
             f"Reading frame {model['reading_frame']}; device {model['device']}, {model['precision']}; seed {header['settings']['seed']}. "
             f"Inputs: " + ", ".join(f"{k} `{v}`" for k, v in header["inputs"].items() if v) + ".", ""]
    summary = [[task, r.metric, r.model, r.baseline, r.baseline_value, _verdict(r)]
               for task, result in results.items() for r in result["summary"]]
    lines += _table(["task", "metric", "model", "baseline", "baseline value", "model beats baseline"], summary)
    for task, result in results.items():
        lines += ["", f"## {task}", ""] + _DETAILS[task](result)
    if header.get("notes"):
        lines += ["", "Notes: " + "; ".join(header["notes"]) + "."]
    return "\n".join(lines) + "\n"


def _perplexity(r: dict) -> list[str]:
    orders = range(1, len(r["ngram"]["kneser_ney"]) + 1)
    rows = [[f"codon {k}-gram"] + [r["ngram"][s][k - 1] for s in SMOOTHINGS] for k in orders]
    best = r["best_ngram"]
    ratio = [(x["model"] / x["best_ngram"], x) for x in r["per_record"] if x["scored_codons"]]
    worst = sorted(ratio, key=lambda rx: -rx[0])[:WORST]
    return [f"{r['scored_codons']} codons of {r['records']} records scored (those the model scores). Model: "
            f"{_figure(r['model'])}; best n-gram: order {best['order']}, {best['smoothing']} "
            f"({_figure(best['perplexity'])}; chosen on this set, in the baseline's favour); uniform: 64.", ""] + \
        _table(["n-gram"] + [f"{SMOOTHING_NAMES[s]} (interpolated)" for s in SMOOTHINGS], rows) + \
        ["", "Records where the model fares worst against the best n-gram (perplexity, model / n-gram): " +
         ", ".join(f"{x['id']} {_figure(x['model'])} / {_figure(x['best_ngram'])}" for _, x in worst) + "."]


def _variants(r: dict) -> list[str]:
    counts = ", ".join(f"{k} {n}" for k, n in r["label_counts"].items())
    lines = [f"{r['records']} records labelled by {r['label_column']} ({counts}); cosine similarity.", ""]
    lines += _table(["representation", "1-NN", "5-NN", "ARI"],
                    [[x["representation"], x["knn1"], x["knn5"], x["ari"]] for x in r["representations"]])
    if "map" in r:
        lines += ["", f"{r['map']['method']} map of the model's embeddings: {r['map']['file']}"]
    return lines


def _mutations(r: dict) -> list[str]:
    counts = ", ".join(f"{k} {n}" for k, n in r["substitutions"].items())
    rows = [[kind, r["model"]["mean_llr"][kind], r["ngram"]["mean_llr"][kind]] for kind in r["substitutions"]]
    rows += [[f"AUROC {kind} vs synonymous", r["model"][f"auroc_{kind}"], r["ngram"][f"auroc_{kind}"]]
             for kind in ("nonsense", "missense")]
    return [f"Substitutions in {r['records']} records of {r['source']} ({counts}); LLR summed over the codon "
            f"and {r['window']} codons either side.", ""] + _table(["class / figure", "model", "n-gram"], rows)


def _generation(r: dict) -> list[str]:
    keys = ("sequences", "intact_fraction", "open_reading_frame_codons", "codon_usage_js_distance",
            "nearest_training_containment_mean", "nearest_training_containment_max")
    columns = [("model", "model"), ("ngram", "n-gram sampler"), ("training", "training stretches from an ATG")]
    shown = [(key, name) for key, name in columns if key in r]
    return [f"{r['num_generated']} sequences of {r['codons']} codons from ATG each, temperature "
            f"{r['temperature']}; containment: codon {r['containment_k']}-mers. Training stretches: as many "
            f"stretches of as many codons from an in-frame ATG of the training records, drawn at random.", ""] + \
        _table(["figure"] + [name for _, name in shown], [[k] + [r[key].get(k) for key, _ in shown] for k in keys])


_DETAILS = {"perplexity": _perplexity, "variants": _variants, "mutation_effects": _mutations,
            "generation": _generation}
