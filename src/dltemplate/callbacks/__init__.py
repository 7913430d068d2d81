"""Callbacks: the base class and the shipped callbacks, registered in ``CALLBACKS``."""

from dltemplate.callbacks.base import EVENTS, Callback, CallbackList
from dltemplate.callbacks.freeze import Freeze
from dltemplate.callbacks.grad_norm import GradNorm
from dltemplate.callbacks.max_time import MaxTime

__all__ = ["EVENTS", "Callback", "CallbackList", "Freeze", "GradNorm", "MaxTime"]
