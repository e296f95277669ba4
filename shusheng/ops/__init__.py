"""DCNv3 operator: the one implementation used by every model in shusheng.

* ``dcnv3_core(...)`` — functional core, official argument order, backend chosen per device;
* ``DCNv3`` — the InternImage token-mixer module (official parameter names, channels-last input);
* ``available_backends(device)`` — what runs here (``reference`` always; ``cpu`` once its C++ kernel compiles;
  ``triton`` on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from shusheng.ops.dcnv3 import (
    BACKENDS,
    DCNv3ArgumentError,
    available_backends,
    dcnv3_core,
    dcnv3_core_pytorch,
    default_backend,
)
from shusheng.ops.modules import DCNv3, build_act_layer, build_norm_layer

__all__ = [
    "BACKENDS",
    "DCNv3",
    "DCNv3ArgumentError",
    "available_backends",
    "build_act_layer",
    "build_norm_layer",
    "dcnv3_core",
    "dcnv3_core_pytorch",
    "default_backend",
]
