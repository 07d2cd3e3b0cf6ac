"""peftlab: the companion package of the book *Parameter-efficient fine-tuning, executed*.

One module per idea, each explained by one chapter (its docstring names it). Import what you need
from the module itself, e.g. ``from peftlab.lora import LoRALinear``.
"""

__version__ = "0.1.0"
