"""Early exit: draft tokens cheaply (an exit head after layer E, a reduced-vocabulary head, or n-grams from
the context) and either verify them with the full model (lossless) or trust confident ones (lossy).

``modes.py`` parses ``off|lossless|confidence[:T]``; ``heads.py`` fits and stores exit heads (numpy only);
``capture.py`` reads hidden states out of llama.cpp; ``draft.py`` holds the draft sources; ``speculative.py``
the draft-and-verify loop on any Backend; ``confidence.py`` the lossy exit; ``calibrate.py`` measures and
decides what a bundle gets.
"""

from edgellm.early_exit.modes import EarlyExitMode, parse_mode

__all__ = ["EarlyExitMode", "parse_mode"]
