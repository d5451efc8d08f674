"""The engine: model, KV cache, scheduler, sampling, adapter residency and the step loop.

Importing the package quiets, first, start-up messages no user can act on (``quiet.py``): every
engine module that imports bitsandbytes is imported after this line.
"""

from .quiet import quiet_unactionable_warnings

quiet_unactionable_warnings()
