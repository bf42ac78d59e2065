"""timm's model conventions, checked on every registered ELSA-Swin the way timm's own model tests check
its models: default cfgs and the head API, backward, gradient checkpointing, forward_intermediates,
FX tracing (and TorchScript of the traced model), TorchScript, reset_classifier on the meta device,
group_matcher; and gradients in their parameters' layout, which DistributedDataParallel requires.

Models are built at 64x64 (the stages adapt) so that the four sizes stay fast on a small CPU."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from timm.models._manipulate import group_parameters
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import elsa_swin  # noqa: F401  (registers the models)

MODELS = timm.list_models("elsa_swin_*")
IMG = 64


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=IMG, **kwargs)


def _fx_model(model: torch.nn.Module) -> torch.fx.GraphModule:
    """The traced model of timm's tests: timm's leaf modules and functions, the last node returned."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


def test_every_size_is_registered():
    assert MODELS == ["elsa_swin_base", "elsa_swin_nano", "elsa_swin_small", "elsa_swin_tiny"]


@pytest.mark.parametrize("name", MODELS)
def test_default_cfg_names_and_widths(name):
    """Every size, built on the meta device (no memory, no init): what timm's default-cfg test reads."""
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features == model.head_hidden_size == model.embed_dim * 8
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    assert [f["num_chs"] for f in model.feature_info] == [model.embed_dim * 2**i for i in range(4)]
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, 1000)
    model.reset_classifier(0)
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ["elsa_swin_nano", "elsa_swin_tiny"])
def test_default_cfg_and_head_api(name):
    model = _model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    assert model.num_features == model.head_hidden_size > 0
    state_dict = model.state_dict()
    assert cfg["classifier"] + ".weight" in state_dict and cfg["first_conv"] + ".weight" in state_dict
    x = torch.randn(1, 3, IMG, IMG)
    grid = IMG // 32  # the cfg's pool_size (7, 7) at 224, scaled to the input
    with torch.no_grad():
        feats = model.forward_features(x)  # NHWC (model.output_fmt), unpooled
        assert model.output_fmt == "NHWC" and feats.shape == (1, grid, grid, model.num_features)
        pre_logits = model.forward_head(feats, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        assert model(x).shape == (1, 1000)
        model.reset_classifier(0)
        assert model.num_classes == 0
        torch.testing.assert_close(model(x), pre_logits)  # no head: the pooled features
        model.reset_classifier(0, "")
        assert model(x).shape == (1, grid, grid, model.num_features)
        no_head = _model(name, num_classes=0, global_pool="").eval()
        assert no_head(x).shape == (1, grid, grid, model.num_features)


def test_default_cfg_pool_size_at_the_cfg_input_size():
    model = timm.create_model("elsa_swin_nano").eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, *cfg["input_size"]))
    assert tuple(feats.shape[1:3]) == cfg["pool_size"]


