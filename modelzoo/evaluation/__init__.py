"""A genome evaluation harness: what a codon language model knows, measured beside honest baselines
computed in the same run (``python -m modelzoo.tools.evaluate``; see docs/evaluation.md).

- ``ngram``: interpolated (modified, plain) Kneser-Ney and Witten-Bell codon n-grams of orders
  1..8 (the perplexity floor, the mutation-effect and the generation baselines);
- ``profiles``: codon-frequency and nucleotide k-mer profiles, leave-one-out k-NN accuracy,
  adjusted Rand index, Jensen-Shannon distance (the variant and codon-usage baselines);
- ``substitutions``: point substitutions classed by the standard genetic code, AUROC;
- ``harness``: the settings, the run (the model, the n-grams fitted once) and the table row;
- ``tasks``: the four tasks (perplexity, variants, mutation_effects, generation);
- ``report``: results.json and the results.md table.
"""
