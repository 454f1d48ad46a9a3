"""Masks on every weight a user calls prunable: the attention twin against a plain nn.MultiheadAttention
with multiplied weights, Linear/Conv2d subclasses, ViT end to end, and the loud refusals."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from configs.errors import UserError
from layers import MaskSet, build_maskset, dense_state_dict, masked_layers, to_dense, to_masked
from layers.attention import MaskedMultiheadAttention
from layers.convert import UnmaskableLayer
from layers.maskset import unmasked_weights
from pruning.cost import model_cost


class Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k, v, **kw):
        return self.attn(q, k, v, **kw)


def random_masks(model, generator):
    for layer in masked_layers(model).values():
        layer.mask.copy_(torch.rand(layer.weight.shape, generator=generator) < 0.6)


def multiplied_plain(twin: MaskedMultiheadAttention, plain: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """The plain module with each projection's weight multiplied by the twin's mask, by hand."""
    out = copy.deepcopy(plain)
    e = plain.embed_dim
    with torch.no_grad():
        masks = [twin.q_proj.mask, twin.k_proj.mask, twin.v_proj.mask]
        if plain._qkv_same_embed_dim:
            for i, m in enumerate(masks):
                out.in_proj_weight[i * e:(i + 1) * e] *= m
        else:
            for w, m in zip((out.q_proj_weight, out.k_proj_weight, out.v_proj_weight), masks):
                w *= m
        out.out_proj.weight *= twin.out_proj.mask
    return out


LAYOUTS = [dict(kdim=None, vdim=None), dict(kdim=6, vdim=10)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["packed", "separate"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_twin_equals_a_plain_attention_whose_weights_were_multiplied_by_the_masks(layout, batch_first,
                                                                                  need_weights, average):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    plain = Holder(nn.MultiheadAttention(16, 4, batch_first=batch_first, **layout)).double()
    masked = to_masked(copy.deepcopy(plain), granularity="unstructured")
    assert isinstance(masked.attn, MaskedMultiheadAttention) and len(masked_layers(masked)) == 4
    random_masks(masked, g)
    reference = Holder(multiplied_plain(masked.attn, plain.attn))
    L, S, N = 5, 7, 3
    shape = (lambda n, s, d: (n, s, d)) if batch_first else (lambda n, s, d: (s, n, d))
    q = torch.randn(*shape(N, L, 16), dtype=torch.float64, generator=g)
    k = torch.randn(*shape(N, S, layout["kdim"] or 16), dtype=torch.float64, generator=g)
    v = torch.randn(*shape(N, S, layout["vdim"] or 16), dtype=torch.float64, generator=g)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    attn_mask = torch.rand(L, S, generator=g) < 0.2
    attn_mask[:, 0] = False  # no row fully masked
    for kw in ({}, {"key_padding_mask": padding}, {"attn_mask": attn_mask},
               {"key_padding_mask": padding, "attn_mask": torch.randn(L, S, dtype=torch.float64, generator=g)}):
        for mode in ("train", "eval"):  # eval: the plain module may take its fused fast path
            getattr(masked, mode)(), getattr(reference, mode)()
            got, got_w = masked(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
            want, want_w = reference(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (kw, mode)
            assert (got_w is None) == (want_w is None)
            if got_w is not None:
                assert torch.allclose(got_w, want_w, atol=1e-6, rtol=0)
    # the masks matter: all zero, the output is the output projection's bias
    for layer in masked_layers(masked).values():
        layer.mask.zero_()
    zeroed, _ = masked(q, k, v, need_weights=False)
    assert not torch.allclose(zeroed, got) and torch.allclose(zeroed, masked.attn.out_proj.bias.expand_as(zeroed))


def test_causal_and_unbatched_inputs_match():
    torch.manual_seed(1)
    plain = nn.MultiheadAttention(8, 2, batch_first=True).double()
    twin = MaskedMultiheadAttention.from_plain(plain, "unstructured")
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    for need in (False, True):
        want = plain(x, x, x, attn_mask=causal, is_causal=True, need_weights=need)[0]
        assert torch.allclose(twin(x, x, x, attn_mask=causal, is_causal=True, need_weights=need)[0], want, atol=1e-9)
    single = x[0]
    assert torch.allclose(twin(single, single, single)[0], plain(single, single, single)[0], atol=1e-9)


def test_score_gradients_reach_the_projections_and_the_masks_select():
    torch.manual_seed(0)
    model = Holder(nn.MultiheadAttention(8, 2, batch_first=True))
    to_masked(model, granularity="unstructured")
    ms = MaskSet(model, k=0.5, granularity="unstructured", scope="global")
    for layer in masked_layers(model).values():
        layer.popup_scores.requires_grad_(True)
    x = torch.randn(2, 4, 8)
    model(x, x, x, need_weights=False)[0].square().sum().backward()
    for name, layer in masked_layers(model).items():
        assert layer.popup_scores.grad is not None and layer.popup_scores.grad.abs().sum() > 0, name
    total = 4 * 64
    assert sum(int(layer.mask.sum()) for layer in ms.layers.values()) == total // 2


# torchvision's VisionTransformer: 2 encoder layers of width 32 by default (the modules of ViT-B/16, in a
# second), the real 86M-parameter ViT-B/16 under -m slow (about 20 s of these tests).
@pytest.fixture(scope="module", params=["small", pytest.param("vit_b_16", marks=pytest.mark.slow)])
def vit(request):
    torch.manual_seed(0)
    if request.param == "vit_b_16":
        return torchvision.models.vit_b_16(image_size=32, num_classes=10).eval()
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10).eval()


def attention_layers(vit) -> int:
    """The masked layers of a ViT's attention: in_proj (as q, k and v) and out_proj of each encoder layer."""
    return 4 * len(vit.encoder.layers)


