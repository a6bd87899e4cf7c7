"""CLoT humor studio: Creative Leap-of-Thought humor generation on vision-language models.

Kept light (no torch, no transformers) so that a command can answer before seconds of imports;
`clot.models` registers the native model families with transformers' Auto classes, and everything
that loads a model (the families seam, hence the engine and training) imports it.
"""

from clot.tasks import Candidate, Language, Request, Sampling, Task, detect_language

__all__ = ["Candidate", "Language", "Request", "Sampling", "Task", "detect_language"]
__version__ = "0.1.0"
