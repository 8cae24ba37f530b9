"""DSR's general appearance model: a two-level vector-quantised autoencoder.

Zavrtanik, Kristan, Skočaj, "DSR - A Dual Subspace Re-Projection Network for Surface Anomaly
Detection", ECCV 2022, Sec. 3.1, after VQ-VAE-2 (Razavi et al., NeurIPS 2019) with EMA codebooks
(van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017, App. A.1).

An encoder maps the image to features at 1/4 of its side (``hi``) and, from those, at 1/8
(``lo``). The lo features are quantised with codebook ``K_lo``; upsampled and concatenated with the
hi encoder features they give the hi features, quantised with ``K_hi``. The decoder reconstructs
the image from both quantised maps. Stage 1 of DSR trains all of it on natural images (the
authors used ImageNet; :mod:`adlib.backbones.dsr_vq_training` does it on any folder) and DSR keeps
it frozen.

The authors' released file uses other parameter names; :func:`from_reference_layout` renames
them to this module's (same tensors, same shapes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: rows of distances computed at once when quantising (bounds memory: rows x codebook size)
_QUANTISE_CHUNK = 4096


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation; the codebook is a buffer updated by exponential moving
    averages of the assigned features (only while :attr:`ema_update` is set, i.e. in stage-1
    training; DSR never changes it)."""

    def __init__(self, num_embeddings: int, dim: int, decay: float = 0.99, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_embeddings, self.dim = int(num_embeddings), int(dim)
        self.decay, self.eps = float(decay), float(eps)
        self.register_buffer("codebook", torch.randn(self.num_embeddings, self.dim))
        self.register_buffer("cluster_size", torch.zeros(self.num_embeddings))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.ema_update = False

    def nearest(self, rows: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of every row ``[N, D]`` -> ``[N]``."""
        sq_codes = self.codebook.square().sum(1)
        out = []
        for chunk in rows.split(_QUANTISE_CHUNK):
            out.append((sq_codes - 2.0 * chunk @ self.codebook.T).argmin(1))  # |row|^2 is constant per row
        return torch.cat(out) if out else rows.new_zeros(0, dtype=torch.long)

    def lookup(self, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices`` ``[B, h, w]`` as a ``[B, D, h, w]`` map."""
        return self.codebook[indices].permute(0, 3, 1, 2).to(like.dtype).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` ``[B, D, h, w]`` -> (quantised map with straight-through gradients to ``z``,
        code indices ``[B, h, w]``, commitment loss ``|z - sg(q)|^2``)."""
        b, d, h, w = z.shape
        rows = z.detach().permute(0, 2, 3, 1).reshape(-1, d).float()
        indices = self.nearest(rows)
        if self.ema_update and self.training:
            self._ema_step(rows, indices)
        quantised = self.lookup(indices.view(b, h, w), z)
        commitment = F.mse_loss(z.float(), quantised.detach().float())
        return z + (quantised - z).detach(), indices.view(b, h, w), commitment

    @torch.no_grad()
    def _ema_step(self, rows: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.num_embeddings).to(rows.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, rows)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_embeddings * self.eps) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator, threshold: float = 1e-3) -> int:
        """Move codes whose EMA usage fell below ``threshold`` onto random features of ``z``
        (``[B, D, h, w]``); returns how many moved. Keeps brief trainings on small folders from
        leaving most of the codebook unused."""
        dead = (self.cluster_size < threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        rows = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        pick = torch.randint(rows.shape[0], (dead.numel(),), generator=generator).to(rows.device)
        self.codebook[dead] = rows[pick]
        self.ema_sum[dead] = rows[pick]
        self.cluster_size[dead] = 1.0
        return int(dead.numel())


class Residual(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` (no biases)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                                   nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, count: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Residual(channels, hidden) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return F.relu(x)


class EncoderHi(nn.Module):
    """Image -> features at 1/4 of its side."""

    def __init__(self, hidden: int, residual_hidden: int, residual_layers: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, hidden // 2, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.residual = ResidualStack(hidden, residual_hidden, residual_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))


class EncoderLo(nn.Module):
    """Hi features -> features at half their side."""

    def __init__(self, hidden: int, residual_hidden: int, residual_layers: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, hidden, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.residual = ResidualStack(hidden, residual_hidden, residual_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(F.relu(self.conv2(F.relu(self.conv1(x)))))


class ImageDecoder(nn.Module):
    """Features at 1/4 of the image side -> image (two stride-2 transposed convolutions)."""

    def __init__(self, in_channels: int, hidden: int, residual_hidden: int, residual_layers: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.residual = ResidualStack(hidden, residual_hidden, residual_layers)
        self.up1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(hidden // 2, 3, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(F.relu(self.up1(self.residual(self.conv1(x)))))


class GeneralAppearanceModel(nn.Module):
    """DSR's discrete latent model (stage 1). Defaults: the authors' released model
    (128 hidden channels, 2 residual layers of 64, two codebooks of 4096 x 128)."""

    def __init__(self, hidden: int = 128, residual_layers: int = 2, residual_hidden: int = 64,
                 num_embeddings: int = 4096, embedding_dim: int = 128, decay: float = 0.99) -> None:
        super().__init__()
        self.encoder_hi = EncoderHi(hidden, residual_hidden, residual_layers)
        self.encoder_lo = EncoderLo(hidden, residual_hidden, residual_layers)
        self.pre_quant_lo = nn.Conv2d(hidden, embedding_dim, 1)
        self.quant_lo = VectorQuantizer(num_embeddings, embedding_dim, decay)
        self.upsample_lo = nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, stride=2, padding=1)
        self.pre_quant_hi = nn.Conv2d(hidden + embedding_dim, embedding_dim, 1)
        self.quant_hi = VectorQuantizer(num_embeddings, embedding_dim, decay)
        self.decoder = ImageDecoder(2 * embedding_dim, hidden, residual_hidden, residual_layers)
        self.shape = {"hidden": int(hidden), "residual_layers": int(residual_layers),
                      "residual_hidden": int(residual_hidden), "num_embeddings": int(num_embeddings),
                      "embedding_dim": int(embedding_dim)}

    def encode_lo(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hi encoder features, continuous lo features before quantisation)."""
        enc_hi = self.encoder_hi(x)
        return enc_hi, self.pre_quant_lo(self.encoder_lo(enc_hi))

    def hi_features(self, enc_hi: torch.Tensor, q_lo: torch.Tensor) -> torch.Tensor:
        """Continuous hi features before quantisation, given the quantised lo map."""
        return self.pre_quant_hi(torch.cat([enc_hi, self.upsample_lo(q_lo)], dim=1))

    def join(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> torch.Tensor:
        """Both quantised maps on the hi grid (what the image decoders read)."""
        return torch.cat([self.upsample_lo(q_lo), q_hi], dim=1)

    def quantise(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Continuous and quantised lo/hi maps of images ``x`` and the commitment loss."""
        enc_hi, z_lo = self.encode_lo(x)
        q_lo, _, commit_lo = self.quant_lo(z_lo)
        z_hi = self.hi_features(enc_hi, q_lo)
        q_hi, _, commit_hi = self.quant_hi(z_hi)
        return {"enc_hi": enc_hi, "z_lo": z_lo, "q_lo": q_lo, "z_hi": z_hi, "q_hi": q_hi,
                "commitment": commit_lo + commit_hi}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, commitment loss) of images ``x``."""
        q = self.quantise(x)
        return self.decoder(self.join(q["q_lo"], q["q_hi"])), q["commitment"]


#: the authors' parameter names -> this module's (applied in order, as prefix/substring renames)
_REFERENCE_RENAMES = (
    ("_encoder_b.", "encoder_hi."), ("_encoder_t.", "encoder_lo."), ("_decoder_b.", "decoder."),
    ("_pre_vq_conv_bot.", "pre_quant_hi."), ("_pre_vq_conv_top.", "pre_quant_lo."), ("upsample_t.", "upsample_lo."),
    ("_vq_vae_bot.", "quant_hi."), ("_vq_vae_top.", "quant_lo."),
    ("_embedding.weight", "codebook"), ("_ema_cluster_size", "cluster_size"), ("_ema_w", "ema_sum"),
    ("_residual_stack._layers.", "residual.layers."), ("._block.", ".block."),
    ("_conv_trans_1.", "up1."), ("_conv_trans_2.", "up2."),
    ("_conv_1.", "conv1."), ("_conv_2.", "conv2."), ("_conv_3.", "conv3."),
)


def is_reference_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for a state dict saved by the authors' ``DiscreteLatentModel``."""
    return any(key.startswith(("_vq_vae_top.", "_encoder_b.")) for key in state)


def from_reference_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the authors' keys to :class:`GeneralAppearanceModel`'s."""
    out = {}
    for key, value in state.items():
        for old, new in _REFERENCE_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def shape_of_state(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The architecture numbers a (this-layout) state dict implies, for clear mismatch errors."""
    book = state.get("quant_hi.codebook")
    conv = state.get("encoder_hi.conv2.weight")
    res = state.get("encoder_hi.residual.layers.0.block.1.weight")
    layers = {k.split(".")[3] for k in state if k.startswith("encoder_hi.residual.layers.")}
    return {"hidden": int(conv.shape[0]) if conv is not None else -1,
            "residual_layers": len(layers),
            "residual_hidden": int(res.shape[0]) if res is not None else -1,
            "num_embeddings": int(book.shape[0]) if book is not None else -1,
            "embedding_dim": int(book.shape[1]) if book is not None else -1}
