import sys

from modelzoo.modelzoo_params.reference import reference_markdown

sys.stdout.write(reference_markdown())
