"""Stored models and their registry: safetensors headers (`header`), training checkpoints (`checkpoint`), the
manifest of shipped models (`manifest`), model names and recorded choices (`names`), `StoredModel` (`stored`)
and export (`export`)."""
from .export import ShippedModelExists, build_gmm_asset, export_model
from .header import StoredFileError
from .manifest import ASSET_DIR, ASSETS_ENV, EMBEDDED, MANIFEST_FORMAT, ManifestError, assets_dir, check_assets, \
    read_manifest
from .names import DEFAULT_SCHEDULE, MODELS, SCHEDULES, default_model, fitted_grids, is_model_file, model_family, \
    sampler_defaults, set_default, set_fitted_grids, set_learned_grids, set_sampler_defaults, set_scores, \
    shipped_models
from .stored import GMM_ASSET, StoredModel, build_model

__all__ = ["ShippedModelExists", "build_gmm_asset", "export_model", "StoredFileError", "ASSET_DIR", "ASSETS_ENV",
           "EMBEDDED", "MANIFEST_FORMAT", "ManifestError", "assets_dir", "check_assets", "read_manifest",
           "DEFAULT_SCHEDULE", "MODELS", "SCHEDULES", "default_model", "fitted_grids", "is_model_file",
           "model_family", "sampler_defaults", "set_default", "set_fitted_grids", "set_learned_grids",
           "set_sampler_defaults", "set_scores",
           "shipped_models", "GMM_ASSET", "StoredModel", "build_model"]
