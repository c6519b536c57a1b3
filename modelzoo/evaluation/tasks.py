"""The harness's four tasks, each measuring the model and its baseline in the same run.

Each task is a function ``task(run) -> dict`` of an ``EvalRun`` (harness.py: the model, the
settings, the count baselines fitted once); its dict has ``summary``, a list of ``Row``s for the
results table, and the task's details (written to results.json as they are).

Every input is streamed: records are read, scored and dropped a batch at a time; only small
per-record figures (vectors for the variant task) are held.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from modelzoo.data.sequences import read_records
from modelzoo.errors import ConfigError, DataError
from modelzoo.evaluation import profiles
from modelzoo.evaluation.harness import SMOOTHING_NAMES, EvalRun, NGramSums, Row, label_table, records_of
from modelzoo.evaluation.substitutions import CLASSES, auroc, sample_substitutions, snippets
from modelzoo.inference import STOP_CODONS, GenomeLM

MAP = "variants_map.png"
CONTAINMENT_K = 5  # codons per k-mer in the copying check (15 nt: chance matches are rare)


# ---------------------------------------------------------------------- perplexity

def perplexity(run: EvalRun) -> dict:
    """Per-codon perplexity of the model on the evaluation FASTA and of every n-gram, over the
    same codons (those the model scores)."""
    lm, s = run.lm, run.settings
    sums = NGramSums(run.ngrams)
    model_nats, per_record = 0.0, []
    stream = lm.codon_log_probs_stream(records_of(s.eval_fasta), batch_size=s.batch_size, progress=True)
    for records, arrays in stream:
        for rec, values in zip(records, arrays):
            ids = run.encode(rec.seq)
            if len(ids) != len(values):
                raise DataError(f"{s.eval_fasta}: record {rec.id}: {len(values)} scores for {len(ids)} codons")
            scored = np.isfinite(values) & np.isin(ids, lm.tokenizer.codon_ids)  # the n-grams score codons only
            own = sums.add(ids, scored)
            model_nats += float(values[scored].sum())
            per_record.append((rec.id, int(scored.sum()), float(values[scored].sum()), own))
    run.set_ngram_perplexity(sums)
    smoothing, order = run.best
    model_ppl = math.exp(-model_nats / sums.codons)
    best_ppl = run.ngram_perplexity[smoothing][order - 1]
    records = [{"id": rid, "scored_codons": n, "model": _ppl(nats, n), "best_ngram": _ppl(own[smoothing][order - 1], n)}
               for rid, n, nats, own in per_record]
    what = "pseudo-perplexity (each codon masked)" if not lm.is_causal else "perplexity"
    return {
        "summary": [Row(f"per-codon {what}", model_ppl, run.best_name(), best_ppl, "lower")],
        "scored_codons": sums.codons, "records": len(records), "model": model_ppl,
        "ngram": run.ngram_perplexity, "best_ngram": {"smoothing": smoothing, "order": order, "perplexity": best_ppl},
        "uniform": 64.0, "per_record": records,
    }


def _ppl(nats: float, n: int) -> float:
    return math.exp(-nats / n) if n else float("nan")


# ---------------------------------------------------------------------- variants

def variants(run: EvalRun) -> dict:
    """k-NN accuracy and adjusted Rand index of the label, model embeddings against profiles."""
    lm, s = run.lm, run.settings
    table = label_table(s)
    labelled = (r for r in read_records(s.eval_fasta) if r.id in table)
    labels, model, codon, kmers = [], [], [], {k: [] for k in s.kmer_sizes}
    for records, vectors in lm.embed_stream(labelled, batch_size=s.batch_size, progress=True):
        model.append(vectors)
        for rec in records:
            labels.append(table[rec.id])
            codon.append(profiles.codon_counts(run.encode(rec.seq), lm.tokenizer))
            for k in s.kmer_sizes:
                kmers[k].append(profiles.kmer_counts(rec.seq, k))
    model = np.concatenate(model)
    representations = [(f"{lm.config.name} embeddings (embed defaults: {lm.default_pooling} pooling)", model),
                       ("codon-frequency profile (64-d)", np.array(codon))]
    representations += [(f"nucleotide {k}-mer profile ({4 ** k}-d)", np.array(kmers[k])) for k in s.kmer_sizes]
    table_rows = []
    for name, vectors in tqdm(representations, desc="variant metrics", unit=" representations"):
        table_rows.append({"representation": name, "knn1": profiles.knn_accuracy(vectors, labels, 1),
                           "knn5": profiles.knn_accuracy(vectors, labels, 5),
                           "ari": profiles.cluster_ari(vectors, labels, s.seed)})
    ours, others = table_rows[0], table_rows[1:]
    summary = []
    for key, metric in (("knn1", "variant 1-NN accuracy (leave-one-out)"), ("knn5", "variant 5-NN accuracy"),
                        ("ari", f"adjusted Rand index, k-means k={len(set(labels))}")):
        best = max(others, key=lambda r: r[key])
        summary.append(Row(metric, ours[key], best["representation"], best[key], "higher"))
    out = {"summary": summary, "records": len(labels), "label_column": s.label_column,
           "label_counts": dict(sorted(Counter(labels).items(), key=lambda kv: (-kv[1], kv[0]))),
           "representations": table_rows}
    if s.draw_map and s.output is not None:
        from modelzoo.tools.maps import draw_map

        title = f"{lm.config.name} {Path(lm.source).name}: embed defaults; colour: {s.label_column}"
        out["map"] = {"file": MAP, "method": draw_map(model, labels, s.output / MAP, title)}
    return out


# ---------------------------------------------------------------------- mutation effects

def mutation_effects(run: EvalRun) -> dict:
    """Zero-shot: log-likelihood ratios of point substitutions (alt against ref, summed over the
    codon's window) by class, and how well they tell nonsense and missense from synonymous. The
    n-gram scores the same stretches and codons."""
    lm, s = run.lm, run.settings
    source = s.cds_fasta or s.eval_fasta
    as_read = GenomeLM(lm.model, lm.config, source=lm.source, step=lm.step, device=lm.device,
                       tokenizer=lm.tokenizer, reading_frame="as_read")  # snippets are cut in the model's frame
    smoothing, order = run.best_ngram()
    window = min(s.llr_window, lm.context - 2)
    if window < s.llr_window:
        run.notes.append(f"--llr_window {s.llr_window} cut to {window}: the model's context is {lm.context} codons")
    rng = np.random.default_rng(s.seed)
    scores = {"model": {c: [] for c in CLASSES}, "ngram": {c: [] for c in CLASSES}}
    records, pending = 0, []
    bar = tqdm(desc="substitutions", unit=" substitutions")

    def score(batch):
        texts = [text for item in batch for text in item[1:3]]  # ref, alt, ref, alt...
        logp = as_read.codon_log_probs(texts, batch_size=s.batch_size)
        for k, (sub, ref, alt, lo, hi) in enumerate(batch):
            model_ref, model_alt = logp[2 * k][lo:hi], logp[2 * k + 1][lo:hi]
            ngram_ref, ngram_alt = (run.ngrams.log_probs(run.lm.tokenizer.encode(t))[smoothing][order - 1][lo:hi]
                                    for t in (ref, alt))
            both = np.isfinite(model_ref + model_alt + ngram_ref + ngram_alt)  # codons both score
            scores["model"][sub.kind].append(float((model_alt - model_ref)[both].sum()))
            scores["ngram"][sub.kind].append(float((ngram_alt - ngram_ref)[both].sum()))
        bar.update(len(batch))

    with bar:
        for rec in records_of(source, s.cds_features):
            if s.mutation_records is not None and records >= s.mutation_records:
                break
            records += 1
            codons, _ = lm.codons(rec.seq)
            for sub in sample_substitutions(rec.id, codons, s.mutations_per_class, rng):
                pending.append((sub, *snippets(codons, sub, window, lm.context, lm.is_causal)))
                if len(pending) >= 4 * s.batch_size:
                    score(pending)
                    pending = []
        if pending:
            score(pending)
    if not scores["model"]["synonymous"]:
        raise DataError(f"{source}: no coding region with a substitutable codon (read in the model's frame, "
                        f"{lm.reading_frame})")
    figures = {who: _llr_figures(by_class) for who, by_class in scores.items()}
    baseline = f"codon {order}-gram ({SMOOTHING_NAMES[smoothing]}) LLR"
    summary = [Row(f"AUROC {kind} vs synonymous (score: -LLR)", figures["model"][f"auroc_{kind}"], baseline,
                   figures["ngram"][f"auroc_{kind}"], "higher") for kind in ("nonsense", "missense")]
    summary += [Row(f"mean LLR, {kind} (nats)", figures["model"]["mean_llr"][kind], baseline,
                    figures["ngram"]["mean_llr"][kind], None) for kind in CLASSES]
    return {"summary": summary, "source": str(source), "records": records, "window": window,
            "substitutions": {c: len(v) for c, v in scores["model"].items()}, **figures}


def _llr_figures(by_class: dict[str, list[float]]) -> dict:
    llr = {c: np.asarray(v) for c, v in by_class.items()}
    return {"mean_llr": {c: float(v.mean()) if len(v) else float("nan") for c, v in llr.items()},
            "auroc_nonsense": auroc(-llr["nonsense"], -llr["synonymous"]),
            "auroc_missense": auroc(-llr["missense"], -llr["synonymous"])}


# ---------------------------------------------------------------------- generation

def generation(run: EvalRun) -> dict:
    """Sequences sampled from ATG by the model and by the best n-gram: intact reading frames,
    codon usage against the training set's, and how much of them the training set holds; beside
    the same figures of stretches of training records from an ATG (what natural looks like)."""
    lm, s = run.lm, run.settings
    if not lm.is_causal:
        raise ConfigError(f"task generation needs a causal model; this checkpoint is {lm.config.name}")
    prompt = lm.tokenizer.encode("ATG").astype(np.int64)
    texts = lm.generate("ATG", max_codons=s.generate_codons - 1, temperature=s.temperature,
                        num_return_sequences=s.num_generated, seed=s.seed, batch_size=min(s.num_generated, 64),
                        progress=True)
    smoothing, order = run.best_ngram()
    sets = {"model": [lm.tokenizer.encode(t).astype(np.int64) for t in texts],
            "ngram": run.ngrams.sample(smoothing, order, prompt, s.num_generated, s.generate_codons - 1,
                                       np.random.default_rng(s.seed))}
    nearest, natural = _training_pass(run, sets, s.generate_codons)
    stops = np.array([int(lm.tokenizer.encode(c)[0]) for c in STOP_CODONS])
    figures = {}
    for who, generated in [*sets.items(), ("training", natural)]:
        if not generated:
            continue
        stop_at = [np.isin(ids, stops) for ids in generated]
        usage = sum(profiles.codon_counts(ids, lm.tokenizer) for ids in generated)
        figures[who] = {
            "sequences": len(generated),
            "intact_fraction": float(np.mean([not at[:-1].any() for at in stop_at])),
            "open_reading_frame_codons": float(np.mean([at.argmax() + 1 if at.any() else len(at) for at in stop_at])),
            "codon_usage_js_distance": profiles.js_distance(usage, run.train_codon_counts),
        }
        if who in nearest:
            figures[who]["nearest_training_containment_mean"] = float(np.mean(nearest[who]))
            figures[who]["nearest_training_containment_max"] = float(np.max(nearest[who]))
    baseline = f"codon {order}-gram ({SMOOTHING_NAMES[smoothing]}) sampler"
    rows = (("intact_fraction", "intact reading frame (no stop before the last codon)", "higher"),
            ("codon_usage_js_distance", "codon-usage Jensen-Shannon distance to training", "lower"),
            ("nearest_training_containment_mean",
             f"nearest-training codon {CONTAINMENT_K}-mer containment (mean; copying check)", None))
    summary = [Row(metric, figures["model"][key], baseline, figures["ngram"][key], better)
               for key, metric, better in rows]
    return {"summary": summary, "num_generated": s.num_generated, "codons": s.generate_codons,
            "temperature": s.temperature, "containment_k": CONTAINMENT_K, **figures}


def _training_pass(run: EvalRun, sets: dict[str, list[np.ndarray]], codons: int
                   ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """One more streaming pass over the training FASTA: per generated sequence, the largest
    fraction of its codon k-mers that one training record holds; and a natural reference, up to
    as many stretches of ``codons`` codons from an ATG of the training records, in the model's
    frame, drawn uniformly among all such stretches (reservoir sampling, seeded)."""
    tok = run.lm.tokenizer
    keys = {who: [profiles.codon_kmers(ids, CONTAINMENT_K, tok) for ids in seqs] for who, seqs in sets.items()}
    best = {who: np.zeros(len(seqs)) for who, seqs in sets.items()}
    wanted, atg = len(sets["model"]), int(tok.encode("ATG")[0])
    rng, reference, seen = np.random.default_rng(run.settings.seed), [], 0
    for rec in tqdm(records_of(run.settings.train_fasta), desc="training records", unit=" records"):
        ids = run.encode(rec.seq)
        reference_keys = profiles.codon_kmers(ids, CONTAINMENT_K, tok)
        for who, queries in keys.items():
            best[who] = np.maximum(best[who], [profiles.containment(q, reference_keys) for q in queries])
        starts = np.flatnonzero(ids[: max(len(ids) - codons + 1, 0)] == atg)
        slots = rng.integers(0, seen + np.arange(1, len(starts) + 1))  # Algorithm R: item t may take slot < t
        for t, (start, slot) in enumerate(zip(starts.tolist(), slots.tolist())):
            if seen + t < wanted:
                reference.append(ids[start: start + codons])
            elif slot < wanted:
                reference[slot] = ids[start: start + codons]
        seen += len(starts)
    return best, reference


RUNNERS = {"perplexity": perplexity, "variants": variants, "mutation_effects": mutation_effects,
           "generation": generation}
