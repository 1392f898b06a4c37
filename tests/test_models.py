"""The paper's networks: parameter counts, full-precision boundaries, precision as data."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lbq.models import get_model
from lbq.quant import quantize_weight
from lbq.quant.layers import QuantActivation, split_learned_ranges
from lbq.quant.precision import make_precision, unit_index

IMAGENET = {"resnet18", "resnet34", "resnet50", "alexnet"}


def _input(name, batch=2):
    size = 224 if name in IMAGENET else 32
    return jnp.zeros((batch, size, size, 3), jnp.float32)


def _param_count(name):
    model = get_model(name, num_classes=1000 if name in IMAGENET else 10)
    precision = make_precision(model.layer_names(), 2, 2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _input(name), precision))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))


# Published counts, with BatchNorm scale/shift and the classifier bias included.
# CIFAR ResNets (He et al. 2016, Table 6: 0.27M / 0.46M / 0.85M), exact for option-A shortcuts.
# ImageNet ResNets: torchvision's counts. PreResNet-20 moves the stem BN to the end: same count.
PUBLISHED = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "preresnet20": 269_722,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    assert _param_count(name) == PUBLISHED[name]


def test_alexnet_count_is_torchvision_with_batchnorm():
    """torchvision AlexNet has 61,100,840 parameters. AlexNet-BN drops the biases of the five
    convs and two hidden dense layers (BN shifts replace them) and adds BN scale and shift."""
    hidden_widths = [64, 192, 384, 256, 256, 4096, 4096]
    delta = -sum(hidden_widths) + 2 * sum(hidden_widths)
    assert _param_count("alexnet") == 61_100_840 + delta


def test_cifar_alexnet_count_by_hand():
    """No published count exists for the 32x32 variant; this is the hand count."""
    convs = [(3, 64, 5), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
    count = sum(k * k * i * o + 2 * o for i, o, k in convs)
    count += 256 * 4 * 4 * 1024 + 2 * 1024 + 1024 * 1024 + 2 * 1024 + 1024 * 10 + 10
    assert _param_count("alexnet_cifar") == count


def _call_inputs(model, variables, x, precision, module_name):
    """The inputs and kernel seen by the submodule ``module_name`` during a forward pass."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.module.name == module_name and context.method_name == "__call__":
            seen["inputs"] = args[0]
            seen["output"] = next_fun(*args, **kwargs)
            return seen["output"]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, x, precision)
    return seen


@pytest.mark.parametrize(
    "name", ["resnet20", "preresnet20", pytest.param("alexnet_cifar", marks=pytest.mark.slow)]
)
def test_first_conv_and_classifier_are_full_precision(name):
    model = get_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    precision = make_precision(model.layer_names(), 1, 1)
    variables = model.init(jax.random.key(1), x, precision)
    params = variables["params"]

    stem_name = "conv1" if name.startswith("alexnet") else "stem"
    stem = params[stem_name]["kernel"]
    pad = stem.shape[0] // 2
    want = jax.lax.conv_general_dilated(
        x, stem, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = _call_inputs(model, variables, x, precision, stem_name)["output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(quantize_weight(stem, 1), stem)  # a quantized stem would differ

    seen = _call_inputs(model, variables, x, precision, "classifier")
    dense = params["classifier"]
    np.testing.assert_allclose(
        seen["output"], seen["inputs"] @ dense["kernel"] + dense["bias"], rtol=1e-5, atol=1e-5
    )
    # The classifier's input is not on a 1-bit activation grid.
    assert len(np.unique(np.asarray(seen["inputs"]))) > 10


def test_block_activations_are_quantized():
    model = get_model("resnet20", num_classes=10)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    precision = make_precision(model.layer_names(), 2, 2)
    variables = model.init(jax.random.key(1), x, precision)
    (_, features), _ = model.apply(variables, x, precision, train=True, mutable=["batch_stats"])
    values = np.unique(np.asarray(features["stage1"]))
    np.testing.assert_allclose(values, [0, 1 / 3, 2 / 3, 1], atol=1e-6)


@pytest.mark.parametrize(
    "name",
    [
        "resnet20",
        "preresnet20",
        pytest.param("resnet18", marks=pytest.mark.slow),
        pytest.param("resnet50", marks=pytest.mark.slow),
        "alexnet_cifar",
    ],
)
def test_conv_input_placement_quantizes_each_layers_input_and_nothing_else(name):
    """activation_placement='conv_input' (SPEC section 9): every quantized conv and dense layer
    reads 2-bit codes of its input through its own quantizer, block outputs stay ReLU outputs,
    and with the quantize switch off (stochastic precision) LSQ's network is the plain-ReLU
    network on the same weights."""
    options = {"weight_quantizer": "lsq", "activation_quantizer": "lsq"}
    model = get_model(name, num_classes=10, activation_placement="conv_input", **options)
    names = model.layer_names()
    x = jax.random.normal(jax.random.key(0), _input(name).shape)
    precision = make_precision(names, 2, 2)
    variables = model.init(jax.random.key(1), x, precision)
    codes = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, QuantActivation) and context.method_name == "__call__":
            codes[context.module.parent.name] = np.asarray(out)
        return out

    with nn.intercept_methods(record):
        (_, features), _ = model.apply(variables, x, precision, train=True, mutable=["batch_stats"])
    # the module of each layer: "stage1_block0/conv1" -> "stage1_block0_conv1", "fc6/dense" -> "fc6"
    layers = {
        n.split("/")[0] if n.endswith(("/conv", "/dense")) else n.replace("/", "_") for n in names
    }
    assert set(codes) == layers  # one input quantizer per quantized layer, nothing else
    for layer, out in codes.items():
        value_range = float(variables["params"][layer]["input_quantizer"]["range"])
        levels = out * 3 / value_range
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-4, err_msg=layer)
    for stage, value in features.items():  # block outputs are full precision, not on a grid
        assert len(np.unique(np.asarray(value))) > 4, stage
    off = model.apply(variables, x, make_precision(names, 2, 2, quantize=0.0))[0]
    plain = get_model(name, num_classes=10, quantized=False)
    rest, _ = split_learned_ranges(variables["params"])
    fp = plain.apply({"params": rest, "batch_stats": variables["batch_stats"]}, x)[0]
    np.testing.assert_allclose(off, fp, rtol=1e-5, atol=1e-6)


