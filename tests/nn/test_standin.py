"""crossent.functional / crossent.nn as complete stand-ins for torch.nn.functional / torch.nn.

The nanoGPT check: the same model source (written like karpathy/nanoGPT's ``model.py``:
``F.layer_norm``, ``F.gelu``, ``F.scaled_dot_product_attention``, ``nn.Module``,
``nn.Linear``, ``nn.Embedding``, ``F.cross_entropy`` with ``ignore_index=-1``) runs once
with torch's modules and once with crossent's, 20 training steps from the same seed.
"""

import math

import pytest
import torch

import crossent
import crossent.functional as CF
import crossent.nn as CNN
from _helpers import TOL

CROSSENT_LOSSES = {
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_binary_cross_entropy_with_logits",
    "LossParts",
    "token_logprobs",
    "linear_token_logprobs",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "poly1_cross_entropy",
    "poly1_binary_cross_entropy_with_logits",
    "asymmetric_loss",
}
CROSSENT_CLASSES = {
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "LinearBCEWithLogitsLoss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "Poly1CrossEntropyLoss",
    "Poly1BCEWithLogitsLoss",
    "AsymmetricLoss",
}


def test_functional_resolves_every_other_name_to_torch():
    tf = torch.nn.functional
    for name in (
        "layer_norm",
        "gelu",
        "scaled_dot_product_attention",
        "softmax",
        "linear",
        "nll_loss",
        "one_hot",
        "pad",
        "dropout",
        "softplus",
        "Tensor",
    ):
        assert getattr(CF, name) is getattr(tf, name), name
    public = {n for n in dir(tf) if not n.startswith("_")}
    shadowed = {n for n in public if getattr(CF, n) is not getattr(tf, n)}
    assert shadowed == CROSSENT_LOSSES & public
    assert public <= set(dir(CF))


def test_nn_resolves_every_other_name_to_torch():
    for name in (
        "Module",
        "Linear",
        "Embedding",
        "Parameter",
        "ModuleList",
        "init",
        "utils",
        "Sequential",
        "NLLLoss",
        "parallel",
    ):
        assert getattr(CNN, name) is getattr(torch.nn, name), name
    assert CNN.functional is CF
    import crossent.nn.functional as F2
    from crossent.nn import init

    assert F2 is CF and init is torch.nn.init
    public = {n for n in dir(torch.nn) if not n.startswith("_")}
    shadowed = {n for n in public if getattr(CNN, n) is not getattr(torch.nn, n)}
    assert shadowed == (CROSSENT_CLASSES & public) | {"functional"}
    for name in CROSSENT_CLASSES & public:  # crossent's classes are torch's subclasses
        assert issubclass(getattr(CNN, name), getattr(torch.nn, name)), name


def test_star_import_gives_crossent_names_only():
    for mod, names in (("crossent.nn", CROSSENT_CLASSES), ("crossent.functional", CROSSENT_LOSSES)):
        ns = {}
        exec(f"from {mod} import *", ns)
        assert set(ns) - {"__builtins__"} == names


def test_missing_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="crossent.functional.*no_such_op"):
        CF.no_such_op
    with pytest.raises(AttributeError, match="crossent.nn.*NoSuchLayer"):
        CNN.NoSuchLayer
    assert not hasattr(CNN, "NoSuchLayer")


GPT_SOURCE = """
class LayerNorm(nn.Module):
    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(d), CausalSelfAttention(d, n_head)
        self.ln_2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, d):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, d), wpe=nn.Embedding(block_size, d),
            h=nn.ModuleList([Block(d, n_head) for _ in range(n_layer)]), ln_f=LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(F.gelu(self.transformer.ln_f(x)) + x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
"""


def _train_gpt(nn_module, f_module, steps=20):
    ns = {"torch": torch, "nn": nn_module, "F": f_module, "__name__": "gpt_under_test"}
    exec(compile(GPT_SOURCE, "<gpt>", "exec"), ns)
    torch.manual_seed(0)
    model = ns["GPT"](vocab_size=97, block_size=16, n_layer=2, n_head=2, d=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(1))
    targets = data[:, 1:].clone()
    targets[:, :3] = -1  # nanoGPT marks unused positions with -1
    losses = []
    for _ in range(steps):  # one batch, learnt by heart: the loss must fall
        _, loss = model(data[:, :-1], targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("swap", ["functional", "nn", "both"])
def test_nanogpt_style_model_trains_the_same(swap):
    f_module = CF if swap in ("functional", "both") else torch.nn.functional
    nn_module = CNN if swap in ("nn", "both") else torch.nn
    ref = _train_gpt(torch.nn, torch.nn.functional)
    got = _train_gpt(nn_module, f_module)
    assert math.isclose(ref[0], math.log(97), rel_tol=0.05)
    assert ref[-1] < ref[0]
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


def test_nanogpt_with_crossent_really_calls_crossent():
    """crossent's guardrail fires for an out-of-range target (torch raises its own IndexError)."""
    ns = {"torch": torch, "nn": torch.nn, "F": CF}
    exec(compile(GPT_SOURCE, "<gpt>", "exec"), ns)
    model = ns["GPT"](vocab_size=11, block_size=8, n_layer=1, n_head=1, d=8)
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(crossent.CrossentIndexError):
        model(idx, torch.full((1, 4), 11))
