"""What every part of chorus-p2p agrees on: the federation's spec, the round states, the
refusals, the DP policy and its accountant.

The node, the trainer, the Flower strategy and the CLI all import this package, and it imports
none of them, so no package depends on another in a circle (``tests/test_layout.py``).
"""
