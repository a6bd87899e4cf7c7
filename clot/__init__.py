"""CLoT humor studio: Creative Leap-of-Thought humor generation on vision-language models."""

from clot import models  # registers the native model families with transformers' Auto classes
from clot.tasks import Candidate, Language, Request, Sampling, Task, detect_language

__all__ = ["Candidate", "Language", "Request", "Sampling", "Task", "detect_language"]
__version__ = "0.1.0"
