"""meg-harness: massive knowledge editing of LLMs, side by side under one evaluation protocol."""

__version__ = "0.1.0"
