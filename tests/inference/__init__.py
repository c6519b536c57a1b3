"""Tests of modelzoo/inference/: GenomeLM, its readers, packed batching, worker processes."""