@pytest.mark.parametrize("name", ["elsa_swin_nano", "elsa_swin_tiny"])
def test_backward_reaches_every_parameter(name):
    model = _model(name, num_classes=42).train()
    out = model(torch.randn(2, 3, IMG, IMG))
    out.mean().backward()
    assert out.shape == (2, 42) and not out.isnan().any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model = _model("elsa_swin_nano", num_classes=5, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, IMG, IMG)
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for stage in model.layers)
    out2 = model(x)
    out2.square().sum().backward()
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["elsa_swin_nano", "elsa_swin_tiny"])
def test_forward_intermediates(name):
    model = _model(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == len(info.channels()) == 4
        for channels, reduction, feat in zip(info.channels(), info.reduction(), intermediates, strict=True):
            assert feat.shape == (1, channels, math.ceil(IMG / reduction), math.ceil(IMG / reduction))
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        torch.testing.assert_close(only, [intermediates[1], intermediates[3]], rtol=0, atol=0)
        model.set_grad_checkpointing()
        final3, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final3, final, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    features = timm.create_model(name, img_size=IMG, features_only=True, feature_cls="getter").eval()
    with torch.no_grad():
        outs = features(x)
    assert [o.shape[1] for o in outs] == features.feature_info.channels() == info.channels()


def test_fx_traced_model_matches_and_trains():
    name = "elsa_swin_nano"
    model = _model(name).eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.inference_mode():
        out = model(x)
        fx = _fx_model(model)
        fx_out = torch.cat(tuple(fx(x).values()))
    assert torch.equal(fx_out, out)
    # The ELSA operator is one leaf call, not traced into its Python checks.
    targets = [n.target for n in fx.graph.nodes if n.op == "call_function"]
    assert sum(getattr(t, "__name__", "") == "elsa_layer_op" for t in targets) == sum(
        1 for m in model.modules() if type(m).__name__ == "ELSAAttention"
    )

    train = _model(name, num_classes=42).train()
    fx_train = _fx_model(train)
    outputs = torch.cat(tuple(fx_train(torch.randn(2, 3, IMG, IMG)).values()))
    outputs.mean().backward()
    assert outputs.shape == (2, 42)
    assert [n for n, p in fx_train.named_parameters() if p.grad is None] == []


def test_fx_traced_model_scripts():
    with timm.layers.set_scriptable(True):
        model = _model("elsa_swin_nano").eval()
    x = torch.randn(1, 3, IMG, IMG)
    scripted = torch.jit.script(_fx_model(model))
    with torch.inference_mode():
        want = model(x)
        got = torch.cat(tuple(scripted(x).values()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_scripted_layer_refuses_the_reference_backend():
    scripted = torch.jit.script(_model("elsa_swin_nano", backend="reference").eval())
    with pytest.raises(torch.jit.Error, match="compiled operator only"):
        scripted(torch.randn(1, 3, IMG, IMG))


def test_torchscript():
    with timm.layers.set_scriptable(True):
        model = _model("elsa_swin_nano").eval()
    x = torch.randn(1, 3, IMG, IMG)
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_reset_classifier_follows_the_model_device_and_dtype(device):
    model = _model("elsa_swin_nano").to(device=device, dtype=torch.float64)
    model.reset_classifier(0)  # the head has no parameters left to go by
    model.reset_classifier(2)
    assert model.num_classes == 2 and model.head.fc.out_features == 2
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {(device, torch.float64)}
    assert model(torch.randn(1, 3, IMG, IMG, device=device, dtype=torch.float64)).shape == (1, 2)


def test_group_matcher_covers_every_parameter_in_order():
    model = _model("elsa_swin_nano")
    names = {n for n, _ in model.named_parameters()}
    for coarse in (True, False):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        assert sorted(n for members in groups.values() for n in members) == sorted(names)
        first, *_, last = groups.values()
        assert all(n.startswith("patch_embed.") for n in first)
        assert any(n.startswith("head.") for n in last)  # the head goes last (layer decay leaves it whole)
    # One group per block (a stage's patch merging goes with its first block, the final norm with the last),
    # or per stage when coarse, as timm's Swin groups them for layer-wise lr decay.
    blocks = sum(len(stage.blocks) for stage in model.layers)
    assert len(group_parameters(model, model.group_matcher(coarse=False))) == 1 + blocks + 1
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 1 + len(model.layers) + 1


# ---- gradients in their parameters' layout ------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_gradients_have_their_parameters_strides(name):
    """DistributedDataParallel copies each gradient into a bucket view with its parameter's strides and
    warns ("Grad strides do not match bucket view strides") for every one whose strides differ. Checked
    after an SGD step with NCHW and channels-last input, with and without autocast. Every size keeps its
    widths, heads and group width, with one block per stage (two in the last: a shifted window) for speed."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=10, depths=(1, 1, 1, 2)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
        for amp in (False, True):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x).float(), torch.tensor([1, 2]))
            loss.backward()
            opt.step()
            wrong = {
                n: (p.stride(), p.grad.stride()) for n, p in model.named_parameters() if p.grad.stride() != p.stride()
            }
            assert wrong == {}, f"{fmt}, autocast {amp}: parameter strides vs gradient strides"


@pytest.mark.parametrize("how", ["load_state_dict_assign", "to_contiguous_format"])
def test_loading_and_conversion_keep_the_gradient_layout(how):
    """The 1x1 weights keep the strides their gradients come in when a checkpoint's own tensors replace
    them (older checkpoints hold them with contiguous strides) and when the model is converted."""
    model = _model("elsa_swin_nano", num_classes=10)
    plain = {k: v.clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    if how == "load_state_dict_assign":
        model.load_state_dict(plain, assign=True)
    else:
        model.to(memory_format=torch.contiguous_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, IMG, IMG))
    out.float().sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, plain[k], rtol=0, atol=0)


# One process of DDP (gloo) is enough: the reducer checks every gradient against its bucket view all the same.
# The steps run under autocast too: there the 1x1 convolutions' weight gradients come channels-last with any
# number of threads, in float32 with more than one.
DDP_SCRIPT = textwrap.dedent(
    """
    import os, tempfile
    import timm, torch, torch.distributed as dist
    import elsa_swin
    from torch.nn.parallel import DistributedDataParallel
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    torch.manual_seed(0)
    model = DistributedDataParallel(timm.create_model("elsa_swin_nano", img_size=32, num_classes=4))
    for fmt in (torch.contiguous_format, torch.channels_last):
        for amp in (False, True):
            model.zero_grad(set_to_none=True)  # as optimizers do: each step's gradients are new tensors
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt))
            out.float().sum().backward()
    dist.destroy_process_group()
    print("ddp ok")
    """
)


def test_ddp_gets_no_stride_warning():
    r = subprocess.run(
        [sys.executable, "-c", DDP_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert r.returncode == 0 and "ddp ok" in r.stdout, r.stderr[-3000:]
    assert "Grad strides do not match" not in r.stderr, r.stderr[-3000:]
