"""Cerebras Model Zoo params files, read as they are.

A Model Zoo user's yaml comes in one of two layouts: the sectioned one of releases 1.8-2.3
(``train_input``, ``eval_input``, ``model``, ``optimizer``, ``runconfig``, ``sparsity``) or the
``trainer:`` one of 2.4 and later (``trainer: {init: {backend, model, optimizer, schedulers,
precision, loop, checkpoint, logging, callbacks, ...}, fit: {train_dataloader, val_dataloader},
validate: ..., validate_all: ...}``). ``translate`` turns either into this toolkit's params
(modelzoo/config.py), which then validate as any native file: the strict schema stays the one
truth. Every Model Zoo key has one fate, decided in ``RULES`` below:

- mapped: carried over to our key (with its value transformed where the spelling differs);
- noted: means something only to Cerebras hardware or to a text data processor; accepted and
  listed once in the run log;
- refused: a setting this toolkit's models cannot honour; one line says why.

A file is read this way when it has a ``trainer:`` key, or a section holding a key only Model
Zoo files use (any key of RULES that is not ours), or a model section without ``name`` (the
sectioned layout names the model by the directory its run.py sits in).
``python -m modelzoo.modelzoo_params`` prints docs/modelzoo.md from RULES (rules.py).
"""

from modelzoo.modelzoo_params.reference import reference_markdown
from modelzoo.modelzoo_params.rules import RULES, Rule
from modelzoo.modelzoo_params.translate import Translation, hint_for, is_modelzoo_file, translate

__all__ = ["RULES", "Rule", "Translation", "hint_for", "is_modelzoo_file", "reference_markdown", "translate"]
