"""Moved to ``chorus_p2p.federation.spec``. This alias keeps code written for the old layout
(Flower apps that build a ``FederationSpec``) importing, with a DeprecationWarning; it goes in
the release after next."""

import warnings

from chorus_p2p.federation.spec import *  # noqa: F401,F403
from chorus_p2p.federation.refusals import UpdateRejected  # noqa: F401

warnings.warn("chorus_p2p.node.spec moved to chorus_p2p.federation.spec", DeprecationWarning,
              stacklevel=2)
