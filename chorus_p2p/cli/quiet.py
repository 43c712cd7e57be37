"""Third-party chatter off unless ``-v``: transformers' FutureWarnings, PEFT's UserWarnings
and Hugging Face loading bars say nothing a user of ``chorus-node`` can act on.

Only environment variables and warning filters: nothing is imported here (client commands stay
fast), and nothing forces the hub offline (``--model org/name`` must still download).
"""

from __future__ import annotations

import logging
import os
import warnings

NOISY_MODULES = r"(transformers|peft|torch|accelerate|huggingface_hub|tokenizers|opacus)(\..*)?"


def quiet_third_party(verbose: bool) -> None:
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
    # DP-SGD's per-record hooks sit on LoRA layers whose inputs (the frozen base's activations)
    # need no gradient: torch says so on every step, attributed to the caller's line.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    # With the qlora extra, bitsandbytes and kernels log (not warn) that a CPU kernel cannot be
    # fetched offline, on every model load: true, and nothing a user of a LoRA run can act on.
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


NOISY_LOGGERS = ("kernels", "bitsandbytes")
