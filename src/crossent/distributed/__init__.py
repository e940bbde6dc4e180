"""Losses over a vocabulary sharded across the ranks of a ``torch.distributed`` group.

:func:`vocab_parallel_cross_entropy` takes each rank's slice of the logits,
:func:`vocab_parallel_linear_cross_entropy` each rank's rows of the LM head's weight (the
fused head: no logits stored); :func:`vocab_parallel_token_logprobs` and
:func:`vocab_parallel_linear_token_logprobs` the per-token log-probabilities and entropy.
All equal the single-process crossent loss on the
gathered data (values, ``LossParts``, gradients). ``crossent.cross_entropy`` and
``crossent.linear_cross_entropy`` dispatch DTensor inputs sharded on the vocabulary here.
See ``docs/distributed.md``.
"""

from ._vocab_parallel import vocab_parallel_cross_entropy
from ._vocab_parallel import vocab_parallel_linear_cross_entropy
from ._vocab_parallel import vocab_parallel_linear_token_logprobs
from ._vocab_parallel import vocab_parallel_token_logprobs

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_token_logprobs",
    "vocab_parallel_token_logprobs",
]
