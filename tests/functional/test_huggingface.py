"""Hugging Face recipes: model.loss_function, Trainer(compute_loss_func=...), the fused
head, and crossent.patch() on a tiny random GPT-2 (2 layers, d=64, V=1000).

Needs ``transformers`` (and ``accelerate`` for the Trainer), pinned in constraints/dev.txt.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (a test-only dependency: pip install -e '.[dev]')"
)

import crossent  # noqa: E402
import crossent.functional._multiclass as _multiclass  # noqa: E402
from _helpers import TOL  # noqa: E402
from crossent.integrations import huggingface as hf  # noqa: E402

V = 1000


def tiny_gpt2(seed=0, vocab_size=V, d=64, n_positions=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=d,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def batch(B=4, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt that is not trained on
    labels[2, -5:] = -100  # padding
    return ids, labels


@pytest.fixture
def calls(monkeypatch):
    """Every op crossent's cross_entropy dispatches (only crossent calls it)."""
    seen = []
    backend_for = _multiclass.backend_for

    def recording(op, like, backend=None):
        seen.append(op)
        return backend_for(op, like, backend)

    monkeypatch.setattr(_multiclass, "backend_for", recording)
    return seen


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got, ref):
    torch.testing.assert_close(got[0], ref[0], **TOL[torch.float32])
    assert got[1].keys() == ref[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("num_items", [None, 50])
def test_model_loss_function(calls, num_items):
    model = tiny_gpt2()
    ids, labels = batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = loss_and_grads(model, lambda: model(ids, labels=labels, **kw).loss)
    assert calls == []
    model.loss_function = hf.causal_lm_loss
    got = loss_and_grads(model, lambda: model(ids, labels=labels, **kw).loss)
    assert calls == ["cross_entropy"]
    assert_same(got, ref)
    bad = labels.clone()
    bad[1, 3] = V  # a token id outside the vocabulary: crossent's error names it
    with pytest.raises(crossent.CrossentIndexError, match="class indices"):
        model(ids, labels=bad)


def test_loss_type_registration(calls, monkeypatch):
    from transformers.loss.loss_utils import LOSS_MAPPING

    monkeypatch.setitem(LOSS_MAPPING, "crossent_ForCausalLM", hf.causal_lm_loss)
    model = tiny_gpt2()
    ids, labels = batch()
    ref = model(ids, labels=labels).loss
    model.loss_type = "crossent_ForCausalLM"
    torch.testing.assert_close(model(ids, labels=labels).loss, ref, **TOL[torch.float32])
    assert calls == ["cross_entropy"]


def _train(tmp_path, compute_loss_func):
    from transformers import Trainer, TrainingArguments

    ids, labels = batch(B=8, T=16, seed=5)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": labels[i]}

    model = tiny_gpt2()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.5,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), compute_loss_func=compute_loss_func)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return torch.tensor(losses), torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trainer_compute_loss_func(calls, tmp_path):
    """Two SGD steps (Adam would turn rounding-level gradient differences of parameters
    whose gradient is ~0 into steps of ~lr): losses and parameters equal to the model's."""
    pytest.importorskip("accelerate", reason="Trainer needs accelerate (pip install -e '.[dev]')")
    ref_losses, ref_params = _train(tmp_path / "torch", None)
    assert calls == []
    losses, params = _train(tmp_path / "crossent", hf.compute_loss)
    assert calls == ["cross_entropy", "cross_entropy"]
    assert len(losses) == 2 and losses[1] < losses[0]
    torch.testing.assert_close(losses, ref_losses, **TOL[torch.float32])
    torch.testing.assert_close(params, ref_params, **TOL[torch.float32])


@pytest.mark.parametrize("num_items", [None, 50])
def test_fused_head_equals_the_models_loss(num_items):
    model = tiny_gpt2()
    ids, labels = batch()
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = loss_and_grads(model, lambda: model(ids, labels=labels, **kw).loss)
    got = loss_and_grads(model, lambda: hf.fused_causal_lm_loss(model, ids, labels, **kw))
    assert_same(got, ref)


def test_fused_head_refuses_transformed_logits():
    model = tiny_gpt2()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(crossent.CrossentValueError, match="final_logit_softcapping"):
        hf.fused_causal_lm_loss(model, *batch())


def test_patch_routes_the_models_own_loss(calls):
    model = tiny_gpt2()
    ids, labels = batch()
    original = torch.nn.functional.cross_entropy
    ref = loss_and_grads(model, lambda: model(ids, labels=labels).loss)
    with crossent.patch():
        got = loss_and_grads(model, lambda: model(ids, labels=labels).loss)
        bad = labels.clone()
        bad[1, 3] = V
        with pytest.raises(crossent.CrossentIndexError):
            model(ids, labels=bad)
    assert calls == ["cross_entropy"]
    assert torch.nn.functional.cross_entropy is original
    assert_same(got, ref)


def _memory_child():
    """Peak MiB beyond parameters and gradients of one training step at B=8, T=512,
    V=50257, d=256: the body alone, the model's own loss path, the fused head."""
    from crossent.bench.memory import _measure_cpu

    model = tiny_gpt2(vocab_size=50257, d=256, n_positions=512)
    ids = torch.randint(0, 50257, (8, 512), generator=torch.Generator().manual_seed(0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    hf.fused_causal_lm_loss(model, ids[:1, :8], ids[:1, :8]).backward()  # builds the C kernel
    steps = {
        "body": lambda: model.base_model(ids)[0].sum().backward(),
        "model": lambda: model(ids, labels=ids).loss.backward(),
        "fused": lambda: hf.fused_causal_lm_loss(model, ids, ids).backward(),
    }
    print(json.dumps({k: _measure_cpu(step) / 2**20 for k, step in steps.items()}))


@pytest.mark.slow  # about a minute on 2 cores
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_fused_head_memory():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for _helpers
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, __file__, "memory"], capture_output=True, text=True, env=env, timeout=900, check=True
    )
    mib = json.loads(out.stdout.strip().splitlines()[-1])
    loss_model, loss_fused = mib["model"] - mib["body"], mib["fused"] - mib["body"]
    assert loss_fused < loss_model / 5, mib


if __name__ == "__main__" and sys.argv[1:] == ["memory"]:
    _memory_child()
