"""Command-line tools that work on checkpoints (``python -m modelzoo.tools.<name>``)."""
