"""Blueoil's classification networks as data, and the builder that makes modules of them.

* :mod:`~torch_ext.networks.tables`: one table per network (start here).
* :mod:`~torch_ext.networks.spec`: what a table row can say.
* :mod:`~torch_ext.networks.builder`: table -> float or quantized modules,
  and the base class of the public networks in :mod:`torch_ext.models`.
* :mod:`~torch_ext.networks.layers` and :mod:`~torch_ext.networks.quantizers`:
  the building blocks and the checked quantizer settings.

The public names (``LmnetV1Quantize``, ``get_model``, ...) live in
:mod:`torch_ext.models`; this package is how they are made.
"""
