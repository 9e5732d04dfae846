"""Mooncake transfer of the five buffers: the handle, the transport, encoder-side staging, language-side pull."""

from .handle import Handle
from .signing import HandleKeys
from .puller import Puller, PullStats
from .session import PullSession
from .stager import Stager
from .transport import MooncakeTransport

__all__ = ["Handle", "HandleKeys", "MooncakeTransport", "PullSession", "PullStats", "Puller", "Stager"]
