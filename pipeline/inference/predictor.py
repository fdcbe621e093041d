"""The Predictor: support images + masks + query images in, per-pixel defect logits out.

The one inference path (``docs/architecture.md``, "From request to mask")::

    Predictor.load(spec)                      resolve + load the network once (pipeline.inference.resolve)
    support = p.encode_support(imgs, masks)   K pairs -> preprocess -> backbone, once per support set
    p.predict_logits(support, queries)        N queries -> preprocess -> backbone -> head (forward_features)
                                              -> bilinear upsampling to each query's original (H, W)

Preprocessing (:mod:`pipeline.inference.preprocess`): bilinear resize to ``S x S`` (the model's
training size, from its checkpoint), masks nearest, values / 255. The head runs on the feature grid
and its logits are upsampled straight to the original size (every model in ``model/`` ends with a
bilinear upsampling, so this equals asking it for the original size); a pixel is a defect where
logit > 0, i.e. sigmoid > 0.5 (paper Eq. 6 trains a sigmoid/BCE output).

Evaluation runs the same :meth:`Predictor.head` and :meth:`Predictor.upsample` on features it has
cached per image (the frozen-backbone feature store holds exactly :meth:`Predictor.encode_images`
of the clean view), so there is no second forward implementation.

SOFS non-resizing (a model file with ``native_area``, :mod:`pipeline.inference.native`): when a
support defect is small, :meth:`encode_support` crops it at native resolution and
:meth:`predict_logits` segments each query window by window at native resolution, stitches the
window logits and applies the presence gate to the whole image.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.inference import native, preprocess
from pipeline.inference import gate as gate_mod
from pipeline.inference.gate import PresenceGate, support_shares
from pipeline.inference.limits import MAX_TRANSDUCTIVE_STEPS
from pipeline.inference.resolve import ModelSource, open_model


class PredictInputError(ValueError):
    """Bad inference input (support pair, query, threshold, output folder, request); the message names
    the file or field and what to do."""


def _device_of(net: torch.nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


@dataclass
class SupportSet:
    """A support set encoded once and reused for every query batch.

    Attributes:
        feats: ``(1, K, Cb, h, w)`` backbone features (``net.encode``).
        masks: ``(1, K, 1, S, S)`` float in {0, 1} (nearest-resized support masks).
        image_size: ``S``.
        native: the queries are segmented in native-resolution windows (SOFS non-resizing: a
            support defect is small, and its image was cropped around it instead of resized).
        share: mean over the K shots of the defect share of each *original* support mask, in ``[0, 1]``
            (the presence gate's support size, :class:`pipeline.inference.gate.PresenceGate`); ``None``: taken
            from ``masks``.
        level: the reference level (:meth:`Predictor.reference_levels`: highest max log-odds of the
            reference images under this support); ``None``: no reference images, the max-logit gate applies.
    """

    feats: torch.Tensor
    masks: torch.Tensor
    image_size: int
    native: bool = False
    share: float | None = None
    level: float | None = None

    @property
    def shots(self) -> int:
        """K, the number of support pairs."""
        return int(self.feats.shape[1])


@dataclass
class Predictor:
    """A few-shot segmenter ready for inference, with its preprocessing and provenance.

    Attributes:
        net: a ``model.FewShotSegmenter`` in eval mode.
        image_size: ``S``, the square side the network was trained at (checkpoint ``image_size``).
        meta: checkpoint metadata (``model``, ``backbone``, ``image_size``, ``run_id``, ...).
        source: where the network came from (:class:`~pipeline.inference.resolve.ModelSource`).
    """

    net: torch.nn.Module
    image_size: int
    meta: dict[str, Any] = field(default_factory=dict)
    source: ModelSource = field(default_factory=lambda: ModelSource("in-memory"))
    _lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, spec: str | os.PathLike[str], *, tracking_uri: str | None = None,
             device: torch.device | str = "cpu") -> Predictor:
        """Resolve and load ``spec`` (checkpoint path, ``models:/...``, ``runs:/...``, MLflow model folder).

        Raises:
            pipeline.inference.resolve.ModelNotFoundError: unknown model, version, alias, run or path.
            pipeline.inference.model_file.CheckpointError: not a LERENet model file.
        """
        net, meta, source = open_model(spec, tracking_uri=tracking_uri, map_location=device)
        return cls(net.eval(), int(meta["image_size"]), dict(meta), source)

    @property
    def device(self) -> torch.device:
        """Where the network's parameters live (inputs are moved there)."""
        return _device_of(self.net)

    @property
    def presence_threshold(self) -> float | None:
        """The image-level presence gate ``tau`` (logit units) calibrated at training, ``None``: ungated
        (model files written before the gate, or ``train.presence_budget: null``)."""
        tau = self.meta.get("presence_threshold")
        return None if tau is None else float(tau)

    @property
    def presence_gate(self) -> PresenceGate:
        """The model file's whole presence gate (one threshold, or one for small supports and one for the rest)."""
        return PresenceGate.from_meta(self.meta)

    @property
    def transductive_steps(self) -> int | None:
        """Test-time refinement steps of the hypercolumn probe per query (``model.transductive_steps``, 0 = off);
        ``None``: the network has no hypercolumn probe to refine."""
        if not getattr(self.net, "refinable", False):  # LERENet.refinable; other models have no probe
            return None
        return int(self.net.transductive_steps)

    @contextmanager
    def transductive(self, steps: int | None) -> Iterator[None]:
        """Predict with ``steps`` refinement steps inside the block (``None``: the model file's setting), then
        restore it. Blocks of one predictor run one at a time (a lock: concurrent requests of a served model
        each see their own setting).

        Raises:
            PredictInputError: ``steps`` is not an integer in [0, ``MAX_TRANSDUCTIVE_STEPS``], or is > 0 for a network without a
                hypercolumn probe.
        """
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))
                                  or not 0 <= steps <= MAX_TRANSDUCTIVE_STEPS):
            raise PredictInputError(f"transductive_steps must be an integer in [0, {MAX_TRANSDUCTIVE_STEPS}], "
                                    f"got {steps!r}")
        if self.transductive_steps is None:
            if steps:
                raise PredictInputError(f"transductive_steps={steps}: model {self.meta.get('model')!r} has no "
                                        "hypercolumn probe to refine (model.priors); use 0")
            yield
            return
        with self._lock:
            before = self.net.transductive_steps
            self.net.transductive_steps = before if steps is None else int(steps)
            try:
                yield
            finally:
                self.net.transductive_steps = before

    @property
    def native_area(self) -> float | None:
        """SOFS non-resizing threshold of the model file (defect share of the image, ``(0, 1]``); ``None``: off."""
        return getattr(self.net, "native_area", None)  # validated float or None (model.base.check_native_area)

    def is_native(self, masks: Sequence[np.ndarray]) -> bool:
        """Whether a support set of original-size bool masks is segmented in native windows (any defect small)."""
        return any(native.is_small(m, self.native_area) for m in masks)

    @property
    def version(self) -> str | None:
        """Registered model version, ``None`` when not from the registry."""
        return self.source.version

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: uri, registered name, version, alias, run id, architecture, image size."""
        s = self.source
        return {"uri": s.uri, "registered_name": s.registered_name, "version": s.version, "alias": s.alias,
                "run_id": s.run_id, "model": self.meta.get("model"), "backbone": self.meta.get("backbone"),
                "image_size": self.image_size, "presence_threshold": self.presence_threshold,
                "presence_threshold_small": self.presence_gate.small_threshold,
                "presence_small_area": self.presence_gate.small_area,
                "presence_threshold_ref": self.presence_gate.reference_threshold,
                "presence_references": self.presence_gate.references,
                "presence_reference_area": self.presence_gate.reference_area,
                "transductive_steps": self.transductive_steps}

    # ---- preprocessing + backbone ---------------------------------------------------------------
    def image_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """N ``(H_i, W_i, 3)`` uint8 images -> ``(N, 3, S, S)`` float in [0, 1] on :attr:`device`."""
        return preprocess.image_batch(images, self.image_size).to(self.device)

    def mask_batch(self, masks: Sequence[np.ndarray]) -> torch.Tensor:
        """N ``(H_i, W_i)`` bool masks -> ``(N, 1, S, S)`` float in {0, 1} on :attr:`device`."""
        return preprocess.mask_batch(masks, self.image_size).to(self.device)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of preprocessed images: ``(N, 3, S, S)`` -> ``(N, Cb, h, w)`` (``net.encode``)."""
        return self.net.encode(images.to(self.device))

    def encode_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Backbone features of decoded images: N ``(H_i, W_i, 3)`` uint8 -> ``(N, Cb, h, w)``."""
        return self.encode(self.image_batch(images))

    def encode_support(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                       references: Sequence[np.ndarray] | None = None) -> SupportSet:
        """Encode the K support pairs once.

        Args:
            images: K ``(H_k, W_k, 3)`` uint8 RGB (any sizes). masks: K ``(H_k, W_k)`` bool, True = defect.
            references: R ``(H_r, W_r, 3)`` uint8 RGB *defect-free* images of the queries' surface, or ``None``.
                With a model file whose gate has a reference threshold (``train.presence_references``), the
                queries are gated relative to them (:class:`pipeline.inference.gate.PresenceGate`); the model
                files without one ignore them.

        Returns:
            :class:`SupportSet` on :attr:`device` (``level`` set when the references are used).

        Raises:
            PredictInputError: no support, images/masks count mismatch, a mask whose size differs
                from its image's, or an empty ``references`` list.
        """
        if len(images) == 0 or len(images) != len(masks):
            raise PredictInputError(f"need K >= 1 support images and as many masks, got {len(images)} and {len(masks)}")
        for k, (im, m) in enumerate(zip(images, masks)):
            if im.shape[:2] != np.asarray(m).shape:
                raise PredictInputError(f"support {k}: mask size {np.asarray(m).shape} != image size {im.shape[:2]}")
        share = float(np.mean([native.defect_share(m) for m in masks]))
        small = [native.is_small(m, self.native_area) for m in masks]
        is_native = any(small)
        if is_native:  # SOFS non-resizing: small defects cropped at native resolution, large ones resized whole
            boxes = [native.crop_box(m, self.image_size) if sm else None for m, sm in zip(masks, small)]
            images = [im if b is None else native.cut(im, b) for im, b in zip(images, boxes)]
            masks = [np.asarray(m) if b is None else native.cut(np.asarray(m), b) for m, b in zip(masks, boxes)]
        feats = self.encode_images(images)
        support = SupportSet(feats=feats[None], masks=self.mask_batch(masks)[None], image_size=self.image_size,
                             native=is_native, share=share)
        if references is not None:
            if len(references) == 0:
                raise PredictInputError("references: give at least one defect-free image, or none at all")
            if self.presence_gate.uses_references:
                support.level = self.support_level(support, references)
        return support

    def reference_levels(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                         reference_feats: torch.Tensor, shares: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`pipeline.inference.gate.reference_levels` with this network and the model file's reference area:
        ``(B,)`` float64 on the CPU."""
        return gate_mod.reference_levels(self.net, support_feats, support_masks, reference_feats.to(self.device),
                                         self.presence_gate.reference_area, shares)

    def support_level(self, support: SupportSet, references: Sequence[np.ndarray]) -> float:
        """The reference level (:meth:`reference_levels`) of one encoded support set and R decoded defect-free
        images ``(H_r, W_r, 3)`` uint8 (native windows: each stitched image's :func:`gate.presence_peak`)."""
        if support.native:
            share, area = self._support_shares(support, 1), self.presence_gate.reference_area
            tops = [float(gate_mod.presence_peak(torch.from_numpy(lg)[None, None], share, area)[0])
                    for lg in self._native_logits(support, references, gate=False)]
            return float(self.net.presence_log_odds(torch.tensor(tops)).max())
        return float(self.reference_levels(support.feats, support.masks, self.encode_images(references),
                                           self._support_shares(support, 1))[0])

    # ---- head + upsampling ----------------------------------------------------------------------
    @torch.inference_mode()
    def head(self, support_feats: torch.Tensor, support_masks: torch.Tensor, query_feats: torch.Tensor,
             gate: bool = True, shares: torch.Tensor | None = None,
             levels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits on the feature grid from encoded features (the step evaluation runs on cached features).

        Args:
            support_feats: ``(B, K, Cb, h, w)``. support_masks: ``(B, K, 1, S, S)`` float {0, 1}.
            query_feats: ``(B, Cb, h, w)``.

        Returns:
            ``(B, 1, h, w)`` float32 logits (``net.forward_features`` asked for the feature grid size),
            after the model file's presence gate (:func:`pipeline.training.gate.apply_gate`: a query
            whose max logit is below its threshold, :attr:`presence_gate`, gets no pixel > 0); ``gate=False``:
            before it (the native windows of one query are gated together, after stitching).
            shares: ``(B,)`` support size of each episode for the gate (:attr:`SupportSet.share`); ``None``: the
                mean defect share of ``support_masks``.
            levels: ``(B,)`` reference level of each episode (:meth:`reference_levels`; ``NaN``: none), or
                ``None``: the gate's reference score is used where given (:meth:`PresenceGate.gate`).
        """
        logits = self.net.forward_features(support_feats, support_masks, query_feats,
                                           tuple(query_feats.shape[-2:])).float()
        if not gate:
            return logits
        if shares is None:
            shares = support_shares(support_masks)
        return self.presence_gate.gate(logits, shares.cpu(), levels, self.net.presence_log_odds)

    @staticmethod
    @torch.inference_mode()
    def upsample(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Per query: bilinear (``align_corners=False``) upsampling of ``(1, h, w)`` logits to its ``(H, W)``.

        Args:
            logits: ``(B, 1, h, w)``. sizes: B original sizes ``(H, W)``.

        Returns:
            B ``(H, W)`` float logit tensors (on the logits' device). Queries of equal size are
            upsampled together.
        """
        out: list[torch.Tensor | None] = [None] * len(sizes)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, s in enumerate(sizes):
            groups.setdefault(tuple(s), []).append(j)
        for s, idx in groups.items():
            up = F.interpolate(logits[idx], size=s, mode="bilinear", align_corners=False)[:, 0]
            for n, j in enumerate(idx):
                out[j] = up[n]
        return out  # type: ignore[return-value]

    # ---- end to end -----------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_logits(self, support: SupportSet, queries: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Logits of a batch of queries at their original sizes, the support set reused (not re-encoded).

        Args:
            support: from :meth:`encode_support`. queries: N ``(H_i, W_i, 3)`` uint8 images, any sizes.

        Returns:
            N ``(H_i, W_i)`` float32 arrays: defect where > 0.
        """
        if not queries:
            return []
        if support.native:
            return self._native_logits(support, queries)
        logits = self._support_head(support, self.encode_images(queries))
        return [u.cpu().numpy() for u in self.upsample(logits, [im.shape[:2] for im in queries])]

    def _support_head(self, support: SupportSet, query_feats: torch.Tensor, gate: bool = True) -> torch.Tensor:
        """:meth:`head` of a batch of query features ``(B, Cb, h, w)`` with ``support`` expanded over the batch."""
        b = query_feats.shape[0]
        return self.head(support.feats.expand(b, *support.feats.shape[1:]),
                         support.masks.expand(b, *support.masks.shape[1:]), query_feats, gate=gate,
                         shares=self._support_shares(support, b), levels=self._support_levels(support, b))

    @staticmethod
    def _support_levels(support: SupportSet, b: int) -> torch.Tensor | None:
        """``(b,)`` reference level of ``support`` for a batch of ``b`` queries, ``None`` without references."""
        return None if support.level is None else torch.full((b,), support.level, dtype=torch.float64)

    @staticmethod
    def _support_shares(support: SupportSet, b: int) -> torch.Tensor:
        """``(b,)`` gate support size of ``support`` for a batch of ``b`` queries: :attr:`SupportSet.share` (from the
        original masks), else :func:`support_shares` of its masks."""
        if support.share is None:
            return support_shares(support.masks).expand(b)
        return torch.full((b,), support.share, dtype=torch.float64)

    def _native_logits(self, support: SupportSet, queries: Sequence[np.ndarray], gate: bool = True) -> list[np.ndarray]:
        """SOFS non-resizing: each query cut into ``S x S`` native windows (:func:`native.windows`), every window
        segmented with the support, logits upsampled to the window, stitched (overlaps averaged), then gated
        (``gate=False``: not)."""
        boxes = [native.windows(*im.shape[:2], self.image_size) for im in queries]
        crops = [native.cut(im, b) for im, bs in zip(queries, boxes) for b in bs]
        tiles: list[np.ndarray] = []
        for s in range(0, len(crops), 16):
            logits = self._support_head(support, self.encode_images(crops[s:s + 16]), gate=False)
            tiles += [u.cpu().numpy() for u in self.upsample(logits, [c.shape[:2] for c in crops[s:s + 16]])]
        shares, levels = self._support_shares(support, 1), self._support_levels(support, 1)
        out, first = [], 0
        for im, bs in zip(queries, boxes):
            whole = native.stitch(tiles[first:first + len(bs)], bs, im.shape[:2])
            first += len(bs)
            if gate:
                whole = self.presence_gate.gate(torch.from_numpy(whole)[None, None], shares, levels,
                                                self.net.presence_log_odds)[0, 0].numpy()
            out.append(whole)
        return out

    def predict_probabilities(self, support: SupportSet, queries: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Defect probabilities ``sigmoid(logits)`` of :meth:`predict_logits`: N ``(H_i, W_i)`` float32 in [0, 1]."""
        return [torch.sigmoid(torch.from_numpy(lg)).numpy() for lg in self.predict_logits(support, queries)]

    def segment(self, support_images: Sequence[np.ndarray], support_masks: Sequence[np.ndarray],
                query_image: np.ndarray, references: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """One query from its K-shot support set, end to end from decoded pixels.

        Args:
            support_images: K ``(h_k, w_k, 3)`` uint8 RGB. support_masks: K ``(h_k, w_k)`` bool.
            query_image: ``(H, W, 3)`` uint8 RGB. references: defect-free images (:meth:`encode_support`).

        Returns:
            ``(H, W)`` float32 logits at the query's original size (defect where > 0).

        Raises:
            PredictInputError: as :meth:`encode_support`.
        """
        return self.predict_logits(self.encode_support(support_images, support_masks, references), [query_image])[0]