def test_vit_every_weight_of_attention_is_masked_and_counted(vit):
    masked = to_masked(copy.deepcopy(vit), granularity="unstructured")
    layers = masked_layers(masked)
    attn = [n for n in layers if ".self_attention." in n]
    assert len(attn) == attention_layers(vit)
    plain_weights = sum(m.weight.numel() for m in vit.modules() if isinstance(m, (nn.Conv2d, nn.Linear))) + \
        sum(m.in_proj_weight.numel() for m in vit.modules() if isinstance(m, nn.MultiheadAttention))
    assert sum(layer.weight.numel() for layer in layers.values()) == plain_weights
    MaskSet(masked, k=0.5, granularity="unstructured", scope="global")
    x = torch.randn(1, 3, 32, 32)
    cost = model_cost(masked, example=x)
    assert cost.masked_kept == sum(int(m.mask.sum()) for m in layers.values()) == plain_weights // 2
    assert cost.masked_params == plain_weights
    # the true sparsity of the whole model is the zero fraction of the plain ViT holding weight * mask
    plain = copy.deepcopy(vit)
    plain.load_state_dict(dense_state_dict(masked), strict=True)
    values = [p for p in plain.parameters()]
    assert cost.params_total == sum(p.numel() for p in values)
    assert cost.params_total - cost.params_kept == sum(int((p == 0).sum()) for p in values)
    # torchvision zero-initialises the head (and a random init gives a few exact zeros): kept weights that
    # are zero count as zeros
    kept_zeros = sum(int(((m.weight == 0) & m.mask).sum()) for m in layers.values())
    assert kept_zeros >= int(layers["heads.head"].mask.sum()) > 0
    assert cost.masked_zeros == plain_weights - cost.masked_kept + kept_zeros
    assert cost.sparsity_masked == cost.masked_zeros / plain_weights > 0.5
    # dense state dict: loads strictly into the plain ViT and computes the masked model's output
    assert torch.allclose(plain(x), masked(x), atol=1e-5)
    back = to_dense(copy.deepcopy(masked))
    assert type(back.encoder.layers[0].self_attention) is nn.MultiheadAttention
    assert type(back.encoder.layers[0].self_attention.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert torch.allclose(back(x), masked(x), atol=1e-5)


def test_a_plain_vit_state_dict_loads_strictly_into_the_masked_vit(vit):
    masked = to_masked(copy.deepcopy(vit), granularity="unstructured")
    missing, unexpected = masked.load_state_dict(vit.state_dict(), strict=False)
    assert unexpected == [] and all(key.endswith(("popup_scores", "mask")) for key in missing)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(masked(x), vit(x), atol=1e-5)  # all-ones masks


def test_nm_masks_on_attention(vit):
    masked = to_masked(copy.deepcopy(vit), granularity="nm", exclude=["conv_proj"])  # 3 input channels
    ms = MaskSet(masked, k=1.0, granularity="nm", scope="global", nm=(2, 4))
    assert sum(".self_attention." in name for name in ms.layers) == attention_layers(vit)
    for name, layer in ms.layers.items():
        groups = layer.mask.reshape(layer.mask.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name


def test_subclasses_are_masked_and_get_their_class_back():
    class Tagged(nn.Linear):
        tag = "mine"

    class Doubling(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), Tagged(2 * 4 * 4, 3))
    to_masked(model, granularity="unstructured")
    assert len(masked_layers(model)) == 2
    back = to_dense(model)
    assert type(back[2]) is Tagged and back[2].tag == "mine"
    with pytest.raises(UnmaskableLayer, match=r"^0 is a Doubling, a Conv2d subclass with a forward of its own.*"
                                              r"--exclude-layers 0$"):
        to_masked(nn.Sequential(Doubling(1, 2, 3)), granularity="unstructured")
    kept = to_masked(nn.Sequential(Doubling(1, 2, 3)), granularity="unstructured", exclude=["0"])
    assert masked_layers(kept) == {}


def test_refusals_are_one_line_user_errors_naming_the_fix(vit):
    with pytest.raises(UserError, match=r"attention module, which filter/channel masks cannot prune.*--exclude-layers"):
        build_maskset(copy.deepcopy(vit), granularity="filter", k=0.5, scope="layer")
    # the same model with attention kept dense: filter masks on its one convolution
    ms, notices = build_maskset(copy.deepcopy(vit), granularity="filter", k=0.5, scope="layer",
                                exclude="encoder.layers.*.self_attention")
    assert list(ms.layers) == ["conv_proj"]
    assert any("stay dense" in line and "self_attention (MultiheadAttention" in line for line in notices)
    odd = Holder(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(UserError, match=r"^attn: add_bias_kv=True is not supported.*--exclude-layers attn$"):
        build_maskset(odd, granularity="unstructured", k=0.5, scope="layer")


def test_unmasked_weights_are_named_once_with_their_counts():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv1d(4, 4, 1), nn.Embedding(10, 4),
                          nn.LSTM(4, 4), nn.Linear(4, 2))
    to_masked(model, granularity="filter")
    line = unmasked_weights(model)
    assert line == ("230 weights in 4 module(s) stay dense "
                    "(no mask, never pruned): 2 (Conv1d, 20), 3 (Embedding, 40), 4 (LSTM, 160), 5 (Linear, 10); "
                    "plus 12 biases and normalisation parameters")
    to_masked(nn_all := nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), granularity="unstructured")
    assert unmasked_weights(nn_all) is None
