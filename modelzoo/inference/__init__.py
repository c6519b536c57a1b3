"""Use a trained model: embed genomes, generate codon sequences, score log-likelihoods.

    from modelzoo import GenomeLM
    lm = GenomeLM.load("model_dir/quickstart")          # newest good checkpoint, or a checkpoint file
    vectors = lm.embed([genome_a, genome_b])             # (2, hidden_size) numpy
    sequences = lm.generate("ATG", max_codons=300, seed=0, stop_at_stop_codon=True)
    nats = lm.log_likelihood([genome_a])                 # total log-probability per sequence
    per_codon = lm.codon_log_probs([genome_a])           # [array of each codon's log-probability]
    for records, vectors in lm.embed_stream(read_records("many.fasta.gz")):  # a round at a time
        ...                                              # (log_likelihood_stream likewise)

Sequences are nucleotide strings (or ``Record``s from ``modelzoo.data.sequences.read_records``,
whose ids then name the record in errors), read with ``CodonTokenizer``'s rules in the reading
frame the model was trained on (its train_input.reading_frame: from the first nucleotide, or in
the frame of the longest stop-free run of codons; ``GenomeLM.reading_frame``). Codons with N or
another ambiguity code become [UNK]: the model sees them as input, but they are neither pooled
into embeddings nor scored (no codon was observed), except in GenSLM's recipes, for numbers
comparable with GenSLM's: ``embed(pooling="genslm")`` and ``log_likelihood(score_unk=True)``.

Genomes longer than the model's context are cut into windows the way training cut them:
consecutive windows of ``max_position_embeddings`` codons for GPT-2/GPT-J/GPT-NeoX, and of two codons
fewer framed by [CLS] ... [SEP] for BERT (``modelzoo.data.datasets.frame``, training's framing).
The streams read their input a round at a time (memory holds a round, never the input): its
windows sorted by length into batches of ``batch_tokens``, short ones sharing a row with
document attention (``inference_batching``), each sequence's results its own alone, in input
order. Under a process group (torchrun, or the tools' ``--num_workers_per_node``) every process
computes a share of the batches and yields them all. The model computes in the precision its
config decides for this device, as training does (``GenomeLM.precision``).

The modules: ``genome_lm`` (GenomeLM, the same for every model), one reader per objective
(``causal``: windows, log-probabilities, generation through ``generation``; ``masked``: framed
windows, one codon masked per piece, the pseudo-log-likelihood), ``embedding`` (pooling),
``streams`` (rounds of packed batches), ``saved`` (a checkpoint's model, config and reading frame).
"""

from modelzoo.inference.embedding import POOLINGS, SURPRISE_LAYER, Layer  # noqa: F401
from modelzoo.inference.generation import MAX_GENERATED, STOP_CODONS  # noqa: F401
from modelzoo.inference.genome_lm import GenomeLM  # noqa: F401
from modelzoo.inference.streams import DEFAULT_BATCH_WINDOWS  # noqa: F401
