"""raekern's ops, one module per family (DESIGN §3). Each op has a typed function, a fake kernel,
autograd, and a plain-PyTorch ``<name>_reference`` beside it."""
from raekern.ops.guidance import (GuidanceOutput, gfcg_select, gfcg_select_reference,  # noqa: E402,F401
                                  guidance_step, guidance_step_reference)
from raekern.ops.norm import *  # noqa: E402,F401,F403
from raekern.ops.fusion import *  # noqa: E402,F401,F403
from raekern.ops.attention import (attention, attention_info, attention_packed, attention_path,  # noqa: F401,E402
                                  attention_reference)
from raekern.ops.mlp import (  # noqa: F401,E402
    swiglu, swiglu_packed, swiglu_packed_reference, swiglu_reference, transpose_copy, transpose_copy_reference)
