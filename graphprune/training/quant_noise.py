"""Quant-Noise (Fan et al. 2020, "Training with Quantization Noise for Extreme Model
Compression"): quantization-aware training where each step quantizes only a random
share of the weights.

Plain QAT rounds every weight in every forward pass, so the straight-through gradient
of a weight never sees how its neighbours' rounding errors compound; Quant-Noise
rounds a random fraction ``p`` of weight blocks per forward pass and leaves the rest
float, which the paper finds trains better for low bit widths. For a weight ``W``
(rows x inputs) cut into blocks ``b`` of ``block`` consecutive inputs of one row::

    W_noisy[b] = q(W)[b]   with probability p (each block drawn independently)
               = W[b]      otherwise,

with the gradient passed straight through both kinds of block. ``p = 1`` is ordinary
QAT; evaluation always uses the fully quantized weights.

The rounding lives in the quantize pass's weight quantizers (``passes``, which this
package never imports); this callback only switches them on for the duration of
:func:`graphprune.finetune`, recognising them by their ``noise_fraction`` and
``noise_block`` attributes on a parametrization of a tensor named ``weight``. The
operands MASE quantizes with ``weight_`` keys that are activations (the attention
keys and values) are left fully quantized: Quant-Noise is about parameters.

The paper's other mode, dropping blocks (zeroing them, scaled by ``1 / (1 - p)``, as
fairseq's ``quant_noise`` wrapper does ahead of product quantization), is not
implemented: with graphprune's simulated formats the quantized value is at hand, so
the quantization noise itself is applied.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize


def weight_quantizers(module: nn.Module) -> list[nn.Module]:
    """The modules parametrizing a ``weight`` tensor of ``module`` that take quantization noise."""
    found = []
    for m in module.modules():  # each shared module (ALBERT's layer) once
        if parametrize.is_parametrized(m, "weight"):
            found.extend(p for p in m.parametrizations["weight"] if hasattr(p, "noise_fraction"))
    return found


class QuantNoise:
    """Finetune callback: weight quantizers round a random share ``p`` of ``block``-element blocks.

    Needs a graph the ``quantize`` pass gave weight formats; ``on_train_end`` (which
    ``finetune`` also runs after an error) sets the quantizers back to no noise, so the
    graph evaluates, saves and exports exactly as before.

    Example:
        >>> q_graph, _ = graphprune.run_pass(graph, "quantize", {"linear": {"name": "integer",
        ...     "data_in_width": 8, "data_in_frac_width": 4, "weight_width": 4, "weight_frac_width": 3,
        ...     "bias_width": 8, "bias_frac_width": 4}})
        >>> graphprune.finetune(q_graph, train, tok, quant_noise=0.1)   # builds QuantNoise(0.1, block=8)
    """

    def __init__(self, p: float, block: int = 8):
        if not 0 <= p <= 1:
            raise ValueError(f"finetune: quant_noise = {p!r} is not allowed; expected a fraction in [0, 1]")
        if not (isinstance(block, int) and block >= 1):
            raise ValueError(f"finetune: quant_noise_block = {block!r} is not allowed; expected an integer >= 1")
        self.p = p
        self.block = block
        self._quantizers: list[nn.Module] = []

    def on_train_begin(self, graph, total_steps: int) -> None:
        quantizers = weight_quantizers(graph.module)
        if not quantizers:
            raise ValueError(
                f"finetune: quant_noise = {self.p!r} needs a quantized graph (run the 'quantize' pass with weight formats first)"
            )
        for q in quantizers:
            q.noise_fraction, q.noise_block = self.p, self.block
        self._quantizers = quantizers

    def on_train_end(self, graph) -> None:
        # also whatever the graph holds now, in case a callback swapped modules during training
        for q in {id(q): q for q in self._quantizers + weight_quantizers(graph.module)}.values():
            q.noise_fraction = 0.0
        self._quantizers = []
