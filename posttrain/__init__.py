"""posttrain: hand-written LLM post-training loops.

Kept empty on purpose: importing one loss must not pull in models, data or kernels.
"""

__version__ = "0.1.0"
