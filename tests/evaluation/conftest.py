"""One intra-op thread for the tiny models here (see :mod:`tests.crafted.tiny`)."""

from tests.crafted.tiny import single_thread

__all__ = ["single_thread"]
