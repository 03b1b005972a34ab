"""raekern's models (DESIGN §4.1): frozen ViT encoders, fusion, the ViT-MAE pixel decoder, the RAE
autoencoder, DiT-DH v1/v2, checkpoint loading, a registry of the released configurations and
flow-matching training helpers. Every module runs on raekern's ops (``backend="raekern"``) or plain
PyTorch (``backend="torch"``) with the same weights."""
from raekern.models import fusion  # noqa: F401
from raekern.models.checkpoints import CheckpointMismatchError, read_checkpoint
from raekern.models.decoder import ViTMAEDecoder
from raekern.models.dit import DiTDH, DiTDHv2
from raekern.models.encoder import Dinov2Encoder, Dinov3Encoder
from raekern.models.fusion import DepthRoutedFusion, LatentStats, LayerMeanFusion
from raekern.models.layers import raekern_backend_available, set_backend
from raekern.models.rae import RAE, noise_augment
from raekern.models.registry import AUTOENCODERS, MODELS, build, build_rae, list_models, load

__all__ = [
    "AUTOENCODERS", "CheckpointMismatchError", "DepthRoutedFusion", "DiTDH", "DiTDHv2", "Dinov2Encoder",
    "Dinov3Encoder", "LatentStats", "LayerMeanFusion", "MODELS", "RAE", "ViTMAEDecoder", "build", "build_rae",
    "list_models", "load", "noise_augment", "raekern_backend_available", "read_checkpoint", "set_backend",
]
