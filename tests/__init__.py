"""The test suite mirrors the code: tests/models tests modelzoo/models, tests/backends (and
backends/csx) modelzoo/backends, tests/training, tests/evaluation, tests/tools and
tests/modelzoo_params their namesakes, tests/data_preparation the data_preparation package, and
tests/modelzoo_data modelzoo/data (tests/data holds the fixture files); the tests of modelzoo's
top-level modules (config, startup, the command line end to end, resume, faults) sit here.
What tests share is in helpers.py, fixtures in conftest.py. ``pytest -m "not distributed"``
skips the tests that start several processes.
"""
