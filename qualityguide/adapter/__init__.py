"""IQA-Adapter: condition generation on target quality (scores, percentiles, or a reference image's features).

Decoupled cross-attention as in IP-Adapter, wired through diffusers' own IP-Adapter path (docs/design.md
section 6; Abud et al., ICCV 2025, arXiv 2412.01794).
"""

from .conditions import ScoreQuantiles
from .model import IQAAdapter, IQAAdapterConfig, ReferenceIQAAdapter
from .wiring import AdapterCallError, cross_attention_layers

__all__ = ["AdapterCallError", "IQAAdapter", "IQAAdapterConfig", "ReferenceIQAAdapter", "ScoreQuantiles",
           "cross_attention_layers"]