def test_changing_precision_does_not_recompile():
    model = get_model("resnet20", num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    names = model.layer_names()
    variables = model.init(jax.random.key(1), x, make_precision(names, 2, 2))
    apply = jax.jit(lambda v, x, p: model.apply(v, x, p)[0])
    outputs = []
    for w, a, mask in [(2, 2, 1.0), (4, 4, 1.0), (8, 8, 0.0), (32, 32, 1.0)]:
        outputs.append(apply(variables, x, make_precision(names, w, a, quantize=mask)))
    assert apply._cache_size() == 1
    assert not np.allclose(outputs[0], outputs[1])


def test_zero_mask_equals_32_bits():
    model = get_model("resnet20", num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    names = model.layer_names()
    variables = model.init(jax.random.key(1), x, make_precision(names, 2, 2))
    off = model.apply(variables, x, make_precision(names, 2, 2, quantize=0.0))[0]
    fp = model.apply(variables, x, make_precision(names, 32, 32))[0]
    np.testing.assert_allclose(off, fp, rtol=1e-6)


def test_full_precision_network_uses_relu_and_needs_no_precision():
    model = get_model("resnet20", num_classes=10, quantized=False)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), x)
    (_, features), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert float(jnp.max(features["stage1"])) > 1.0  # ReLU is not clipped at 1


def test_network_returns_stage_outputs_and_names_blocks():
    model = get_model("resnet20", num_classes=10)
    names = model.layer_names()
    assert model.blocks()[0] == "stage1_block0" and len(model.blocks()) == 9
    assert "stage2_block0/conv1" in names
    blocks, index = unit_index(names, "block")
    assert len(blocks) == 9 and index.shape == (len(names),)
    x = jnp.zeros((2, 32, 32, 3))
    precision = make_precision(names, 2, 2)
    variables = model.init(jax.random.key(1), x, precision)
    _, features = model.apply(variables, x, precision)
    assert [f.shape for f in features.values()] == [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64)]


def test_bfloat16_compute():
    model = get_model("resnet20", num_classes=10, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    precision = make_precision(model.layer_names(), 4, 4)
    variables = model.init(jax.random.key(1), x, precision)
    logits, features = model.apply(variables, x, precision)
    assert features["stage1"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model.name='resnet21'.*resnet20"):
        get_model("resnet21", num_classes=10)


@pytest.mark.parametrize(
    "name,shape,match",
    [
        ("resnet20", (2, 4, 4, 3), r"input shape \(2, 4, 4, 3\).*>= 8"),
        ("resnet20", (32, 32, 3), r"input shape \(32, 32, 3\)"),
        ("resnet18", (2, 16, 16, 3), r"input shape.*>= 32"),
        ("alexnet", (2, 32, 32, 3), r"input shape.*>= 224"),
    ],
)
def test_bad_input_shape(name, shape, match):
    model = get_model(name, num_classes=10)
    precision = make_precision(model.layer_names(), 2, 2)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), precision))


def test_missing_or_wrong_precision():
    model = get_model("resnet20", num_classes=10)
    x = jnp.zeros((2, 32, 32, 3))
    with pytest.raises(ValueError, match="needs a precision spec with 18 layers"):
        model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="has 18 quantized layers"):
        model.init(jax.random.key(0), x, make_precision(["a/b"], 2, 2))


def test_make_precision_per_block_and_errors():
    names = get_model("resnet20", num_classes=10).layer_names()
    p = make_precision(names, 2, 2, block_bits={"stage1_block0": (4, 8)})
    assert p.w_bits[0] == 4 and p.a_bits[0] == 8 and p.w_bits[2] == 2
    with pytest.raises(ValueError, match="unknown blocks.*'nope'"):
        make_precision(names, 2, 2, block_bits={"nope": (4, 4)})
    with pytest.raises(ValueError, match="a_bits=0"):
        make_precision(names, 2, 0)
