"""Compression of a document's KV cache as a download: at an explicit ratio, else at the stored profile's budgets at
τ, else at the predicted ratio (from the features of the same prefill; stored in ``predictions``), serialised as
safetensors."""

from __future__ import annotations

from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.inputs import CalibrationParams, DocumentInput
from kvcalib.service.limits import SyncLimiter
from kvcalib.service.predictions import Predictors, user_params_errors
from kvcalib.service.runtime import EngineLoader, load_at, model_info
from kvcalib.service.validation import RequestValidator
from kvcalib.service.views import CompressedCache, CompressionInfo


class Compressor:
    def __init__(self, db: Database, validator: RequestValidator, predictors: Predictors, load_engine: EngineLoader,
                 limiter: SyncLimiter):
        self.db, self.validator, self.predictors, self.load_engine = db, validator, predictors, load_engine
        self.limiter = limiter

    def compress(self, doc: DocumentInput, p: CalibrationParams, ratio: float | None = None) -> CompressedCache:
        """Compress the document's KV cache at ``ratio`` (else the stored profile's budgets at τ, else the
        predicted ratio) and serialise it as safetensors (``kvcalib.calib.cache.export``)."""
        import torch

        from kvcalib.calib.budget import Budget, select_topk
        from kvcalib.calib.cache.export import cache_to_safetensors
        from kvcalib.calib.cache.ragged import RaggedKVCache
        from kvcalib.calib.calibration.calibrate import budgets_at, featurize

        self.validator.check_local_device(p)  # the model runs here: a device this process lacks is a 422
        config = self.validator.config(p)
        info = model_info(p.model)
        with self.db.session() as s:
            resolved = self.validator.document(s, doc, info, persist=True,
                                              keep_text=False)  # hash-only mode: never the text
            profile = None if ratio is not None else repo.find_budget(
                s, content_hash=resolved.content_hash, model_name=info.name, tolerance=p.tolerance, method=p.method,
                allocator=p.allocator, dtype=p.dtype)
            assert resolved.row is not None  # persisted
            doc_id = resolved.row.id

        def work() -> CompressedCache:  # in a slot of the limiter: 429 past the cap, 503 past the time limit
            ratio_, source, version = ratio, "ratio", None  # CompressSource
            engine = load_at(self.load_engine, p.model, p.dtype, p.device)
            with user_params_errors(p):
                feats, cap, scores = featurize(engine, resolved.text, config)  # scores: (L, Hkv, N)
                counts = None
                if ratio_ is None and profile is not None:
                    ratio_, source = float(profile.ratio), "profile"
                    if len(profile.head_budgets) == scores.shape[0] and profile.context_tokens == scores.shape[-1]:
                        counts = torch.tensor(profile.head_budgets, dtype=torch.long)  # (L, Hkv) the stored budgets
                elif ratio_ is None:  # the prediction from the features just computed (no second prefill)
                    predictor = self.predictors.for_request(config, p)
                    r, version = float(predictor.predict([feats])[0]), predictor.version
                    ratio_, source = min(max(r, 0.0), max(config.ratios), 0.999), "predicted"
                if counts is None:
                    _, head_budgets = budgets_at(scores, ratio_, p.allocator, **config.allocator_params)
                    counts = torch.as_tensor(head_budgets, dtype=torch.long)  # (L, Hkv)
                keep = select_topk(scores, counts)  # (L, Hkv, N) bool
                cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
            if source == "predicted":
                self.predictors.store(content_hash=resolved.content_hash, model=info.name,
                                      model_revision=info.revision, config=config, ratio=ratio_,
                                      token_budget=Budget(ratio=ratio_).per_head(int(cap.num_tokens)),
                                      context_tokens=int(cap.num_tokens), predictor=predictor,
                                      predictor_version=version, features=feats, dtype=p.dtype)
            meta = CompressionInfo(model=info.name, model_revision=info.revision, method=p.method,
                                   allocator=p.allocator, tolerance=p.tolerance, ratio=float(ratio_),
                                   budget_source=source, document_hash=resolved.content_hash, document_id=doc_id,
                                   predictor_version=version)
            data = cache_to_safetensors(cache, cap.input_ids, meta.metadata())
            return CompressedCache(data=data, info=meta, achieved_ratio=1.0 - float(keep.float().mean()),
                                   context_tokens=int(cap.num_tokens))

        return self.limiter.run(work)
