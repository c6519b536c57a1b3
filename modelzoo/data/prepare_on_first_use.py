"""Moved to ``data_preparation.first_use`` (first-use preparation belongs with preparation); this
name stays for the callers that still import it."""

from data_preparation.first_use import check_prepared, ensure_prepared, options_for  # noqa: F401
