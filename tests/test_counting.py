"""The one weight/FLOPs counter (pruning.cost, pruning.flops) on models of any kind: true sparsities of the
masked layers and of the whole model, MACs against PyTorch's FlopCounterMode, no crash on modules the
masks do not know (attention, recurrent layers)."""
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.run_log import sparsity_table
from layers import MaskSet, to_masked
from models import build_model, model_names
from pruning.cost import masked_layers_of, model_cost
from pruning.flops import dense_macs, flops_per_weight


def conv_linear_macs(model, example):
    """Sum over every Conv2d/Linear called as a module of weights x uses per weight: the reference for
    models whose arithmetic is all in those layers."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    per_weight = flops_per_weight(model, example=example, layers=layers)
    return sum(m.weight.numel() * per_weight[name] for name, m in layers.items())


def flop_counter_macs(model, example):
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2 // example.shape[0]


@pytest.mark.parametrize("name", model_names())
def test_registered_models_macs_equal_flop_counter_mode(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=3, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    macs = dense_macs(model, example=x)
    assert macs == flop_counter_macs(model, x) == conv_linear_macs(model, x) > 0


TORCHVISION_CNNS = ["resnet18", "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "mobilenet_v3_small",
                    pytest.param("resnext50_32x4d", marks=pytest.mark.slow),
                    pytest.param("densenet121", marks=pytest.mark.slow),
                    pytest.param("convnext_tiny", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", TORCHVISION_CNNS)
def test_torchvision_cnn_macs_equal_flop_counter_mode_and_the_per_weight_count(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    # Grouped/depthwise convs, SE blocks (1x1 convs on pooled maps), channels-last Linear (convnext):
    # every MAC is a weight's, so the per-weight count adds up to the whole.
    assert dense_macs(model, example=x) == flop_counter_macs(model, x) == conv_linear_macs(model, x)


def test_attention_macs_by_hand():
    """One nn.MultiheadAttention on L tokens of width E: q/k/v and output projections (4 L E^2) plus
    the two attention products (2 L^2 E), per sample; the CPU attention kernel and the fused inference
    fast path are both counted (FlopCounterMode alone sees neither)."""
    L, E = 7, 16
    mha = nn.MultiheadAttention(E, 4, batch_first=True)

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = Self().eval()
    x = torch.randn(3, L, E)
    assert dense_macs(model, example=x) == 4 * L * E * E + 2 * L * L * E
    assert flop_counter_macs(model, x) < 4 * L * E * E  # what the bare counter gives: neither counted
    assert torch.backends.mha.get_fastpath_enabled()  # put back


def test_vit_counts_without_crashing_and_the_dense_weights_are_true():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    tokens, width, mlp = 5, 768, 3072
    per_block = 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp
    patch = 4 * 768 * 3 * 16 * 16
    head = width * 10
    cost = model_cost(model, example=x)
    assert cost.flops_total == cost.flops_kept == 12 * per_block + patch + head
    assert cost.params_total == sum(p.numel() for p in model.parameters())
    assert (cost.masked_params, cost.sparsity_masked) == (0, 0.0)


def test_masked_layers_are_counted_where_they_are_and_the_model_sparsity_covers_the_rest():
    """A model with a dense part the masks do not reach (an embedding, a Conv1d): the masked layers'
    sparsity is the masks', the model's counts every weight; the report footer says both."""
    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)  # 108 weights, 6x6 = 36 uses each
            self.seq = nn.Conv1d(4, 4, 1)  # 16 + 4, not masked
            self.pos = nn.Parameter(torch.randn(4, 36))  # 144, not masked
            self.fc = nn.Linear(4 * 36, 5)  # 720 + 5

        def forward(self, x):
            h = self.conv(x).flatten(2) + self.pos
            return self.fc(self.seq(h).flatten(1))

    model = Mixed()
    to_masked(model, granularity="unstructured")
    assert list(masked_layers_of(model)) == ["conv", "fc"]
    ms = MaskSet(model, k=0.25, granularity="unstructured", scope="layer")
    x = torch.randn(2, 3, 8, 8)
    cost = model_cost(model, example=x)
    kept = 27 + 180
    assert (cost.masked_params, cost.masked_kept, cost.masked_zeros) == (828, kept, 828 - kept)
    assert cost.params_total == 828 + 20 + 144 + 5
    assert cost.params_kept == kept + 20 + 144 + 5
    assert cost.sparsity_masked == pytest.approx(1 - kept / 828, abs=1e-15)
    assert cost.sparsity_model == pytest.approx(1 - (kept + 169) / 997, abs=1e-15)
    assert cost.flops_total == 108 * 36 + 16 * 36 + 720
    assert cost.flops_kept == cost.flops_total - (108 - 27) * 36 - (720 - 180)
    footer = sparsity_table(ms.report(), cost=cost).splitlines()[-1]
    assert footer == (f"zero weights: {100 * (1 - kept / 828):.2f}% of the masked layers' 828, "
                      f"{100 * (1 - (kept + 169) / 997):.2f}% of all 997 weights of the model")


def test_shared_and_tied_parameters_count_once():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, head)
    cost = model_cost(model, example=torch.tensor([[1, 2, 3]]))
    assert cost.params_total == 60 and cost.flops_total == 3 * 60


def test_recurrent_modules_are_named_as_uncounted():
    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    cost = model_cost(Rnn(), example=torch.randn(1, 5, 4))
    assert cost.flops_uncounted == ("lstm",) and cost.flops_total == 16
    assert "not counted: lstm" in cost.line() and cost.as_dict()["flops_uncounted"] == ["lstm"]


def test_a_masked_layer_whose_weight_another_module_reads_is_an_error_naming_it():
    class Borrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.fc.weight * self.fc.mask)

    model = Borrow()
    to_masked(model, granularity="unstructured")
    with pytest.raises(ValueError, match=r"\['fc'\] were not called as modules"):
        model_cost(model, example=torch.randn(1, 4))


def test_sequence_layout_linear_counts_per_token():
    """A Linear on (L, N, E), the layout of attention without batch_first: L uses per weight per sample."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):  # x: (N, L, E) -> (L, N, E)
            return self.fc(x.transpose(0, 1))

    model = SeqFirst()
    assert flops_per_weight(model, example=torch.randn(4, 9, 6), layers={"fc": model.fc}) == {"fc": 9}
