"""Blueoil's classification networks, one table each (``blueoil/networks/classification``).

Each row is a layer in forward order; its name is the module's attribute name,
so the ``state_dict`` keys (and the C++ models and the deploy converter, which
match parameters by name) follow from these tables. In the quantized variant,
``weights=`` says when a convolution's weights are quantized (``FIRST`` /
``LAST``: by the ``quantize_first_convolution`` / ``quantize_last_convolution``
flags; otherwise always) and ``act=`` which activations stay float (otherwise
the activation quantizer replaces them). See :mod:`torch_ext.networks.spec`.
"""

from __future__ import annotations

from ..weight_quantization import binary_channel_wise_mean_scaling_quantize
from .spec import (
    FIRST,
    FLOAT,
    QUANTIZER_IF_LAST,
    RESNET_BN_MOMENTUM,
    NetworkSpec,
    activation,
    batch_norm,
    classifier,
    conv,
    conv_bn,
    dropout,
    global_pool,
    leaky_relu,
    linear,
    max_pool,
    resnet_group,
    space_to_depth,
)

__all__ = ["DARKNET", "LMNET_V0", "LMNET_V1", "LM_RESNET", "SAMPLE_NETWORK"]

#: ``quantize_example.py``: one block, then the classifier.
SAMPLE_NETWORK = NetworkSpec(
    blueoil="classification/quantize_example.py",
    float_activation=leaky_relu, init="he_truncated_normal", quantize_first=True, quantize_last=True,
    layers=(
        conv_bn("block_1", 32, 3, weights=FIRST),
        classifier("block_last"),
        global_pool("pool"),
    ),
)

#: ``lmnet_v1.py``: space-to-depth instead of pooling, so H and W must divide by 8.
LMNET_V1 = NetworkSpec(
    blueoil="classification/lmnet_v1.py", input_size_multiple=8,
    layers=(
        conv_bn("conv1", 32, 3, weights=FIRST),
        conv_bn("conv2", 64, 3),
        space_to_depth("pool2"),
        conv_bn("conv3", 128, 3),
        conv_bn("conv4", 64, 3),
        space_to_depth("pool4"),
        conv_bn("conv5", 128, 3),
        space_to_depth("pool5"),
        conv_bn("conv6", 64, 1, act=FLOAT),  # Blueoil keeps tf.nn.relu here in the quantized network
        dropout("dropout"),
        classifier("conv7"),
        global_pool("pool7"),
    ),
)

#: ``lmnet_v0.py``: LMNet with 'SAME' max pools, so any input size works.
LMNET_V0 = NetworkSpec(
    blueoil="classification/lmnet_v0.py",
    layers=(
        conv_bn("conv1", 32, 3, weights=FIRST), max_pool("pool1"),
        conv_bn("conv2", 64, 3), max_pool("pool2"),
        conv_bn("conv3", 128, 3), max_pool("pool3"),
        conv_bn("conv4", 256, 3), max_pool("pool4"),
        conv_bn("conv5", 256, 3), max_pool("pool5"),
        conv_bn("conv6", 64, 1, act=FLOAT),  # as LMNet v1: a plain ReLU
        dropout("dropout"),
        classifier("conv7"),
        global_pool("pool7"),
    ),
)

#: ``lm_resnet.py``: ResNet-18 for small images; quantized weights in the groups only (Blueoil's
#: variable getter), so conv0 is FIRST (default False) and the fully connected classifier stays float.
LM_RESNET = NetworkSpec(
    blueoil="classification/lm_resnet.py", bn_momentum=RESNET_BN_MOMENTUM, input_size_multiple=8,
    quantize_first=False, quantize_last=False,
    layers=(
        conv("conv0", 64, 3, weights=FIRST),
        resnet_group("group0", 64, blocks=2, stride=1),
        resnet_group("group1", 128, blocks=2, stride=2),
        resnet_group("group2", 256, blocks=2, stride=2),
        resnet_group("group3", 512, blocks=2, stride=2),
        batch_norm("bn"),
        activation("relu", FLOAT),  # a plain ReLU in the quantized network too
        global_pool("gap"),
        linear("linear"),
    ),
)

#: ``darknet.py``: Darknet-19; Blueoil's Darknet configs quantize weights binary channel-wise.
DARKNET = NetworkSpec(
    blueoil="classification/darknet.py",
    float_activation=leaky_relu, init="lecun_truncated_normal",
    weight_quantizer=binary_channel_wise_mean_scaling_quantize, quantize_first=True, quantize_last=True,
    layers=(
        conv_bn("block_1", 32, 3, weights=FIRST), max_pool("pool_1"),
        conv_bn("block_2", 64, 3), max_pool("pool_2"),
        conv_bn("block_3", 128, 3),
        conv_bn("block_4", 64, 1),
        conv_bn("block_5", 128, 3), max_pool("pool_3"),
        conv_bn("block_6", 256, 3),
        conv_bn("block_7", 128, 1),
        conv_bn("block_8", 256, 3), max_pool("pool_4"),
        conv_bn("block_9", 512, 3),
        conv_bn("block_10", 256, 1),
        conv_bn("block_11", 512, 3),
        conv_bn("block_12", 256, 1),
        conv_bn("block_13", 512, 3), max_pool("pool_5"),
        conv_bn("block_14", 1024, 3),
        conv_bn("block_15", 512, 1),
        conv_bn("block_16", 1024, 3),
        conv_bn("block_17", 512, 1),
        conv_bn("block_18", 1024, 3, act=QUANTIZER_IF_LAST),  # leaky ReLU when conv_19 stays float
        classifier("conv_19"),
        global_pool("pool_6"),
    ),
)
