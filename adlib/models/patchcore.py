"""PatchCore: Towards Total Recall in Industrial Anomaly Detection.

Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler, CVPR 2022 (arXiv:2106.08265).

Locally aware patch features (3x3 neighbourhood average of layer2 and layer3, layer3 upsampled
to layer2's grid, concatenated, optionally pooled to ``embedding_dim`` channels) from the
normal training images form a memory bank, reduced by greedy k-center coreset selection on a
random projection (Sec. 3.2). A test patch's anomaly is its distance to the nearest memory
item, found exactly (:mod:`adlib.models.components.bank_search`: a bfloat16 prefilter with a
proven error bound on CPUs that have bfloat16 instructions); the image score is the largest
one, reweighted by how isolated that memory item is (Eq. 7); the map is upsampled and
smoothed (sigma 4).

Memory during fitting: full patch features are kept on the CPU in ``feature_dtype`` (float16
by default) next to their 128-d float32 projections, in buffers sized once from the number of
training images; only the projections enter the coreset search (in place), and only the
selected rows are turned into the float32 memory bank.
``max_train_patches`` bounds the collection by reservoir sampling (uniform over all patches).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from adlib.backbones import FeatureExtractor
from adlib.models.base import AnomalyModel, AnomalyOutput, TrainBatch
from adlib.models.components.bank_search import BankSearch
from adlib.models.components.coreset import gaussian_projection, greedy_coreset
from adlib.models.components.features import (concat_feature_maps, local_patch_average, reduce_channels,
                                              to_patch_rows)
from adlib.models.components.maps import gaussian_blur2d, upsample_map
from adlib.models.components.nearest import nearest_neighbors
from adlib.models.components.patch_store import PatchStore
from adlib.models.registry import ModelSpec, TrainDefaults, register

_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def reweighted_scores(patch_scores: torch.Tensor, nn_index: torch.Tensor, patch_features: torch.Tensor,
                      memory_bank: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """Image scores from patch scores with PatchCore's reweighting (Eq. 7).

    For each image: ``m_test`` is the patch with the largest distance ``s*`` to its nearest
    memory item ``m*``; ``N_b(m*)`` are the ``b = num_neighbors`` nearest memory items of ``m*``
    (``m*`` itself included). Score ``s = (1 - exp|m_test - m*| / sum_{m in N_b(m*)}
    exp|m_test - m|) * s*``. ``num_neighbors <= 1`` gives ``s*`` unchanged.

    Shapes: ``patch_scores`` and ``nn_index`` ``[B, P]``, ``patch_features`` ``[B, P, D]``.
    """
    rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
    best = patch_scores.argmax(dim=1)
    s_star = patch_scores[rows, best]
    if num_neighbors <= 1 or memory_bank.shape[0] < 2:
        return s_star
    m_test = patch_features[rows, best].to(memory_bank.dtype)  # [B, D]
    m_star = nn_index[rows, best]  # [B]
    _, support = nearest_neighbors(memory_bank[m_star], memory_bank, k=num_neighbors)  # [B, b]
    dist_support = torch.linalg.vector_norm(memory_bank[support] - m_test.unsqueeze(1), dim=-1)  # [B, b]
    dist_star = torch.linalg.vector_norm(memory_bank[m_star] - m_test, dim=-1)  # [B]
    # m* is in N_b(m*) (distance 0 to itself); make sure of it even with duplicate memory items
    contains = (support == m_star.unsqueeze(1)).any(dim=1)
    dist_support[~contains, -1] = dist_star[~contains]
    weight = 1.0 - torch.exp(dist_star - torch.logsumexp(dist_support, dim=1))
    return weight * s_star


class PatchCore(AnomalyModel):
    learns_by = "one_pass"
    frozen_modules = ("feature_extractor",)

    def __init__(self, backbone: str = "wide_resnet50_2", layers: Sequence[str] = ("layer2", "layer3"),
                 coreset_sampling_ratio: float = 0.1, num_neighbors: int = 9, patch_size: int = 3,
                 embedding_dim: int | None = None, projection_dim: int | None = 128,
                 feature_dtype: str = "float16", max_train_patches: int | None = None, blur_sigma: float = 4.0,
                 normalize: bool = True, pretrained: bool = True, backbone_dir: str | Path | None = None) -> None:
        super().__init__(normalize=normalize)
        if not 0 < coreset_sampling_ratio <= 1:
            raise ValueError(f"coreset_sampling_ratio must be in (0, 1], got {coreset_sampling_ratio}")
        if feature_dtype not in _DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(_DTYPES)}, got {feature_dtype!r}")
        self.feature_extractor = FeatureExtractor(backbone, layers, pretrained=pretrained, backbone_dir=backbone_dir)
        self.set_input_stats(self.feature_extractor.mean, self.feature_extractor.std)
        self.coreset_sampling_ratio = float(coreset_sampling_ratio)
        self.num_neighbors = int(num_neighbors)
        self.patch_size = int(patch_size)
        self.embedding_dim = embedding_dim
        self.projection_dim = projection_dim
        self.feature_dtype = _DTYPES[feature_dtype]
        self.max_train_patches = max_train_patches
        self.blur_sigma = float(blur_sigma)
        total = sum(self.feature_extractor.channels)
        self.dim = min(total, embedding_dim) if embedding_dim else total
        self.register_buffer("memory_bank", torch.empty(0, self.dim))
        self._store: PatchStore | None = None
        self._projection: torch.Tensor | None = None
        self._search: tuple[tuple, BankSearch] | None = None

    @property
    def _seed(self) -> int:
        return self.fit_context.seed if self.fit_context is not None else 0

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w]`` locally aware patch features."""
        maps = self.feature_extractor(self.normalize_input(images))
        maps = [local_patch_average(m.float(), self.patch_size) for m in maps]
        emb = concat_feature_maps(maps, mode="bilinear")
        return reduce_channels(emb, self.embedding_dim) if self.embedding_dim else emb

    # ----- fitting -------------------------------------------------------------------------
    def collect(self, batch: TrainBatch, pass_name: str) -> None:
        rows = to_patch_rows(self.embed(batch.images))
        if self._store is None:
            images = self.fit_context.num_train_images if self.fit_context is not None else 0
            self._store = PatchStore(self.feature_dtype, capacity=self.max_train_patches, seed=self._seed,
                                     expected_rows=images * rows.shape[0] // batch.images.shape[0] or None)
            if self.projection_dim and self.projection_dim < self.dim:
                self._projection = gaussian_projection(self.dim, self.projection_dim, self._seed, device=rows.device)
        projected = rows @ self._projection if self._projection is not None else rows
        self._store.add(rows, projected)

    def finalize(self) -> None:
        if self._store is None or len(self._store) == 0:
            raise ValueError("PatchCore: no training images were collected before finalize()")
        device = self.memory_bank.device
        n = len(self._store)
        n_select = max(1, int(n * self.coreset_sampling_ratio))
        if n_select >= n:
            index = torch.arange(n)
        else:
            # the projections are not needed after the selection: centred in place
            index = greedy_coreset(self._store.projected().to(device), n_select, seed=self._seed, overwrite=True)
        self.memory_bank = self._store.gather(index).to(device)
        self._store, self._projection = None, None

    # ----- prediction ----------------------------------------------------------------------
    def bank_search(self) -> BankSearch:
        """The exact nearest-item search over the current memory bank (rebuilt when it changes)."""
        bank = self.memory_bank
        key = (bank.data_ptr(), tuple(bank.shape), bank._version, bank.device)
        if self._search is None or self._search[0] != key:
            self._search = (key, BankSearch(bank))
        return self._search[1]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> AnomalyOutput:
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCore is not fitted: run collect() on training images and finalize() first")
        emb = self.embed(images)
        b, _, h, w = emb.shape
        rows = to_patch_rows(emb)
        dist, index = self.bank_search().search(rows)
        patch_scores, nn_index = dist.view(b, h * w), index.view(b, h * w)
        scores = reweighted_scores(patch_scores, nn_index, rows.view(b, h * w, -1), self.memory_bank,
                                   self.num_neighbors)
        maps = gaussian_blur2d(upsample_map(patch_scores.view(b, h, w), images.shape[-2:]), self.blur_sigma)
        return AnomalyOutput(scores=scores, maps=maps)


register(ModelSpec(
    name="patchcore", cls=PatchCore, family="memory",
    paper="Roth et al., Towards Total Recall in Industrial Anomaly Detection, CVPR 2022, arXiv:2106.08265",
    train=TrainDefaults(num_epochs=1, batch_size=32, img_size=256),
    description="Coreset memory bank of locally aware patch features; nearest-neighbour distance map.",
))
