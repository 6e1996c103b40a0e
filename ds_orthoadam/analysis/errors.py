"""The one exception type of the analysis suite: bad input, with the problem and the fix in its message."""

from ds_orthoadam.errors import UserError


class AnalysisInputError(UserError, ValueError):
    """A model directory, data source, tokenizer or option the analysis cannot use; the message says how to fix it."""
