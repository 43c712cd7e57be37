"""Names shared by the math and the command line.

They live apart from the math so that client commands (`status`, `submit`, ...) can list
the choices in `--help` without importing torch, which costs seconds on a loaded machine.
"""

STRATEGIES: tuple[str, ...] = ("fedex-svd", "fedex", "fedavg")
DEFAULT_STRATEGY = "fedex-svd"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
