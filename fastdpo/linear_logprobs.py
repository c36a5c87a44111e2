"""The old import path of the fused LM head, kept for users: the code lives in :mod:`fastdpo.head`.

Only the public names (``fastdpo.head.__all__``) are re-exported here; import anything else from the
:mod:`fastdpo.head` module that owns it.
"""

from fastdpo.head import *  # noqa: F403
from fastdpo.head import __all__  # noqa: F401
from fastdpo.reference import naive_linear_token_logprobs  # noqa: F401 - the oracle moved to fastdpo.reference
