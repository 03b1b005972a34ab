"""raekern's ops, one module per family (DESIGN §3). Each op has a typed function, a fake kernel,
autograd, and a plain-PyTorch ``<name>_reference`` beside it."""
from raekern.ops.norm import *  # noqa: E402,F401,F403
