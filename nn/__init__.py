"""Memory-saving nn.Module replacements and the ``convert_*`` functions that swap them in.

Nothing is exported yet: the layers arrive with their own issues (SLTrain, low-rank, int8/fp8).
"""

__all__: list[str] = []
